"""Proof Key for Code Exchange, S256 only (RFC 7636)."""

from __future__ import annotations

import base64
import hashlib
import secrets

__all__ = ["challenge_s256", "new_verifier"]


def new_verifier() -> str:
    """A 43-character code verifier with 256 bits of entropy (RFC 7636 §4.1)."""
    return secrets.token_urlsafe(32)


def challenge_s256(verifier: str) -> str:
    """`BASE64URL(SHA256(ASCII(code_verifier)))` without padding (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
