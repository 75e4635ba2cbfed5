"""Rotation-safe token refresh: single-flight per session, per-session lock, fenced writes.

The lock and event protocols with their in-process twins live here; the Redis ones in
sidecar/redis/, and sidecar/backend.py picks the pair that goes with the session store.
"""

from sidecar.refresh.events import Events, MemoryEvents
from sidecar.refresh.locks import Locks, MemoryLocks
from sidecar.refresh.outcomes import Outcome
from sidecar.refresh.protocol import Refresher, RefreshTiming, refresh_window

__all__ = [
    "Events",
    "Locks",
    "MemoryEvents",
    "MemoryLocks",
    "Outcome",
    "RefreshTiming",
    "Refresher",
    "refresh_window",
]
