"""What the sidecar keeps from a token response: user claims and the access token's lifetime."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from joserfc.errors import JoseError
from joserfc.jws import extract_compact

from sidecar.oidc.client import TokenResponse

__all__ = ["access_token_expiry", "user_claims"]

DEFAULT_ACCESS_TTL: Final = 3600.0  # neither expires_in nor a JWT exp: assume an hour
# ID-token claims about the token itself, not the user: not kept in the session.
_TOKEN_CLAIMS: Final = frozenset(
    {"iss", "aud", "exp", "iat", "nbf", "nonce", "at_hash", "c_hash", "azp", "jti", "auth_time"}
)


def user_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
    """The claims that describe the user (`sub`, email, groups …), for headers and rules."""
    return {k: v for k, v in claims.items() if k not in _TOKEN_CLAIMS}


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
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return None
