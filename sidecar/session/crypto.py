"""AES-256-GCM envelopes under per-session keys (docs/sessions.md).

Each record is sealed under `HKDF-SHA256(master key, info = session id)`. The raw session
id lives only in the browser's cookie, so a Redis dump, even with the master keys, opens
nothing. Envelope: `fmt(1) | key id(1) | nonce(12) | ciphertext`, associated data
`fmt | key id | h`, binding the blob to its Redis key.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Sequence
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["Keyring", "SealError"]

_FORMAT: Final = 1
_NONCE_BYTES: Final = 12  # GCM's native nonce size; random nonces are safe for few seals per key
_HEADER: Final = 2 + _NONCE_BYTES


class SealError(Exception):
    """An envelope that this keyring cannot open: tampered, truncated or under an unknown key."""


class Keyring:
    """Master keys: the first seals, every one opens (rotation)."""

    __slots__ = ("_keys",)

    def __init__(self, master_keys: Sequence[bytes]) -> None:
        if not master_keys:
            raise ValueError("at least one master key is required")
        if any(len(k) != 32 for k in master_keys):
            raise ValueError("master keys must be 32 bytes")
        self._keys = tuple((_key_id(k), k) for k in master_keys)

    @classmethod
    def from_base64(cls, keys: Sequence[str]) -> Keyring:
        return cls([base64.b64decode(k) for k in keys])

    @property
    def current_key_id(self) -> int:
        return self._keys[0][0]

    def seal(self, secret: bytes, binding: bytes, plaintext: bytes) -> bytes:
        """Encrypt under the key derived from `secret`; `binding` (the Redis key hash) is AAD."""
        key_id, master = self._keys[0]
        header = bytes((_FORMAT, key_id))
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(_derive(master, secret)).encrypt(nonce, plaintext, header + binding)
        return header + nonce + sealed

    def open(self, secret: bytes, binding: bytes, envelope: bytes) -> tuple[bytes, bool]:
        """Decrypt; also say whether the envelope is under an older key and wants resealing."""
        if len(envelope) < _HEADER + 16 or envelope[0] != _FORMAT:
            raise SealError("not a sealed record")
        key_id = envelope[1]
        nonce, body = envelope[2:_HEADER], envelope[_HEADER:]
        for candidate_id, master in self._keys:
            if candidate_id != key_id:
                continue
            try:
                plain = AESGCM(_derive(master, secret)).decrypt(nonce, body, envelope[:2] + binding)
            except InvalidTag:
                continue
            return plain, candidate_id != self.current_key_id or master is not self._keys[0][1]
        raise SealError("record does not open under any configured key")


def _key_id(master: bytes) -> int:
    """One byte naming the master key; a stable hash so reordering keys changes nothing."""
    return hashlib.sha256(b"auth-sidecar key id" + master).digest()[0]


def _derive(master: bytes, secret: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"auth-sidecar v1 " + secret
    ).derive(master)
