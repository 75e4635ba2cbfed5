"""The IdP's RS256 signing keys: one signs, every non-retired one verifies (RFC 7517)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from joserfc.jwt import Token

__all__ = ["ALGORITHM", "SigningKeys"]

ALGORITHM = "RS256"  # OIDC Core §15.1: the one algorithm every RP must support
_KEY_SIZE = 2048


class SigningKeys:
    """A key ring: the newest key signs; older kids stay published until retired."""

    def __init__(self) -> None:
        self._keys: list[RSAKey] = []
        self.rotate()

    @property
    def current_kid(self) -> str:
        """The kid of the key that signs new tokens."""
        kid = self._keys[-1].kid
        assert kid is not None
        return kid

    def kids(self) -> list[str]:
        """Every kid published in the JWKS, oldest first."""
        return [k.kid for k in self._keys if k.kid is not None]

    def rotate(self) -> str:
        """Make a new key (kid = RFC 7638 thumbprint) the signer; return its kid."""
        key = RSAKey.generate_key(_KEY_SIZE, parameters={"use": "sig", "alg": ALGORITHM})
        key.ensure_kid()
        self._keys.append(key)
        return self.current_kid

    def retire(self, kid: str) -> None:
        """Drop a key from the JWKS; tokens it signed stop verifying. The signer cannot go."""
        if kid == self.current_kid:
            raise ValueError("cannot retire the current signing key; rotate first")
        self._keys = [k for k in self._keys if k.kid != kid]

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set (RFC 7517 §5), private members never included."""
        return dict(KeySet(list(self._keys)).as_dict(private=False))

    def sign(self, claims: Mapping[str, Any], typ: str = "JWT") -> str:
        """A compact JWS over `claims`, with `kid` in the header (RFC 7515 §4.1.4)."""
        header = {"alg": ALGORITHM, "kid": self.current_kid, "typ": typ}
        return jwt.encode(header, dict(claims), self._keys[-1], algorithms=[ALGORITHM])

    def verify(self, token: str) -> Token:
        """Check the signature against the published keys; claims are checked by the caller.

        Raises a `joserfc.errors.JoseError` (or `ValueError` for garbage) when it fails.
        """
        return jwt.decode(token, KeySet(list(self._keys)), algorithms=[ALGORITHM])
