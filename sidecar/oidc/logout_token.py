"""Logout-token validation (OpenID Connect Back-Channel Logout 1.0 §2.4, §2.6), pure: keys
and time come in.

The token's shape and protected header are checked here before joserfc verifies the
signature against the same algorithm allow-list as ID tokens; the claims are checked by hand
because they differ from an ID token's (no `nonce`, an `events` claim, `sub` or `sid`).
Every failure is an `InvalidLogoutToken` whose `reason` is a short, stable metrics label and
whose message never repeats any part of the token.

Time rules. `iat` is required and may be at most `LEEWAY` in the future. A token with
`exp` is accepted until `exp + LEEWAY`; one without (§2.4 asks for `exp`, but not every
provider sends it) until `iat + MAX_AGE + LEEWAY`. Whatever `exp` says, no token is accepted
later than `iat + MAX_LIFETIME`. `LogoutClaims.remember_until` is the end of that acceptance
window, so a replay cache that remembers a `jti` until then sees every replay of it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    InvalidKeyIdError,
    JoseError,
    KeyParameterError,
    MissingKeyError,
    UnsupportedAlgorithmError,
)
from joserfc.jwk import KeySet

from sidecar.errors import InvalidLogoutToken
from sidecar.oidc.id_token import ALLOWED_ALGORITHMS, LEEWAY

__all__ = [
    "LOGOUT_EVENT",
    "MAX_AGE",
    "MAX_LIFETIME",
    "MAX_TOKEN_LENGTH",
    "LogoutClaims",
    "UnknownLogoutKey",
    "validate_logout_token",
]

LOGOUT_EVENT: Final = "http://schemas.openid.net/event/backchannel-logout"  # §2.4 `events`
MAX_AGE: Final = 600.0  # seconds a token without `exp` is accepted after its `iat`
MAX_LIFETIME: Final = 86400.0  # seconds after `iat` no token is accepted, whatever its `exp`
MAX_TOKEN_LENGTH: Final = 16 * 1024  # characters; anything longer is refused unparsed
MAX_JTI_LENGTH: Final = 256

# RFC 7515 §7.1 compact serialization: three base64url segments. The signature may be empty
# here so that an unsigned (`alg: none`) token is refused for its algorithm, not its shape.
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# §2.4 recommends explicit typing with `logout+jwt`; a plain JWT or no `typ` stays accepted.
_ACCEPTED_TYP: Final = frozenset({"jwt", "logout+jwt", "application/logout+jwt"})
# joserfc errors that mean "not signed by an acceptable key", as opposed to garbage.
_SIGNATURE_ERRORS: Final = (
    BadSignatureError,
    KeyParameterError,
    MissingKeyError,
    UnsupportedAlgorithmError,
)


@dataclass(frozen=True, slots=True)
class LogoutClaims:
    """What a valid logout token asks for: end `sid`, or every session of `subject`, at
    `issuer` (§2.4: a token without `sid` means all of the user's sessions)."""

    issuer: str
    subject: str | None
    sid: str | None
    jti: str
    remember_until: float  # Unix time until which `jti` must be remembered against replay


class UnknownLogoutKey(InvalidLogoutToken):
    """The token names a `kid` the cached key set lacks: refetch the JWKS once and retry."""

    def __init__(self, message: str = "logout token signed with an unknown key") -> None:
        super().__init__("signature", message)


def validate_logout_token(
    token: str,
    keys: KeySet,
    *,
    issuer: str,
    client_id: str,
    now: float,
    algorithms: Collection[str],
) -> LogoutClaims:
    """Return the claims of a valid logout token, or raise `InvalidLogoutToken` saying which
    check failed (§2.6)."""
    header = _header(token)
    claims = _verified_claims(token, header, keys, algorithms)
    _check_typ(header)

    # §2.6: iss, aud, iat and exp are validated as for ID tokens.
    if claims.get("iss") != issuer:
        raise InvalidLogoutToken("issuer", "logout token issuer does not match")
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    if client_id not in audiences:
        raise InvalidLogoutToken("audience", "logout token is not addressed to this client")
    remember_until = _check_times(claims, now)

    # §2.6: a `sub`, a `sid`, or both; present ones must be usable identifiers.
    subject = _identifier(claims, "sub")
    sid = _identifier(claims, "sid")
    if subject is None and sid is None:
        raise InvalidLogoutToken("subject", "logout token has neither sub nor sid")

    # §2.4, §2.6: the events claim is what makes this JWT a logout token.
    events = claims.get("events")
    if not isinstance(events, dict) or not isinstance(events.get(LOGOUT_EVENT), dict):
        raise InvalidLogoutToken("events", "logout token lacks the back-channel logout event")

    # §2.4, §2.6: a nonce is prohibited, so an ID token can never pass for a logout token.
    if "nonce" in claims:
        raise InvalidLogoutToken("nonce", "logout token carries a nonce")

    # §2.4: jti is required; it keys the replay check of §2.6.
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH:
        raise InvalidLogoutToken("jti", "logout token jti is missing or unusable")

    return LogoutClaims(
        issuer=issuer, subject=subject, sid=sid, jti=jti, remember_until=remember_until
    )


def _header(token: str) -> dict[str, Any]:
    """The protected header of a compact JWS, parsed before joserfc sees the token so that
    garbage is told apart from a bad signature."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise InvalidLogoutToken("malformed", "logout token is too long or not text")
    if not _COMPACT.fullmatch(token):
        raise InvalidLogoutToken("malformed", "logout token is not a compact JWS")
    segment = token.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError, RecursionError) as exc:
        raise InvalidLogoutToken("malformed", "logout token header is not JSON") from exc
    if not isinstance(header, dict):
        raise InvalidLogoutToken("malformed", "logout token header is not a JSON object")
    if "kid" in header and not isinstance(header["kid"], str):
        raise InvalidLogoutToken("malformed", "logout token kid is not a string")
    if "crit" in header:  # RFC 7515 §4.1.11: we understand no extension, so none may be crit
        raise InvalidLogoutToken("malformed", "logout token has critical header extensions")
    return header


def _verified_claims(
    token: str, header: Mapping[str, Any], keys: KeySet, algorithms: Collection[str]
) -> dict[str, Any]:
    """Check the algorithm (§2.6: as for ID tokens, never `none`), then the signature."""
    allowed = [a for a in algorithms if a in ALLOWED_ALGORITHMS]
    if header.get("alg") not in allowed:
        raise InvalidLogoutToken("signature", "logout token algorithm not accepted")
    try:
        decoded = jwt.decode(token, keys, algorithms=allowed)
    except InvalidKeyIdError as exc:
        raise UnknownLogoutKey() from exc
    except _SIGNATURE_ERRORS as exc:
        raise InvalidLogoutToken("signature", _rejected(exc)) from exc
    except (JoseError, ValueError, RecursionError) as exc:  # bad base64, payload not an object
        raise InvalidLogoutToken("malformed", _rejected(exc)) from exc
    return dict(decoded.claims)


def _rejected(exc: BaseException) -> str:
    """The library's error class only: its message may quote header values."""
    return f"logout token rejected: {type(exc).__name__}"


def _check_typ(header: Mapping[str, Any]) -> None:
    """§2.4 explicit typing: `logout+jwt` keeps other JWTs of the IdP from passing as one."""
    typ = header.get("typ")
    if typ is None:
        return
    if not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYP:
        raise InvalidLogoutToken("typ", "logout token typ not accepted")


def _check_times(claims: Mapping[str, Any], now: float) -> float:
    """Check `iat` and `exp`; return the end of the acceptance window (see module doc)."""
    iat = _number(claims, "iat")
    if iat > now + LEEWAY:
        raise InvalidLogoutToken("iat", "logout token issued in the future")
    exp = _number(claims, "exp") if "exp" in claims else None
    if exp is None:
        end = iat + MAX_AGE + LEEWAY  # below the cap: MAX_AGE is far shorter
        if now > end:
            raise InvalidLogoutToken("iat", "logout token without exp is too old")
        return end
    if now > exp + LEEWAY:
        raise InvalidLogoutToken("exp", "logout token has expired")
    end = min(exp + LEEWAY, iat + MAX_LIFETIME)
    if now > end:
        raise InvalidLogoutToken("iat", "logout token is too old")
    return end


def _number(claims: Mapping[str, Any], name: str) -> float:
    """A NumericDate claim as a finite float; JSON `true`, NaN or a huge integer is refused."""
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidLogoutToken(name, f"logout token {name} is missing or not a number")
    try:
        number = float(value)
    except OverflowError as exc:
        raise InvalidLogoutToken(name, f"logout token {name} is out of range") from exc
    if not math.isfinite(number):
        raise InvalidLogoutToken(name, f"logout token {name} is out of range")
    return number


def _identifier(claims: Mapping[str, Any], name: str) -> str | None:
    """`sub` or `sid`: absent, or a non-empty string."""
    if name not in claims:
        return None
    value = claims[name]
    if not isinstance(value, str) or not value:
        raise InvalidLogoutToken("subject", f"logout token {name} is not a non-empty string")
    return value
