"""Claims of the tokens the dev IdP issues: RFC 9068 access tokens, OIDC ID tokens,
Back-Channel Logout tokens, and the scope-to-claims mapping of OIDC Core §5.4."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from sidecar.dev.idp.models import DevUser

__all__ = [
    "ACCESS_TOKEN_TYP",
    "LOGOUT_EVENT",
    "LOGOUT_TOKEN_TYP",
    "access_token_claims",
    "at_hash",
    "id_token_claims",
    "logout_token_claims",
    "user_claims",
]

ACCESS_TOKEN_TYP = "at+jwt"  # noqa: S105 (a typ value) RFC 9068 §2.1
LOGOUT_TOKEN_TYP = "logout+jwt"  # noqa: S105 (a typ value) Back-Channel Logout 1.0 §2.4
LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
LOGOUT_TOKEN_TTL = 120  # Back-Channel Logout §2.4 recommends at most two minutes


def at_hash(access_token: str) -> str:
    """OIDC Core §3.1.3.6: base64url of the left half of SHA-256 over the token's ASCII."""
    digest = hashlib.sha256(access_token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode("ascii")


def user_claims(user: DevUser, scopes: frozenset[str]) -> dict[str, Any]:
    """OIDC Core §5.4: `email` and `profile` scopes release their claims; groups and the
    user's extra claims are always released (a dev IdP with a group mapper)."""
    claims: dict[str, Any] = {"sub": user.sub}
    if "email" in scopes:
        claims["email"] = user.email
        claims["email_verified"] = True
    if "profile" in scopes:
        claims["name"] = user.name
        claims["preferred_username"] = user.sub
    claims["groups"] = list(user.groups)
    claims.update(user.extra)
    return claims


def access_token_claims(
    *, issuer: str, sub: str, client_id: str, scope: str, sid: str, jti: str, now: int, ttl: int
) -> dict[str, Any]:
    """RFC 9068 §2.2: iss, exp, aud, sub, client_id, iat, jti, plus scope and sid."""
    return {
        "iss": issuer,
        "sub": sub,
        "aud": client_id,
        "client_id": client_id,
        "scope": scope,
        "sid": sid,
        "jti": jti,
        "iat": now,
        "exp": now + ttl,
    }


def id_token_claims(
    *,
    issuer: str,
    user: DevUser,
    client_id: str,
    scopes: frozenset[str],
    sid: str,
    auth_time: int,
    nonce: str | None,
    access_token: str,
    now: int,
    ttl: int,
) -> dict[str, Any]:
    """OIDC Core §2 and §3.1.3.6; on refresh (§12.2) the caller passes `nonce=None`."""
    claims = user_claims(user, scopes)
    claims.update(
        {
            "iss": issuer,
            "aud": client_id,
            "azp": client_id,
            "iat": now,
            "exp": now + ttl,
            "auth_time": auth_time,
            "sid": sid,
            "at_hash": at_hash(access_token),
        }
    )
    if nonce is not None:
        claims["nonce"] = nonce
    return claims


def logout_token_claims(
    *, issuer: str, client_id: str, sub: str | None, sid: str | None, jti: str, now: int
) -> dict[str, Any]:
    """OIDC Back-Channel Logout 1.0 §2.4: sub and/or sid, an events claim, never a nonce."""
    if sub is None and sid is None:
        raise ValueError("a logout token needs sub, sid or both")
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": client_id,
        "iat": now,
        "exp": now + LOGOUT_TOKEN_TTL,
        "jti": jti,
        "events": {LOGOUT_EVENT: {}},
    }
    if sub is not None:
        claims["sub"] = sub
    if sid is not None:
        claims["sid"] = sid
    return claims
