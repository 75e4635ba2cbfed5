"""The session record kept (encrypted) in the store, and the ids that name it."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final, Self

from sidecar.oidc.client import TokenResponse
from sidecar.oidc.tokens import access_token_expiry, refreshed_claims, user_claims

__all__ = ["RECORD_FORMAT", "Session", "SessionRecord", "new_session_id", "session_hash"]

RECORD_FORMAT: Final = 1
# Records are stored deflated: JSON field names and base64 tokens shrink by about a third,
# which brings Redis memory per session below the raw token bytes (issue 7). The only
# content an attacker controls (own claims) sits in their own record, sealed under its own
# key, so the compressed length reveals nothing about anyone else's secrets.
_ZLIB_LEVEL: Final = 6
_ID_BYTES: Final = 32  # 256-bit session ids (docs/sessions.md)


def new_session_id() -> str:
    """A fresh random session id, URL-safe base64 without padding (43 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(_ID_BYTES)).rstrip(b"=").decode()


def session_hash(session_id: str) -> str:
    """`h`: what Redis sees instead of the id — base64url(sha256(id))."""
    digest = hashlib.sha256(session_id.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One login's token set and identity. Times are Unix seconds."""

    issuer: str
    subject: str
    idp_session_id: str | None
    claims: dict[str, Any]
    access_token: str
    access_expires_at: float
    refresh_token: str | None
    refresh_expires_at: float | None
    id_token: str | None
    created_at: float
    refreshed_at: float
    expires_at: float  # absolute end: lifetime cap, refresh-token expiry
    version: int = 1
    next_attempt_at: float | None = None
    failed_attempts: int = 0  # consecutive transient refresh failures (backoff exponent)
    # The session's absolute cap (login + session.lifetime); None in records stored before it
    # was kept, whose end then never moves later.
    lifetime_ends_at: float | None = None
    fmt: int = field(default=RECORD_FORMAT)

    def to_bytes(self) -> bytes:
        return zlib.compress(json.dumps(asdict(self), separators=(",", ":")).encode(), _ZLIB_LEVEL)

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        try:
            raw = json.loads(data if data[:1] == b"{" else zlib.decompress(data))
        except zlib.error as exc:
            raise ValueError("session record does not inflate") from exc
        if not isinstance(raw, dict) or raw.get("fmt") != RECORD_FORMAT:
            raise ValueError("unknown session record format")
        return cls(**raw)

    @classmethod
    def from_login(
        cls,
        tokens: TokenResponse,
        id_claims: dict[str, Any],
        *,
        requested_at: float,
        now: float,
        lifetime: float,
    ) -> Self:
        """A new session's record from the code exchange's tokens and validated ID-token
        claims (`requested_at`: when the token request left; `lifetime`: the session cap).

        The session ends at the earliest of its lifetime, the refresh token's expiry, or,
        without a refresh token, the access token's.
        """
        access_expires = access_token_expiry(tokens, requested_at)
        expires_at = now + lifetime
        refresh_expires = None
        if tokens.refresh_token is None:
            expires_at = min(expires_at, access_expires)
        elif tokens.refresh_expires_in:
            refresh_expires = requested_at + tokens.refresh_expires_in
            expires_at = min(expires_at, refresh_expires)
        sid = id_claims.get("sid")
        return cls(
            issuer=str(id_claims["iss"]),
            subject=str(id_claims["sub"]),
            idp_session_id=sid if isinstance(sid, str) else None,
            claims=user_claims(id_claims),
            access_token=tokens.access_token,
            access_expires_at=access_expires,
            refresh_token=tokens.refresh_token,
            refresh_expires_at=refresh_expires,
            id_token=tokens.id_token,
            created_at=now,
            refreshed_at=requested_at,
            expires_at=expires_at,
            lifetime_ends_at=now + lifetime,
        )

    def rotated(
        self,
        tokens: TokenResponse,
        id_claims: dict[str, Any] | None,
        requested_at: float,
        *,
        access_claims: Mapping[str, Any] | None = None,
        previous_access_claims: Mapping[str, Any] | None = None,
    ) -> SessionRecord:
        """The next version after a refresh grant: new tokens (an IdP that returns no new
        refresh or ID token keeps the old one valid), the session's end set by a new
        `refresh_expires_in` (an IdP's idle timeout, renewed by each refresh: Keycloak), never
        past the session's lifetime, and the failure backoff reset.

        Claims: those of a new ID token if any over the session's (its ID-token and userinfo
        claims stay without one), with what the old access token alone gave
        (`previous_access_claims`, its verified claims) replaced by what the new one gives
        (`access_claims`; None: it does not verify, and gives nothing).
        """
        refresh_expires = self.refresh_expires_at
        expires_at = self.expires_at
        if tokens.refresh_expires_in:
            refresh_expires = requested_at + tokens.refresh_expires_in
            cap = self.lifetime_ends_at if self.lifetime_ends_at is not None else expires_at
            expires_at = min(cap, refresh_expires)
        claims = refreshed_claims(
            self.claims,
            id_token=self.id_token,
            previous_access=previous_access_claims,
            id_claims=id_claims,
            access_claims=access_claims,
        )
        return replace(
            self,
            version=self.version + 1,
            access_token=tokens.access_token,
            access_expires_at=access_token_expiry(tokens, requested_at),
            refresh_token=tokens.refresh_token or self.refresh_token,
            refresh_expires_at=refresh_expires,
            id_token=tokens.id_token or self.id_token,
            claims=claims,
            refreshed_at=requested_at,
            expires_at=expires_at,
            next_attempt_at=None,
            failed_attempts=0,
        )

    def evolve(self, **changes: Any) -> SessionRecord:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Session:
    """A loaded session: the id from the cookie, its hash, and the decrypted record."""

    id: str
    h: str
    record: SessionRecord

    def with_record(self, record: SessionRecord) -> Session:
        return Session(self.id, self.h, record)
