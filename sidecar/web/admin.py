"""The admin API on the management listener: list a user's sessions, end one or all of them
(docs/operations.md, "Admin API"). Off unless `admin.tokens` is configured; every call is
authenticated with one of those bearer tokens and leaves one audit log line.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Sequence
from typing import Final

from aiohttp import web
from pydantic import SecretStr

from sidecar.audit import audit
from sidecar.metrics import METRICS
from sidecar.session import SessionManager, admin

__all__ = ["ADMIN_SESSIONS", "AdminTokens", "add_admin_routes"]

log = logging.getLogger("sidecar.admin")

_MAX_VALUE: Final = 1024  # sub and iss longer than this are not anyone's

ADMIN_SESSIONS: Final = web.AppKey("admin_sessions", SessionManager)


class AdminTokens:
    """The configured tokens, kept as SHA-256 digests and compared in constant time."""

    def __init__(self, tokens: Sequence[SecretStr]) -> None:
        self._digests = [_digest(t.get_secret_value()) for t in tokens]

    def caller(self, request: web.BaseRequest) -> str | None:
        """A short fingerprint of the token presented, if it is one of ours; None otherwise."""
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        digest = _digest(presented.strip())
        matched = False
        for known in self._digests:  # every one compared: the time says nothing about which
            matched |= hmac.compare_digest(digest, known)
        return digest.hex()[:8] if matched else None


_TOKENS: Final = web.AppKey("admin_tokens", AdminTokens)


def add_admin_routes(
    app: web.Application, tokens: Sequence[SecretStr], sessions: SessionManager, issuer: str
) -> None:
    """Mount the admin API on `app` (the management application) when tokens are set."""
    if not tokens:
        return  # off: /admin/... answers 404 like any unknown path
    app[_TOKENS] = AdminTokens(tokens)
    app[ADMIN_SESSIONS] = sessions
    app[_ISSUER] = issuer
    app.router.add_get("/admin/sessions", list_sessions)
    app.router.add_delete("/admin/sessions", end_sessions)
    app.router.add_delete("/admin/sessions/{id}", end_session)


_ISSUER: Final = web.AppKey("admin_issuer", str)


async def list_sessions(request: web.Request) -> web.Response:
    """`GET /admin/sessions?sub=…[&iss=…]`: the user's live sessions, never a token."""
    caller = _authorised(request)
    iss, sub = _user(request, caller)
    found = await admin.listing(request.app[ADMIN_SESSIONS], iss, sub)
    _audit(caller, "list sessions", sub=sub, iss=iss, count=len(found))
    return web.json_response({"sessions": found}, headers={"Cache-Control": "no-store"})


async def end_sessions(request: web.Request) -> web.Response:
    """`DELETE /admin/sessions?sub=…[&iss=…]`: end every session of the user."""
    caller = _authorised(request)
    iss, sub = _user(request, caller)
    ended = await admin.end_user(request.app[ADMIN_SESSIONS], iss, sub)
    _count(request, ended)
    _audit(caller, "end sessions", sub=sub, iss=iss, count=ended)
    return web.json_response({"ended": ended}, headers={"Cache-Control": "no-store"})


async def end_session(request: web.Request) -> web.Response:
    """`DELETE /admin/sessions/<id>`: end one session by its hash; 404 if it is not live."""
    caller = _authorised(request)
    h = request.match_info["id"]
    ended = await admin.end_one(request.app[ADMIN_SESSIONS], h)
    _count(request, ended)
    _audit(caller, "end session", session=h[:43], count=ended)
    if not ended:
        raise _json_error(web.HTTPNotFound, "not_found", "no live session has this id")
    return web.Response(status=204)


def _authorised(request: web.Request) -> str:
    caller = request.app[_TOKENS].caller(request)
    if caller is None:
        _audit(None, "refused: no valid admin token", count=0)
        raise _json_error(
            web.HTTPUnauthorized,
            "unauthorized",
            "an admin token is required (Authorization: Bearer)",
            {"WWW-Authenticate": 'Bearer realm="auth-sidecar admin"'},
        )
    return caller


def _user(request: web.Request, caller: str) -> tuple[str, str]:
    sub = request.query.get("sub", "")
    iss = request.query.get("iss") or request.app[_ISSUER]
    if not sub or len(sub) > _MAX_VALUE or len(iss) > _MAX_VALUE:
        _audit(caller, "refused: no usable sub", count=0)
        raise _json_error(web.HTTPBadRequest, "invalid_request", "the query needs sub (and iss)")
    return iss, sub


def _count(request: web.Request, ended: int) -> None:
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.logouts.labels("admin").inc(ended)


def _audit(caller: str | None, action: str, *, count: int, **what: str) -> None:
    """One line per admin call: which token (its fingerprint), what, how many; and the
    same as an audit event."""
    log.info("admin: " + action, extra={"admin_token": caller, "count": count, **what})
    audit("admin", action=action, admin_token=caller, count=count, **what)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _json_error(
    kind: type[web.HTTPException],
    error: str,
    description: str,
    headers: dict[str, str] | None = None,
) -> web.HTTPException:
    return kind(
        text=f'{{"error": "{error}", "error_description": "{description}"}}',
        content_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )
