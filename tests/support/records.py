"""Session records for the tests that put a session into a store directly, without a login."""

from __future__ import annotations

import time

from sidecar.session import SessionRecord

__all__ = ["ACCESS", "REFRESH", "record"]

ACCESS = "access-token-" + "x" * 40
REFRESH = "refresh-token-" + "y" * 40


def record(**changes: object) -> SessionRecord:
    """Alice's valid session (5 min access token, 1 h session); `changes` replace fields."""
    now = time.time()
    base = SessionRecord(
        issuer="https://idp.example",
        subject="alice",
        idp_session_id="sid-1",
        claims={"email": "alice@example.com", "groups": ["admins"]},
        access_token=ACCESS,
        access_expires_at=now + 300,
        refresh_token=REFRESH,
        refresh_expires_at=None,
        id_token="id.token.value",
        created_at=now,
        refreshed_at=now,
        expires_at=now + 3600,
    )
    return base.evolve(**changes)
