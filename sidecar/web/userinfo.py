"""`/oauth2/userinfo`: the session's identity and expiry times, for the app's own pages."""

from __future__ import annotations

from aiohttp import web

from sidecar.web.authenticate import authenticate, unauthenticated
from sidecar.web.keys import ROUTE

__all__ = ["userinfo"]


async def userinfo(request: web.Request) -> web.StreamResponse:
    """The session's identity and expiry times as JSON, or 401."""
    request[ROUTE] = "oauth2_userinfo"
    session = await authenticate(request)
    if session is None:
        return unauthenticated(request)
    record = session.record
    claims = record.claims
    return web.json_response(
        {
            "sub": record.subject,
            "email": claims.get("email"),
            "name": claims.get("name"),
            "groups": claims.get("groups", []),
            "access_token_expires_at": int(record.access_expires_at),
            "session_expires_at": int(record.expires_at),
        },
        headers={"Cache-Control": "no-store"},
    )
