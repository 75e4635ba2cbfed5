"""Claims of the tokens the dev IdP issues: RFC 9068 access tokens, OIDC ID tokens,
Back-Channel Logout tokens, and the scope-to-claims mapping of OIDC Core §5.4.

A client's shape (`DevClient.shape`, see models.py) picks whose token layout it gets:
Keycloak's roles in the access token, Okta's `scp`, Google's opaque access tokens, Entra
ID's group object ids and group overage.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from typing import Any, Final

from sidecar.dev.idp.models import ClientShape, DevUser

__all__ = [
    "ACCESS_TOKEN_TYP",
    "ENTRA_TENANT",
    "GRAPH_AUDIENCE",
    "KEYCLOAK_DEFAULT_ROLE",
    "LOGOUT_EVENT",
    "LOGOUT_TOKEN_TYP",
    "access_token_claims",
    "at_hash",
    "entra_graph_issuer",
    "entra_object_id",
    "group_object_id",
    "id_token_claims",
    "logout_token_claims",
    "shaped_access_token_claims",
    "user_claims",
    "userinfo_claims",
]

ACCESS_TOKEN_TYP = "at+jwt"  # noqa: S105 (a typ value) RFC 9068 §2.1
LOGOUT_TOKEN_TYP = "logout+jwt"  # noqa: S105 (a typ value) Back-Channel Logout 1.0 §2.4
LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
LOGOUT_TOKEN_TTL = 120  # Back-Channel Logout §2.4 recommends at most two minutes

ENTRA_TENANT: Final = "0d3ef0a7-5e1c-4b7a-9d4e-000000000001"  # a tenant id (`tid`)
GRAPH_AUDIENCE: Final = "00000003-0000-0000-c000-000000000000"  # Microsoft Graph's app id
KEYCLOAK_DEFAULT_ROLE: Final = "default-roles-devidp"  # Keycloak gives every user one
_KEYCLOAK_ACCOUNT_ROLES: Final = ("manage-account", "view-profile")
_OBJECTS: Final = uuid.UUID("6f1b5a3e-8a52-4c0e-9d27-3f1e6c0de1d0")  # namespace of object ids


def group_object_id(group: str) -> str:
    """The object id the entra shape sends for a group name (stable, like Entra's)."""
    return str(uuid.uuid5(_OBJECTS, "group:" + group))


def entra_object_id(sub: str) -> str:
    """The `oid` the entra shape sends for a user."""
    return str(uuid.uuid5(_OBJECTS, "user:" + sub))


def entra_graph_issuer() -> str:
    """The issuer of the entra shape's access tokens: Graph's v1 token service, not the
    client's (v2.0) issuer, as for a real Entra login that asks for OIDC scopes only."""
    return f"https://sts.windows.net/{ENTRA_TENANT}/"


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


def userinfo_claims(
    user: DevUser, scopes: frozenset[str], shape: ClientShape = "default"
) -> dict[str, Any]:
    """What /userinfo answers for a client of `shape` (no groups but the default and Okta's;
    Entra's has no `email_verified`)."""
    claims = user_claims(user, scopes)
    if shape in ("keycloak", "google", "entra"):
        del claims["groups"]
    if shape == "entra":
        claims.pop("email_verified", None)
    return claims


def _id_token_user_claims(
    user: DevUser,
    scopes: frozenset[str],
    shape: ClientShape,
    *,
    group_overage: int,
) -> dict[str, Any]:
    """The user claims of an ID token for a client of `shape`."""
    claims = userinfo_claims(user, scopes, shape)
    if shape != "entra":
        return claims
    oid = entra_object_id(user.sub)
    claims.update({"oid": oid, "tid": ENTRA_TENANT, "ver": "2.0"})
    if "profile" in scopes:
        claims["preferred_username"] = user.email
    if len(user.groups) > group_overage:
        # Group overage: no groups, a pointer to where they can be read instead.
        claims["_claim_names"] = {"groups": "src1"}
        claims["_claim_sources"] = {
            "src1": {
                "endpoint": f"https://graph.windows.net/{ENTRA_TENANT}/users/{oid}/getMemberObjects"
            }
        }
    else:
        claims["groups"] = [group_object_id(g) for g in user.groups]
    if user.roles:
        claims["roles"] = list(user.roles)
    return claims


def shaped_access_token_claims(
    *,
    shape: ClientShape,
    issuer: str,
    user: DevUser,
    client_id: str,
    scope: str,
    sid: str,
    jti: str,
    now: int,
    ttl: int,
    auth_time: int,
) -> dict[str, Any]:
    """The access token claims a client of `shape` gets (not for google: its tokens are
    opaque)."""
    base = access_token_claims(
        issuer=issuer,
        sub=user.sub,
        client_id=client_id,
        scope=scope,
        sid=sid,
        jti=jti,
        now=now,
        ttl=ttl,
    )
    scopes = frozenset(scope.split())
    if shape == "keycloak":
        del base["client_id"]
        return {
            **base,
            "aud": "account",
            "typ": "Bearer",
            "azp": client_id,
            "session_state": sid,
            **{k: v for k, v in user_claims(user, scopes).items() if k != "groups"},
            "realm_access": {"roles": [*user.groups, KEYCLOAK_DEFAULT_ROLE]},
            "resource_access": {
                **({client_id: {"roles": list(user.roles)}} if user.roles else {}),
                "account": {"roles": list(_KEYCLOAK_ACCOUNT_ROLES)},
            },
        }
    if shape == "okta":
        return {
            "ver": 1,
            "jti": jti,
            "iss": issuer,
            "aud": "api://default",
            "iat": now,
            "exp": now + ttl,
            "cid": client_id,
            "uid": user.sub,
            "scp": scope.split(),
            "auth_time": auth_time,
            "sub": user.email,  # Okta: the login name, not the ID token's subject
            "groups": list(user.groups),
        }
    if shape == "entra":
        return {
            "aud": GRAPH_AUDIENCE,
            "iss": entra_graph_issuer(),
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": jti,
            "name": user.name,
            "oid": entra_object_id(user.sub),
            "scp": scope,
            "sub": user.sub,
            "tid": ENTRA_TENANT,
            "upn": user.email,
            "ver": "1.0",
        }
    return base


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
    shape: ClientShape = "default",
    group_overage: int = 3,
) -> dict[str, Any]:
    """OIDC Core §2 and §3.1.3.6; on refresh (§12.2) the caller passes `nonce=None`."""
    claims = _id_token_user_claims(user, scopes, shape, group_overage=group_overage)
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
