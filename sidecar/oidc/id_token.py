"""ID-token validation (OIDC Core §3.1.3.7 and §12.2), pure: keys and time come in.

Signature and JSON with joserfc against an explicit algorithm allow-list; claims with
authlib's `CodeIDToken` rules, which we ask to check `iss` and `aud` (it does not unless
asked), plus `exp`/`iat` with a small leeway, `nonce`, `azp` and `at_hash`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Final

from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet

from sidecar.config.types import ASYMMETRIC_ALGORITHMS
from sidecar.errors import InvalidIDToken

__all__ = ["ALLOWED_ALGORITHMS", "UnknownKeyId", "validate_id_token"]

ALLOWED_ALGORITHMS: Final = ASYMMETRIC_ALGORITHMS
LEEWAY: Final = 60  # seconds of clock skew tolerated on exp/iat


class UnknownKeyId(InvalidIDToken):
    """The token names a `kid` the cached key set lacks: refetch the JWKS once and retry."""


def validate_id_token(
    token: str,
    keys: KeySet,
    *,
    issuer: str,
    client_id: str,
    now: float,
    algorithms: Collection[str],
    nonce: str | None = None,
    access_token: str | None = None,
    expect_subject: str | None = None,
) -> dict[str, Any]:
    """Return the claims of a valid ID token, or raise `InvalidIDToken` saying what failed."""
    allowed = [a for a in algorithms if a in ALLOWED_ALGORITHMS]
    if not allowed:
        raise InvalidIDToken("no acceptable signing algorithm")
    try:
        decoded = jwt.decode(token, keys, algorithms=allowed)
    except InvalidKeyIdError as exc:
        raise UnknownKeyId("ID token signed with an unknown key") from exc
    except (JoseError, ValueError) as exc:
        raise InvalidIDToken(f"ID token rejected: {type(exc).__name__}") from exc

    claims = CodeIDToken(
        decoded.claims,
        decoded.header,
        options={
            "iss": {"essential": True, "value": issuer},
            "aud": {"essential": True, "value": client_id},
            "sub": {"essential": True},
        },
        params={"nonce": nonce, "client_id": client_id, "access_token": access_token},
    )
    try:
        claims.validate(now=int(now), leeway=LEEWAY)
    except JoseError as exc:
        claim = getattr(exc, "claim", "") or type(exc).__name__
        raise InvalidIDToken(f"ID token claim check failed: {claim}") from exc
    if nonce is not None and "nonce" not in claims:
        raise InvalidIDToken("ID token claim check failed: nonce")
    if expect_subject is not None and claims.get("sub") != expect_subject:
        raise InvalidIDToken("ID token claim check failed: sub")  # §12.2
    return dict(claims)
