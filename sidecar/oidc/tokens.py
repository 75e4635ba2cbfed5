"""What the sidecar keeps from a token response: user claims and the access token's lifetime."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from joserfc.errors import JoseError
from joserfc.jws import extract_compact

from sidecar.oidc.client import TokenResponse

__all__ = ["access_token_lifetime", "user_claims"]

DEFAULT_ACCESS_TTL: Final = 3600.0  # neither expires_in nor a JWT exp: assume an hour
# ID-token claims about the token itself, not the user: not kept in the session.
_TOKEN_CLAIMS: Final = frozenset(
    {"iss", "aud", "exp", "iat", "nbf", "nonce", "at_hash", "c_hash", "azp", "jti", "auth_time"}
)


def user_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
    """The claims that describe the user (`sub`, email, groups …), for headers and rules."""
    return {k: v for k, v in claims.items() if k not in _TOKEN_CLAIMS}


def access_token_lifetime(tokens: TokenResponse, now: float) -> float:
    """Seconds the access token lives: `expires_in`, else its JWT `exp` (DESIGN §5 step 6).

    The JWT is not verified: its `exp` only schedules our next refresh.
    """
    if tokens.expires_in:
        return tokens.expires_in
    try:
        exp = json.loads(extract_compact(tokens.access_token.encode()).payload).get("exp")
    except (JoseError, ValueError, AttributeError):
        return DEFAULT_ACCESS_TTL
    if isinstance(exp, int | float) and not isinstance(exp, bool) and exp > now:
        return float(exp) - now
    return DEFAULT_ACCESS_TTL
