"""Short, clear error answers: HTML for a browser navigation, JSON for everything else.

Bodies never echo request data, so nothing a client sent (tokens, cookies) is reflected.
"""

from __future__ import annotations

import html
import json
from http import HTTPStatus

from aiohttp import web

__all__ = ["answer_and_close", "error_response", "is_navigation"]

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{status} {title}</title></head>
<body><h1>{title}</h1><p>{message}</p></body></html>
"""


def is_navigation(request: web.BaseRequest) -> bool:
    """A browser loading a page, rather than a script or API client (docs/architecture.md,
    "Failure policy")."""
    mode = request.headers.get("Sec-Fetch-Mode")
    if mode is not None:
        return mode == "navigate" and request.headers.get("Sec-Fetch-Dest", "document") in (
            "document",
            "iframe",
        )
    if request.method not in ("GET", "HEAD"):
        return False
    return _prefers_html(request.headers.get("Accept", ""))


def _prefers_html(accept: str) -> bool:
    best_html = best_other = 0.0
    for item in accept.split(","):
        media, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        if media in ("text/html", "application/xhtml+xml"):
            best_html = max(best_html, q)
        elif media:
            best_other = max(best_other, q if media != "*/*" else q - 0.001)
    return best_html > 0 and best_html >= best_other


def error_response(
    request: web.BaseRequest,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error page or JSON body; `code` is a stable machine-readable identifier."""
    extra = {"Cache-Control": "no-store", **(headers or {})}
    if is_navigation(request):
        try:
            title = HTTPStatus(status).phrase
        except ValueError:
            title = "Error"
        body = _PAGE.format(status=status, title=html.escape(title), message=html.escape(message))
        return web.Response(status=status, text=body, content_type="text/html", headers=extra)
    return web.Response(
        status=status,
        text=json.dumps({"error": code, "message": message}),
        content_type="application/json",
        headers=extra,
    )


async def answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send `response`, then close the connection at once, reading nothing more from it.

    For a request whose framing is in doubt (RFC 9112 §6.3) or whose body stalled: aiohttp
    would otherwise linger up to 10 s reading the rest of a body that may never come.
    """
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # closes the transport after what was written
    return response
