"""Rotation-safe token refresh: single-flight per session, per-session lock, fenced writes.

The locks and events it relies on are storage (sidecar/session/store.py); sidecar/backend.py
picks the memory or the Redis ones.
"""

from sidecar.refresh.outcomes import Outcome
from sidecar.refresh.protocol import Refresher, RefreshTiming, refresh_window

__all__ = ["Outcome", "RefreshTiming", "Refresher", "refresh_window"]
