"""Encrypted server-side sessions: keyring, record, stores and the manager joining them."""

from sidecar.session.crypto import Keyring, SealError
from sidecar.session.manager import LOGIN_TTL, PendingLogin, SessionManager
from sidecar.session.memory import MemorySessionStore
from sidecar.session.record import Session, SessionRecord, new_session_id, session_hash
from sidecar.session.store import SessionStore

__all__ = [
    "LOGIN_TTL",
    "Keyring",
    "MemorySessionStore",
    "PendingLogin",
    "SealError",
    "Session",
    "SessionManager",
    "SessionRecord",
    "SessionStore",
    "new_session_id",
    "session_hash",
]
