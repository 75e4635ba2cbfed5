"""What the sidecar keeps from a token response: user claims and the access token's lifetime.

A session's claims are one view over three sources (docs/identity-providers.md): the ID
token, the UserInfo answer about the same subject, and the provider's own JWT access token
when it verifies. For a claim named by more than one, the ID token wins over userinfo, which
wins over the access token: identity claims never come from a less trusted source. What only
the access token carries (Keycloak's `realm_access` and `resource_access`, `scp`, `roles`,
`groups` where the ID token has none) is added.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Final

from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from joserfc.jws import extract_compact

from sidecar.config.types import ASYMMETRIC_ALGORITHMS
from sidecar.oidc.id_token import LEEWAY

if TYPE_CHECKING:
    from sidecar.oidc.client import TokenResponse

__all__ = [
    "DEFAULT_ACCESS_TTL",
    "UnknownAccessTokenKey",
    "UnusableAccessToken",
    "access_token_expiry",
    "access_token_user_claims",
    "is_jwt",
    "refreshed_claims",
    "session_claims",
    "user_claims",
    "verify_access_token",
]

DEFAULT_ACCESS_TTL: Final = 3600.0  # neither expires_in nor a JWT exp: assume an hour
# ID-token claims about the token itself, not the user: not kept in the session.
_TOKEN_CLAIMS: Final = frozenset(
    {"iss", "aud", "exp", "iat", "nbf", "nonce", "at_hash", "c_hash", "azp", "jti", "auth_time"}
)
# Access-token claims about the token, the client or the IdP session, never the user's: the
# token's type (Keycloak `typ`), the client (`client_id`, Okta `cid`), a confirmation key
# (RFC 7800 `cnf`). `sid` names the IdP session central logout matches, which comes from the
# ID token alone (a logout token's `sid` is the ID token's).
_ACCESS_TOKEN_ONLY: Final = _TOKEN_CLAIMS | {"typ", "client_id", "cid", "cnf", "sid"}
# RFC 7515 §7.1 compact serialization: three base64url segments (a JWE has five).
_COMPACT: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# RFC 9068 §2.1 asks for `at+jwt`; plain `JWT` and no `typ` are what most IdPs send.
_ACCEPTED_TYP: Final = frozenset({"at+jwt", "application/at+jwt", "jwt"})
_MAX_TOKEN: Final = 64 * 1024  # characters; an access token this long is not looked into


class UnusableAccessToken(Exception):
    """The access token is not the provider's verifiable JWT: it gives no claims."""


class UnknownAccessTokenKey(UnusableAccessToken):
    """Signed with a `kid` the cached key set lacks: refetch the JWKS once and retry."""


def is_jwt(token: str) -> bool:
    """Whether a token has the shape of a compact JWS at all: an opaque access token (Google's)
    is not looked into any further."""
    return len(token) <= _MAX_TOKEN and _COMPACT.fullmatch(token) is not None


def user_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
    """The claims that describe the user (`sub`, email, groups …), for headers and rules."""
    return {k: v for k, v in claims.items() if k not in _TOKEN_CLAIMS}


def access_token_user_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
    """The claims of a verified access token that may describe the user (roles, scopes …)."""
    return {k: v for k, v in claims.items() if k not in _ACCESS_TOKEN_ONLY}


