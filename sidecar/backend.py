"""Where sessions, refresh locks and session events live: memory or Redis, picked once.

`session.store` names the backend; each store brings the locks and events that share its state
(`SessionStore.backend()`), so nothing else in the sidecar asks which one it got. The only
module outside sidecar/redis/ that names a Redis class, and only when Redis is configured
(docs/architecture.md, "Sessions and Redis").
"""

from __future__ import annotations

from sidecar.config import Config
from sidecar.session.memory import MemorySessionStore
from sidecar.session.store import Backend, SessionStore

__all__ = ["Backend", "open_backend"]


def open_backend(config: Config, store: SessionStore | None = None) -> Backend:
    """The backend `config.session.store` names, or the one that goes with `store` (tests
    share one store between apps). Nothing is contacted yet; the caller closes `store`."""
    if store is None:
        store = _configured_store(config)
    return store.backend()


def _configured_store(config: Config) -> SessionStore:
    if config.session.store == "memory":
        return MemorySessionStore()
    # Imported here: sidecar.redis.store imports this module, and a memory setup never
    # loads redis-py.
    from sidecar.redis.store import RedisSessionStore

    return RedisSessionStore.from_config(config.redis)
