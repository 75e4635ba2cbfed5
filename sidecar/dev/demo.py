"""`auth-sidecar demo`: dev IdP + echo upstream + the sidecar with the memory store, one command.

Everything binds to 127.0.0.1 only. The dev IdP is for trying the sidecar out, never for
protecting anything.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import secrets
import socket
import sys
import time
from typing import Final

from aiohttp import web
from joserfc.errors import JoseError
from joserfc.jws import extract_compact

from sidecar.config import Config
from sidecar.dev.idp import DevClient, DevIdP, default_users
from sidecar.server import serve

__all__ = ["DemoPortBusy", "demo_config", "run_demo"]

log = logging.getLogger("sidecar.dev.demo")

_HOST: Final = "127.0.0.1"  # loopback only, whatever else is configured
ACCESS_TOKEN_TTL: Final = 30.0  # short, so refreshes can be watched on the page
_PORTS: Final = 4  # the sidecar, the dev IdP, the echo app, the management listener


def demo_config(port: int, client_secret: str) -> Config:
    """The sidecar's configuration for the demo: IdP on port+1, echo app on port+2."""
    base = f"http://{_HOST}:{port}"
    return Config.model_validate(
        {
            "server": {"listen": f"{_HOST}:{port}", "public_url": base},
            "management": {"listen": f"{_HOST}:{port + 3}"},
            "oidc": {
                "issuer": f"http://{_HOST}:{port + 1}",
                "client_id": "demo",
                "client_secret": client_secret,
                "scopes": ["openid", "email", "profile", "offline_access"],
                "post_logout_redirect_url": base + "/",
            },
            "session": {
                "store": "memory",
                "cookie_name": "sidecar_demo",  # no __Host- prefix: plain HTTP on loopback
                "cookie_secure": False,
                "encryption_keys": [base64.b64encode(secrets.token_bytes(32)).decode()],
            },
            "upstreams": [
                {"path": "/", "url": f"http://{_HOST}:{port + 2}"},
                # Only the `admins` group (alice): bob and carol see the designed 403.
                {
                    "path": "/admin",
                    "url": f"http://{_HOST}:{port + 2}",
                    "access": {"allowed_groups": ["admins"]},
                },
            ],
            "refresh": {"before_expiry": "10s"},
            "logging": {"level": "info"},
        }
    )


async def run_demo(port: int = 4180) -> None:
    """Start the three parts and serve until Ctrl-C."""
    busy = _busy_ports(range(port, port + _PORTS))
    if busy:
        raise DemoPortBusy(port, busy)
    secret = secrets.token_urlsafe(24)
    config = demo_config(port, secret)
    idp = DevIdP(
        config.oidc.issuer,
        clients={
            "demo": DevClient(
                client_id="demo",
                client_secret=secret,
                redirect_uris=(config.server.public_url + "/oauth2/callback",),
                post_logout_redirect_uris=(config.server.public_url + "/",),
            )
        },
        users=default_users(),
        access_token_ttl=ACCESS_TOKEN_TTL,
    )
    # No access lines from the dev IdP and the echo app: their query strings carry codes and
    # ID tokens, and the sidecar's own lines tell the story.
    runners = [
        web.AppRunner(idp.app(), access_log=None),
        web.AppRunner(echo_app(), access_log=None),
    ]
    for runner, part_port in zip(runners, (port + 1, port + 2), strict=True):
        await runner.setup()
        await web.TCPSite(runner, _HOST, part_port).start()
    print(
        "\n  auth-sidecar demo — development only, listening on 127.0.0.1\n"
        f"  open  {config.server.public_url}/   (log in as alice, bob or carol)\n"
        f"  dev IdP {config.oidc.issuer}   echo app http://{_HOST}:{port + 2}"
        f"   metrics http://{_HOST}:{port + 3}/metrics\n",
        file=sys.stderr,
        flush=True,
    )
    try:
        await serve(config)
    finally:
        for runner in runners:
            await runner.cleanup()


class DemoPortBusy(Exception):
    """A port the demo needs is taken: said in one line, without a traceback."""

    def __init__(self, port: int, busy: list[int]) -> None:
        taken = ", ".join(str(p) for p in busy)
        free = max(busy) + 1
        super().__init__(
            f"auth-sidecar demo: port {taken} on {_HOST} is in use (the demo uses {port} to "
            f"{port + _PORTS - 1}); try `auth-sidecar demo --port {free}`"
        )


def _busy_ports(ports: range) -> list[int]:
    """The ports among `ports` that cannot be bound on the loopback address now."""
    busy = []
    for candidate in ports:
        with socket.socket() as probe:
            try:
                probe.bind((_HOST, candidate))
            except OSError:
                busy.append(candidate)
    return busy


def echo_app() -> web.Application:
    """An upstream that shows who the sidecar says you are and what it received."""
    app = web.Application()
    app.router.add_get("/api/whoami", _whoami)
    app.router.add_route("*", "/{tail:.*}", _page)
    return app


def _token_seconds_left(authorization: str) -> float | None:
    token = authorization.removeprefix("Bearer ").strip()
    try:
        exp = json.loads(extract_compact(token.encode()).payload).get("exp")
    except (JoseError, ValueError, AttributeError):
        return None
    return round(float(exp) - time.time(), 1) if isinstance(exp, int | float) else None


def _identity(request: web.Request) -> dict[str, object]:
    return {
        "user": request.headers.get("X-Forwarded-User"),
        "email": request.headers.get("X-Forwarded-Email"),
        "groups": request.headers.get("X-Forwarded-Groups"),
        "token_seconds_left": _token_seconds_left(request.headers.get("Authorization", "")),
    }


async def _whoami(request: web.Request) -> web.Response:
    return web.json_response(_identity(request))


async def _page(request: web.Request) -> web.Response:
    who = _identity(request)
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(_shown(k, v))}</code></td></tr>"
        for k, v in request.headers.items()
    )
    body = _PAGE.format(
        user=html.escape(str(who["user"] or "")),
        email=html.escape(str(who["email"] or "none")),
        groups=html.escape(str(who["groups"] or "none")),
        left=html.escape(str(who["token_seconds_left"])),
        rows=rows,
    )
    return web.Response(text=body, content_type="text/html")


def _shown(name: str, value: str) -> str:
    # The demo shows that a token arrived, not the token itself.
    if name.lower() == "authorization" and len(value) > 20:
        return value[:19] + "… (" + str(len(value)) + " characters)"
    return value


_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>auth-sidecar demo</title>
<style>body{{font-family:system-ui;margin:2rem;max-width:60rem}}
th{{text-align:left;padding-right:1rem}}td code{{word-break:break-all}}</style></head>
<body><h1>Hello, <span id="user">{user}</span></h1>
<p>email <b>{email}</b>, groups <b>{groups}</b></p>
<p>access token expires in <b id="left">{left}</b> s
(background API call every 5 s: <span id="api">waiting</span>)</p>
<form method="post" action="/oauth2/sign_out"><button type="submit">Sign out</button></form>
<h2>Headers the app received</h2><table>{rows}</table>
<script>
async function poll() {{
  try {{
    const r = await fetch("/api/whoami", {{headers: {{Accept: "application/json"}}}});
    const body = await r.json();
    document.getElementById("api").textContent = r.status + " at " +
      new Date().toLocaleTimeString();
    if (r.ok) document.getElementById("left").textContent = body.token_seconds_left;
  }} catch (e) {{ document.getElementById("api").textContent = "failed: " + e; }}
}}
setInterval(poll, 5000); poll();
</script></body></html>
"""
