"""`auth-sidecar demo` as a real process, for the demo's tests and its browser test."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.ports import free_ports_in_a_row
from tests.support.processes import stop_process
from tests.support.sidecars import console_script

__all__ = ["running_demo"]


@contextmanager
def running_demo(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A started (not yet ready) `auth-sidecar demo --port P`: P, and the file its output
    goes to. The demo uses P to P+3; the process is stopped on exit."""
    port = free_ports_in_a_row(4)
    out = tmp_path / "demo.log"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            [console_script(), "demo", "--port", str(port)], stdout=log, stderr=log
        )
    try:
        yield port, out
    finally:
        stop_process(proc, 15)
