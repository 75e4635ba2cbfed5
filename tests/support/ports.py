"""Listen ports for the servers tests start, picked so that nothing else takes them first."""

from __future__ import annotations

import os
import socket

__all__ = ["free_port", "free_ports_in_a_row"]

# Listen ports come from below the kernel's ephemeral range (32768-60999 on Linux): a port the
# OS picked with bind(0) is handed to outgoing connections too, and one of those can take it
# before the process we start binds it. Each pytest process walks its own slice of this range,
# so a test run and a CI run on the same machine do not meet either.
# (Redis Cluster nodes take 10000-11999, their bus ports 20000-21999: see redis_fleet.)
_PORTS = range(22000, 32000)
_next_port = _PORTS.start + (os.getpid() * 97) % len(_PORTS)


def free_port() -> int:
    """A port no earlier call returned and nothing listens on now."""
    global _next_port
    for _ in range(len(_PORTS)):
        port = _next_port
        _next_port = _PORTS.start + (port + 1 - _PORTS.start) % len(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS}")


def free_ports_in_a_row(n: int) -> int:
    """The first of `n` consecutive free ports (the demo uses its port and the next three)."""
    for _ in range(200):
        first = free_port()
        sockets = []
        try:
            for port in range(first + 1, first + n):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {n} free ports in a row")
