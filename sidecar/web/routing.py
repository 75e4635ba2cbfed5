"""The front door of the main listener: one check of the request line, one canonical path,
then the sidecar endpoint or the proxy.

aiohttp's router would match on its own decoded reading of the path; here every decision is
taken on the canonical path (sidecar/forwarding/paths.py) instead, so `/oauth2/./auth` and
`//oauth2/auth` are the endpoint they spell and an upstream never receives a path the sidecar
did not check.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from sidecar.forwarding.headers import AUTHORITY
from sidecar.forwarding.paths import PATH, BadPath, canonical_path
from sidecar.web.keys import ROUTE
from sidecar.web.responses import answer_and_close, error_response

__all__ = ["Dispatcher"]

_HTTP_11: Final = (1, 1)
_VALID_HOSTS: set[str] = set()
_VALID_HOSTS_MAX: Final = 256


class Dispatcher:
    """The innermost middleware, and the only router: sidecar endpoints by exact canonical
    path and method (`*`: any; GET serves HEAD too), then by path prefix (`prefixes`, for
    `/oauth2/auth/<original path>`), else `proxy`.

    As a middleware it sees every request, including targets aiohttp's router cannot match
    (`OPTIONS *`, `CONNECT host:443`), and ignores aiohttp's own match.
    """

    __slots__ = ("_endpoints", "_prefixes", "_proxy")
    __middleware_version__ = 1  # a new-style aiohttp middleware (`@web.middleware`)

    def __init__(
        self,
        endpoints: Mapping[str, Mapping[str, Handler]],
        proxy: Handler,
        prefixes: Mapping[str, Mapping[str, Handler]] | None = None,
    ) -> None:
        def with_head(methods: Mapping[str, Handler]) -> dict[str, Handler]:
            return {**methods, **({"HEAD": methods["GET"]} if "GET" in methods else {})}

        self._endpoints = {path: with_head(methods) for path, methods in endpoints.items()}
        self._prefixes = tuple(
            (prefix, with_head(methods)) for prefix, methods in (prefixes or {}).items()
        )
        self._proxy = proxy

    def __call__(self, request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        """`handler`, aiohttp's own match, is never called.

        Not a coroutine itself: it returns the handler's, so the proxy's every suspension
        does not pass through one more frame.
        """
        problem = _framing_problem(request)
        if problem is None:
            try:
                request[PATH] = target = canonical_path(request.raw_path.partition("?")[0])
            except BadPath as exc:
                problem = str(exc)
        if problem is not None:
            return _refuse(request, problem)
        methods = self._endpoints.get(target.path)
        if methods is None:
            methods = next((m for p, m in self._prefixes if target.path.startswith(p)), None)
            if methods is None:
                return self._proxy(request)
        endpoint = methods.get(request.method) or methods.get("*")
        if endpoint is None:
            return _not_allowed(request, methods)
        return endpoint(request)


async def _not_allowed(request: web.Request, methods: Mapping[str, Handler]) -> web.Response:
    request[ROUTE] = "method_not_allowed"
    return error_response(
        request,
        405,
        "method_not_allowed",
        "this endpoint does not take that method",
        headers={"Allow": ", ".join(sorted(methods))},
    )


async def _refuse(request: web.Request, problem: str) -> web.StreamResponse:
    """400, and nothing more is read from the connection (sidecar/web/responses.py)."""
    request[ROUTE] = "refused"
    return await answer_and_close(request, error_response(request, 400, "bad_request", problem))


def _framing_problem(request: web.BaseRequest) -> str | None:
    """Why the request line or framing is refused (RFC 9112 §3.2, §6.1, §6.3), or None.

    aiohttp's parser already refuses Content-Length with Transfer-Encoding, duplicate or
    malformed lengths, obs-fold and bare CR or LF; this adds what it lets through.
    """
    if not request.raw_path.startswith("/"):
        return "the request target must be a path (origin-form)"
    headers = request.headers
    if "Transfer-Encoding" in headers:
        codings = headers.getall("Transfer-Encoding")
        if request.version < _HTTP_11:
            return "HTTP/1.0 has no Transfer-Encoding"
        if len(codings) != 1 or codings[0].strip().lower() != "chunked":
            return "only Transfer-Encoding: chunked is accepted"
    hosts = headers.getall("Host", ())
    if hosts and (len(hosts) > 1 or (hosts[0] not in _VALID_HOSTS and not _valid_host(hosts[0]))):
        return "the Host header is not one valid host"
    return None


def _valid_host(host: str) -> bool:
    """RFC 3986 §3.2.2; a deployment sees few hosts, so valid ones are kept (bounded)."""
    if AUTHORITY.fullmatch(host) is None:
        return False
    if len(_VALID_HOSTS) >= _VALID_HOSTS_MAX:
        _VALID_HOSTS.clear()
    _VALID_HOSTS.add(host)
    return True
