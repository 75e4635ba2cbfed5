"""Session administration shared by the admin API and the `auth-sidecar sessions` command:
a user's sessions as operators see them, and ending them (docs/operations.md)."""

from __future__ import annotations

import re
from typing import Any, Final

from sidecar.session.manager import SessionInfo, SessionManager, user_ref

__all__ = ["end_one", "end_user", "listing"]

_HASH: Final = re.compile(r"[A-Za-z0-9_-]{43}")  # a session hash, as `listing` shows it


async def listing(sessions: SessionManager, iss: str, sub: str) -> list[dict[str, Any]]:
    """The user's live sessions: ids (hashes), identities and times, never a token."""
    return [_shown(info) for info in await sessions.sessions_of_user(iss, sub)]


async def end_user(sessions: SessionManager, iss: str, sub: str) -> int:
    """End every session of one user; how many were live."""
    found = await sessions.sessions_of_user(iss, sub)
    return await sessions.end(found, listed_under=user_ref(iss, sub))


async def end_one(sessions: SessionManager, h: str) -> int:
    """End one session by its id (hash): 1 if it was live, else 0."""
    if not _HASH.fullmatch(h):
        return 0
    return await sessions.end(await sessions.describe([h]))


def _shown(info: SessionInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "iss": info.iss,
        "sub": info.sub,
        "sid": info.sid,
        "created_at": info.created_at,
        "last_refresh_at": info.last_refresh_at,
        "expires_at": info.expires_at,
    }