def session_claims(
    id_claims: Mapping[str, Any],
    userinfo: Mapping[str, Any] | None = None,
    access_claims: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A login's claims view: the ID token's over userinfo's over the access token's.

    `userinfo` must already be about the ID token's subject (OIDC Core §5.3.4) and
    `access_claims` those of a verified access token (`verify_access_token`). The token
    claims of the ID token (`iss`, `sid` …) stay: `SessionRecord.from_login` reads them.
    """
    merged = access_token_user_claims(access_claims or {})
    merged.update(userinfo or {})
    merged.update(id_claims)
    return merged


def refreshed_claims(
    claims: Mapping[str, Any],
    *,
    id_token: str | None,
    previous_access: Mapping[str, Any] | None,
    id_claims: Mapping[str, Any] | None,
    access_claims: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """A session's claims after a refresh grant.

    `claims` are the session's, `id_token` the ID token they were built with,
    `previous_access` the verified claims of the access token they were built with (None if
    it gave none), `id_claims` those of a new validated ID token (None: the refresh brought
    none) and `access_claims` those of the new access token (None: it does not verify).

    What the previous access token alone contributed goes, and the new one's comes in
    under the rest: a role taken away at the IdP is gone after the next refresh. A claim the
    previous access token carried with the same value, that its ID token lacks, counts as the
    access token's (its userinfo twin comes back from the new access token, if there).
    """
    kept = dict(claims)
    if previous_access:
        from_id = _payload(id_token) or {}
        for name, value in access_token_user_claims(previous_access).items():
            if name not in from_id and name in kept and kept[name] == value:
                del kept[name]
    if id_claims is not None:
        kept.update(user_claims(id_claims))
    merged = access_token_user_claims(access_claims or {})
    merged.update(kept)
    return merged


def verify_access_token(
    token: str,
    keys: KeySet,
    *,
    issuer: str,
    now: float,
    check_expiry: bool = True,
    algorithms: Collection[str] = ASYMMETRIC_ALGORITHMS,
) -> dict[str, Any]:
    """The claims of a JWT access token of `issuer` signed by one of `keys`, or
    `UnusableAccessToken` saying why not.

    Not checked: the audience (Keycloak's access tokens name `account`, Okta's its
    authorization server's audience: none names this client), nor the subject (Okta's is the
    login name). The token came from the provider's token endpoint in the same answer as the
    ID token it goes with; the checks only establish that it is the provider's own JWT and
    not an opaque token or one for another resource (Entra ID's Graph tokens).
    The issuer is compared before any key work, so another issuer's token costs no refetch.
    """
    if not is_jwt(token):
        raise UnusableAccessToken("not a compact JWS")
    try:
        compact = extract_compact(token.encode())
        header = compact.headers()
        unverified = json.loads(compact.payload)
    except (JoseError, ValueError, RecursionError) as exc:
        raise UnusableAccessToken("not a JWT") from exc
    if not isinstance(unverified, dict) or unverified.get("iss") != issuer:
        raise UnusableAccessToken("another issuer")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYP):
        raise UnusableAccessToken("not an access token type")
    if "crit" in header:
        raise UnusableAccessToken("critical header extensions")
    allowed = [a for a in algorithms if a in ASYMMETRIC_ALGORITHMS]
    try:
        claims = dict(jwt.decode(token, keys, algorithms=allowed).claims)
    except InvalidKeyIdError as exc:
        raise UnknownAccessTokenKey("unknown signing key") from exc
    except (JoseError, ValueError, RecursionError) as exc:
        raise UnusableAccessToken(f"signature: {type(exc).__name__}") from exc
    if claims.get("iss") != issuer:
        raise UnusableAccessToken("another issuer")
    if "at_hash" in claims or "events" in claims:
        raise UnusableAccessToken("an ID or logout token")  # same checks as bearer tokens
    exp, nbf = _number(claims.get("exp")), _number(claims.get("nbf"))
    if check_expiry and (exp is None or now > exp + LEEWAY):
        raise UnusableAccessToken("expired or no expiry")
    if check_expiry and nbf is not None and now < nbf - LEEWAY:
        raise UnusableAccessToken("not yet valid")
    return claims


def access_token_expiry(tokens: TokenResponse, requested_at: float) -> float:
    """When the access token stops working, as a Unix time (docs/refresh.md step 6).

    `expires_in` counts from when the IdP issued the token, which is after we sent the
    request: counting from `requested_at` errs early, never late. A JWT `exp` earlier than
    that (IdPs round issue times down) wins. The JWT is not verified: its `exp` only
    schedules our next refresh.
    """
    candidates = []
    if tokens.expires_in:
        candidates.append(requested_at + tokens.expires_in)
    exp = _jwt_exp(tokens.access_token)
    if exp is not None:
        candidates.append(exp)
    return min(candidates) if candidates else requested_at + DEFAULT_ACCESS_TTL


def _jwt_exp(token: str) -> float | None:
    try:
        exp = json.loads(extract_compact(token.encode()).payload).get("exp")
    except (JoseError, ValueError, AttributeError):
        return None
    return _number(exp)


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def _payload(token: str | None) -> dict[str, Any] | None:
    """The unverified payload of a JWT the session already holds (validated when it came)."""
    if not token or not is_jwt(token):
        return None
    segment = token.split(".")[1]
    try:
        value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
