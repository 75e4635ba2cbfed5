"""JSON-lines logs: application records and one access record per request.

Only fields chosen here are written. Headers, cookies, query strings and bodies never are,
so no token or cookie value can reach a log line by accident.
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
from aiohttp.abc import AbstractAccessLogger

from sidecar.forwarding.paths import PATH

__all__ = ["REQUEST_ID", "AccessLogger", "JSONFormatter", "configure_logging", "request_id_for"]

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


class AccessLogger(AbstractAccessLogger):
    """Writes method, path (without query), status, size, duration and request id.

    The path is the canonical one every decision was taken on (docs/security.md); a request
    refused before it had one logs its raw path, cut to 256 characters."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_: float) -> None:
        self.logger.info(
            "request",
            extra={
                "request_id": request.get(REQUEST_ID, ""),
                "method": request.method,
                "path": canonical.path
                if (canonical := request.get(PATH)) is not None
                else request.raw_path.partition("?")[0][:256],
                "status": response.status,
                "bytes": response.body_length,
                "duration_ms": round(time_ * 1000, 2),
                "remote": request.remote,
                "user_agent": request.headers.get("User-Agent", "")[:256],
            },
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
