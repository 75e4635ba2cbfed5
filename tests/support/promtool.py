"""Prometheus' promtool, from Debian's `prometheus` package (`.ci/run` installs it).

A missing promtool fails the test when `CI` is set and skips it otherwise, naming the
package. It runs with no network and no state: `check rules` and `test rules` only read
the files they are given.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = ["run_promtool"]

_PACKAGE = "apt-get install prometheus (what .ci/run does)"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    message = f"promtool is not installed: {_PACKAGE}"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must provide it", pytrace=False)
    pytest.skip(message)


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`promtool ARGS…`; its exit status is the caller's to check (its output says why)."""
    return subprocess.run(
        [_promtool(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
