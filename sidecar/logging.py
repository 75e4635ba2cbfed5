"""JSON-lines logs for application records, and the request id every line of a request shares.

The access log writes the same JSON lines by a faster path of its own (sidecar/access_log.py).
Only fields chosen here and there are written. Headers, cookies, query strings and bodies never
are, so no token or cookie value can reach a log line by accident.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import secrets
import sys
from typing import Any, Final

from aiohttp import web

__all__ = ["REQUEST_ID", "JSONFormatter", "configure_logging", "request_id_for"]

REQUEST_ID: Final = web.RequestKey("request_id", str)
# A client-supplied id is kept only if it cannot smuggle anything into a log line or header.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# LogRecord attributes that are plumbing, not content.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}
# Generated ids: a random per-process prefix and a counter. They only need to be unique, not
# secret, and a counter costs nothing where uuid4 reads the OS random source on each request.
_ID_PREFIX: Final = secrets.token_hex(6)
_id_counter = itertools.count(1)


def request_id_for(request: web.BaseRequest) -> str:
    """Take the client's `X-Request-Id` when it is well-formed, else make one."""
    given = request.headers.get("X-Request-Id", "")
    if given and _SAFE_REQUEST_ID.fullmatch(given):
        return given
    return f"{_ID_PREFIX}{next(_id_counter):020x}"  # 32 hex digits, like a uuid


class JSONFormatter(logging.Formatter):
    """One JSON object per line; `extra={...}` fields become keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    """Route every logger to stderr as JSON lines at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
