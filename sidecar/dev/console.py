"""The demo's terminal: one human line per login, refresh, logout and access denial.

`auth-sidecar run` logs JSON lines for machines; someone trying the demo wants to watch the
story instead: "18:06:32  refresh  alice  refreshed (412 ms)". Warnings and errors still
show; `demo --verbose` restores the JSON lines and the access log.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Final

__all__ = ["configure_demo_logging"]

_STORY: Final = frozenset({"login", "refresh", "logout", "access denied"})


class _Story(logging.Filter):
    """The story's events, and anything that went wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "sidecar.audit":  # the same events again, for machines
            return False
        return record.levelno >= logging.WARNING or record.getMessage() in _STORY


class _Human(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        at = time.strftime("%H:%M:%S", time.localtime(record.created))
        user = getattr(record, "user", "")
        event = record.getMessage()
        detail = ""
        if event == "refresh":
            detail = f"{getattr(record, 'outcome', '')} ({getattr(record, 'duration_ms', '?')} ms)"
        elif event == "access denied":
            detail = f"at {getattr(record, 'scope', '')} (403)"
        elif record.levelno >= logging.WARNING:
            error = getattr(record, "error", "")
            detail = f"[{record.levelname.lower()}] {error}".strip()
        return "  ".join(part for part in (at, f"{event:<13}", user, detail) if part)


def configure_demo_logging() -> None:
    """Human lines on stderr for the story's events; everything else stays quiet."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Story())
    handler.setFormatter(_Human())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
