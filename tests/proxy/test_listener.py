"""The main listener of a real `auth-sidecar run` process (server.py)."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.configs import config_dict
from tests.support.sidecars import SidecarProcess

BURST = 300  # clients connecting at once: more than aiohttp's default backlog of 128


def _established(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:  # ENOTCONN: the handshake is still pending (its SYN was dropped)
        return False
    return True


def test_a_burst_of_connections_waits_in_the_queue(
    sidecar_process: Callable[..., SidecarProcess],
) -> None:
    """300 clients that connect while the sidecar is not accepting all complete the handshake.

    The kernel queues them for the sidecar; with aiohttp's default backlog the queue holds
    129 and every other client's SYN is dropped and retried a second later.
    """
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert somaxconn >= BURST, f"net.core.somaxconn={somaxconn} caps every listen backlog"
    sidecar = sidecar_process(config_dict())
    host, port = sidecar.config["server"]["listen"].rsplit(":", 1)
    clients: list[socket.socket] = []
    os.kill(sidecar.proc.pid, signal.SIGSTOP)  # nothing accepts: only the queue holds them
    try:
        for _ in range(BURST):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex((host, int(port)))
            clients.append(client)
        time.sleep(0.3)  # a loopback handshake takes microseconds; a SYN retry takes 1 s
        established = sum(_established(c) for c in clients)
    finally:
        os.kill(sidecar.proc.pid, signal.SIGCONT)
        for client in clients:
            client.close()
    assert established == BURST
