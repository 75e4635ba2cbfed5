"""`server.workers: N`: N processes share the port; one supervisor, one management listener."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from tests.support.configs import config_dict
from tests.support.sidecars import SidecarProcess
from tests.support.stores import store_sections


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _workers(proc: SidecarProcess) -> list[psutil.Process]:
    return psutil.Process(proc.proc.pid).children()


def _two_workers(redis_prefix: str, upstream: str) -> dict[str, Any]:
    data = config_dict(upstream, **store_sections("redis", redis_prefix))
    data["server"].update({"workers": 2, "shutdown_grace": "5s"})
    return data


def test_workers_share_the_port_and_metrics_aggregate(
    sidecar_process: Callable[..., SidecarProcess], redis_prefix: str, tmp_path: Path
) -> None:
    """Two workers serve one port; /metrics counts every request, whichever worker took it."""
    proc = sidecar_process(_two_workers(redis_prefix, "http://127.0.0.1:9"))
    assert len(_workers(proc)) == 2
    for _ in range(40):
        status, _ = _get(proc.base + "/x")
        assert status == 502  # unreachable upstream: answered by the sidecar itself
    _, metrics = _get(proc.management + "/metrics")
    line = next(
        m for m in metrics.decode().splitlines() if m.startswith("sidecar_http_requests_total{")
    )
    assert float(line.rsplit(" ", 1)[1]) == 40
    deadline = time.monotonic() + 5  # access lines are written in batches (docs/operations.md)
    while True:
        lines = [line for line in proc.logs().splitlines() if '"sidecar.access"' in line]
        if len(lines) >= 40 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    pids = {json.loads(line).get("pid") for line in lines}
    assert len(pids) == 2, "both workers should have answered requests"


def test_sigterm_drains_every_worker(
    sidecar_process: Callable[..., SidecarProcess], redis_prefix: str
) -> None:
    """SIGTERM to the supervisor stops both workers and the whole group exits 0."""
    proc = sidecar_process(_two_workers(redis_prefix, "http://127.0.0.1:9"))
    children = _workers(proc)
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(20) == 0
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive


def test_a_dead_worker_is_replaced(
    sidecar_process: Callable[..., SidecarProcess], redis_prefix: str
) -> None:
    """A worker killed with SIGKILL is started again and readiness comes back."""
    proc = sidecar_process(_two_workers(redis_prefix, "http://127.0.0.1:9"))
    victim = _workers(proc)[0]
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pids = {p.pid for p in _workers(proc)}
        if (
            len(pids) == 2
            and victim.pid not in pids
            and _get(proc.management + "/readyz")[0] == 200
        ):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"worker not replaced: {proc.logs()[-2000:]}")
