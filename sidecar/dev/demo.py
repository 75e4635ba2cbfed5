"""`auth-sidecar demo`: dev IdP + demo app + the sidecar with the memory store, one command.

Everything binds to 127.0.0.1 only. The dev IdP is for trying the sidecar out, never for
protecting anything.
"""

from __future__ import annotations

import base64
import logging
import secrets
import socket
import sys
from typing import Final

from aiohttp import web

from sidecar.config import Config
from sidecar.dev.demo_app import demo_app
from sidecar.dev.idp import DevClient, DevIdP, default_users
from sidecar.server import serve

__all__ = ["DemoPortBusy", "demo_config", "run_demo"]

log = logging.getLogger("sidecar.demo")

_HOST: Final = "127.0.0.1"  # loopback only, whatever else is configured
ACCESS_TOKEN_TTL: Final = 30.0  # short, so refreshes can be watched on the page
_PORTS: Final = 4  # the sidecar, the dev IdP, the echo app, the management listener


def demo_config(port: int, client_secret: str, *, access_log: bool = False) -> Config:
    """The sidecar's configuration for the demo: IdP on port+1, echo app on port+2."""
    base = f"http://{_HOST}:{port}"
    return Config.model_validate(
        {
            "server": {"listen": f"{_HOST}:{port}", "public_url": base},
            "management": {"listen": f"{_HOST}:{port + 3}"},
            "oidc": {
                # Under a path: the dev IdP's cookie (Path=/idp) then never reaches the app on
                # the same host, whose pages would show it.
                "issuer": f"http://{_HOST}:{port + 1}/idp",
                "client_id": "demo",
                "client_secret": client_secret,
                "scopes": ["openid", "email", "profile", "offline_access"],
                "post_logout_redirect_url": base + "/signed-out",
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
            "public_paths": ["/signed-out"],
            "refresh": {"before_expiry": "10s"},
            "logging": {"level": "info", "access_log": access_log},
        }
    )


async def run_demo(port: int = 4180, *, verbose: bool = False) -> None:
    """Start the three parts and serve until Ctrl-C; `verbose` keeps the access log."""
    busy = _busy_ports(range(port, port + _PORTS))
    if busy:
        raise DemoPortBusy(port, busy)
    secret = secrets.token_urlsafe(24)
    config = demo_config(port, secret, access_log=verbose)
    idp = DevIdP(
        config.oidc.issuer,
        clients={
            "demo": DevClient(
                client_id="demo",
                client_secret=secret,
                redirect_uris=(config.server.public_url + "/oauth2/callback",),
                post_logout_redirect_uris=(config.server.public_url + "/signed-out",),
            )
        },
        users=default_users(),
        access_token_ttl=ACCESS_TOKEN_TTL,
    )
    # Never access lines from the dev IdP and the demo app: their query strings carry codes
    # and ID-token hints, and the sidecar's own lines tell the story.
    runners = [
        web.AppRunner(idp.app(), access_log=None),
        web.AppRunner(demo_app(lambda: idp.stats), access_log=None),
    ]
    for runner, part_port in zip(runners, (port + 1, port + 2), strict=True):
        await runner.setup()
        await web.TCPSite(runner, _HOST, part_port).start()
    print(
        "\n  auth-sidecar demo — development only, listening on 127.0.0.1\n"
        f"  open  {config.server.public_url}/   (log in as alice, bob or carol)\n"
        f"  dev IdP {config.oidc.issuer}   demo app http://{_HOST}:{port + 2}"
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
