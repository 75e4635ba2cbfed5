"""Audit events: one JSON line per login, logout, refresh outcome, access denial and admin
action, on a logger of their own (`sidecar.audit`) so operators can route them to a SIEM
(docs/operations.md, "Audit events"). Never a token, cookie or session id: the session is
named by its hash, the user by issuer and subject.
"""

from __future__ import annotations

import logging

__all__ = ["audit"]

log = logging.getLogger("sidecar.audit")


def audit(
    event: str,
    *,
    session: str | None = None,
    iss: str | None = None,
    sub: str | None = None,
    client_ip: str | None = None,
    request_id: str | None = None,
    **detail: str | int | None,
) -> None:
    """Write one audit line; `detail` adds event-specific fields (kind, outcome, scope …)."""
    if not log.isEnabledFor(logging.INFO):
        return
    log.info(
        event,
        extra={
            "event": event,
            "session": session,
            "iss": iss,
            "sub": sub,
            "client_ip": client_ip,
            "request_id": request_id,
            **detail,
        },
    )
