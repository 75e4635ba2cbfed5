"""Rotation-safe token refresh: single-flight per session, Redis lock, fenced writes."""

from sidecar.refresh.events import Events, MemoryEvents, RedisEvents
from sidecar.refresh.locks import Locks, MemoryLocks, RedisLocks
from sidecar.refresh.outcomes import Outcome
from sidecar.refresh.protocol import Refresher, refresh_window

__all__ = [
    "Events",
    "Locks",
    "MemoryEvents",
    "MemoryLocks",
    "Outcome",
    "RedisEvents",
    "RedisLocks",
    "Refresher",
    "refresh_window",
]
