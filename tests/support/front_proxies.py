"""Real front proxies asking the sidecar's `/oauth2/auth`: nginx `auth_request` and Caddy
`forward_auth`, configured from the templates docs/forward-auth.md shows.

The templates are the production configurations with placeholders (`__LISTEN__`,
`__SIDECAR__`, `__APP__`, `__SITE__`); `render` fills them in, with the addresses of the test
or with the guide's (`GUIDE_VALUES`), and the guide must show exactly the latter
(tests/proxy/test_front_proxies.py checks it). Only the process wrapping differs in tests: pid,
logs and temp files under the test's directory, no admin endpoint, plain HTTP.

Debian's nginx-light and caddy are hard requirements under CI (`.ci/run` installs both): a
missing binary fails the test there, and skips it elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.support.login import approve
from tests.support.processes import stop_process

__all__ = [
    "CADDYFILE",
    "GUIDE_VALUES",
    "NGINX_SERVER",
    "BrowserTrip",
    "FrontProxy",
    "bearer_get",
    "browse_and_log_in",
    "caddy_binary",
    "nginx_binary",
    "render",
    "run_caddy",
    "run_nginx",
]

# nginx `auth_request`: the `upstream` and `server` blocks to put in `http { }`.
NGINX_SERVER = """\
upstream sidecar { server __SIDECAR__; }
upstream app { server __APP__; }

server {
    listen __LISTEN__;

    # Browsers reach the sidecar's login endpoints through nginx, never its forward-auth
    # answer: that carries the access token, and nginx is a trusted proxy.
    location ^~ /oauth2/auth { return 404; }
    location /oauth2/ {
        proxy_pass http://sidecar;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_hide_header Authorization;
    }

    location = /_auth {
        internal;
        proxy_pass http://sidecar/oauth2/auth;
        proxy_pass_request_body off;
        proxy_set_header Content-Length "";
        proxy_set_header X-Forwarded-Method $request_method;
        proxy_set_header X-Forwarded-Uri $request_uri;
        proxy_set_header X-Forwarded-Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }

    location @login {
        return 302 /oauth2/start?rd=$request_uri;
    }

    location / {
        auth_request /_auth;
        auth_request_set $auth_user $upstream_http_x_forwarded_user;
        auth_request_set $auth_email $upstream_http_x_forwarded_email;
        auth_request_set $auth_groups $upstream_http_x_forwarded_groups;
        auth_request_set $auth_authorization $upstream_http_authorization;
        error_page 401 = @login;

        # The app gets the normalised path nginx routed on (the sidecar decided on the
        # same), not the client's spelling of it.
        rewrite ^ $uri break;
        proxy_pass http://app;
        proxy_set_header Host $host;
        # From the answer; empty, so not sent at all, without one: never the client's.
        proxy_set_header X-Forwarded-User $auth_user;
        proxy_set_header X-Forwarded-Email $auth_email;
        proxy_set_header X-Forwarded-Groups $auth_groups;
        proxy_set_header Authorization $auth_authorization;
    }
}
"""

# Caddy `forward_auth`, with `forward_auth.redirect: true` in the sidecar: one site block.
CADDYFILE = """\
__SITE__ {
	# Browsers reach the sidecar's login endpoints through Caddy, never its forward-auth
	# answer: that carries the access token, and Caddy is a trusted proxy.
	handle /oauth2/auth* {
		respond 404
	}
	handle /oauth2/* {
		reverse_proxy __SIDECAR__ {
			header_down -Authorization
		}
	}
	handle {
		route {
			# Identity headers reach the app from the sidecar's answer only.
			request_header -X-Forwarded-User
			request_header -X-Forwarded-Email
			request_header -X-Forwarded-Groups
			forward_auth __SIDECAR__ {
				uri /oauth2/auth
				copy_headers X-Forwarded-User X-Forwarded-Email X-Forwarded-Groups Authorization
			}
			# Caddy without caddyserver/caddy#6608 (Debian 12's 2.6.2) sets a header the
			# answer did not have (public routes) to the placeholder's text: drop those.
			@no_user header_regexp X-Forwarded-User ^\\{http\\.reverse_proxy\\.
			request_header @no_user -X-Forwarded-User
			@no_email header_regexp X-Forwarded-Email ^\\{http\\.reverse_proxy\\.
			request_header @no_email -X-Forwarded-Email
			@no_groups header_regexp X-Forwarded-Groups ^\\{http\\.reverse_proxy\\.
			request_header @no_groups -X-Forwarded-Groups
			@no_authorization header_regexp Authorization ^\\{http\\.reverse_proxy\\.
			request_header @no_authorization -Authorization
			reverse_proxy __APP__
		}
	}
}
"""

# What the guide's copies are rendered with.
GUIDE_VALUES: Mapping[str, str] = {
    "__LISTEN__": "80",
    "__SITE__": "app.example.com",
    "__SIDECAR__": "sidecar:4180",
    "__APP__": "app:8080",
}


def render(template: str, values: Mapping[str, str]) -> str:
    """`template` with every placeholder replaced; a placeholder left over is an error."""
    out = template
    for name, value in values.items():
        out = out.replace(name, value)
    left = re.findall(r"__[A-Z]+__", out)
    assert not left, f"placeholders not filled in: {left}"
    return out


# --- the binaries ---------------------------------------------------------------------------


def _binary(name: str, package: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()), ""
    )
    if not found:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed: CI must install Debian's {package} (.ci/run)")
        pytest.skip(f"{name} is not installed (apt-get install {package}); CI requires it")
    return found


def nginx_binary() -> str:
    """Debian's nginx (nginx-light has `auth_request`); fails under CI when missing."""
    return _binary("nginx", "nginx-light")


def caddy_binary() -> str:
    """Debian's caddy; fails under CI when missing."""
    return _binary("caddy", "caddy")


# --- running them ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FrontProxy:
    """A running front proxy: where it listens, and where its logs are."""

    url: str
    logs: tuple[Path, ...]

    def log_text(self) -> str:
        return "".join(
            f"--- {p.name}\n{p.read_text(errors='replace')}" for p in self.logs if p.exists()
        )


def _nginx_main(root: Path, binary: str, http_body: str) -> str:
    """A whole nginx.conf around `http_body`: pid, logs and temp paths under `root`."""
    built = subprocess.run([binary, "-V"], capture_output=True, text=True, check=True).stderr
    temp_paths = [f"client_body_temp_path {root}/client_body;"]
    for module in ("proxy", "fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{module}_module" not in built:
            temp_paths.append(f"{module}_temp_path {root}/{module};")
    user = ""
    if os.geteuid() == 0:  # workers drop to `nobody` with its own group
        nobody = pwd.getpwnam("nobody")
        user = f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"
    temp = "\n    ".join(temp_paths)
    return f"""\
{user}
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {root}/access.log;
    {temp}
    default_type text/plain;

{http_body}
}}
"""


def _spawn_nginx(root: Path, http_body: str) -> tuple[subprocess.Popen[bytes], tuple[Path, ...]]:
    binary = nginx_binary()
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "nginx.conf"
    conf.write_text(_nginx_main(root, binary, http_body))
    logs = (root / "stderr.log", root / "error.log")
    with logs[0].open("wb") as out:
        proc = subprocess.Popen(
            [binary, "-p", str(root), "-e", str(logs[1]), "-c", str(conf), "-g", "daemon off;"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, logs


@contextlib.asynccontextmanager
async def run_nginx(root: Path, port: int, http_body: str) -> AsyncIterator[FrontProxy]:
    """nginx serving `http_body` (the rendered `NGINX_SERVER`, listening on `port`)."""
    proc, logs = _spawn_nginx(root, http_body)
    proxy = FrontProxy(f"http://127.0.0.1:{port}", logs)
    try:
        await _wait_listening("nginx", proc, port, proxy)
        yield proxy
    finally:
        stop_process(proc, 10)


# Test-only global options: no admin endpoint, plain HTTP, nothing written outside `root`.
_CADDY_GLOBAL = """\
{
	admin off
	auto_https off
}

"""


def _spawn_caddy(root: Path, site: str) -> tuple[subprocess.Popen[bytes], tuple[Path, ...]]:
    binary = caddy_binary()
    root.mkdir(parents=True, exist_ok=True)
    caddyfile = root / "Caddyfile"
    caddyfile.write_text(_CADDY_GLOBAL + site)
    log = root / "caddy.log"
    home = {  # Caddy's storage and autosave locations, kept out of the real home
        "HOME": str(root),
        "XDG_CONFIG_HOME": str(root / "config"),
        "XDG_DATA_HOME": str(root / "data"),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **home},
        )
    return proc, (log,)


@contextlib.asynccontextmanager
async def run_caddy(root: Path, port: int, site: str) -> AsyncIterator[FrontProxy]:
    """Caddy serving `site` (the rendered `CADDYFILE`, its address on `port`)."""
    proc, logs = _spawn_caddy(root, site)
    proxy = FrontProxy(f"http://127.0.0.1:{port}", logs)
    try:
        await _wait_listening("caddy", proc, port, proxy)
        yield proxy
    finally:
        stop_process(proc, 10)


async def _wait_listening(
    name: str, proc: subprocess.Popen[bytes], port: int, proxy: FrontProxy
) -> None:
    """Until the proxy accepts connections; fails with its logs if it exits or takes 10 s."""
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited {proc.returncode}:\n{proxy.log_text()}")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.5)
        except (OSError, TimeoutError):
            pass
        else:
            writer.close()
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{name} did not listen within 10 s:\n{proxy.log_text()}")
        await asyncio.sleep(0.02)


# --- clients through a front proxy ----------------------------------------------------------


@dataclass
class BrowserTrip:
    """A browser's way from a page through login back to it: each hop's status and URL."""

    hops: list[tuple[int, str]]
    final_status: int
    final_body: Any  # the upstream's JSON (echo_app), or the text of anything else

    def explain(self) -> str:
        return "\n".join(f"{status} {url}" for status, url in self.hops)


async def browse_and_log_in(
    s: aiohttp.ClientSession,
    proxy: str,
    path: str,
    user: str,
    *,
    headers: Mapping[str, str],
    max_hops: int = 8,
) -> BrowserTrip:
    """GET `proxy` + `path` as a browser, following redirects one by one; at the dev IdP's
    authorize endpoint, `login_hint` logs `user` in. Every hop is recorded."""
    url = proxy + path
    hops: list[tuple[int, str]] = []
    for _ in range(max_hops):
        if "/authorize" in URL(url).path:
            callback = await approve(s, url, user)
            hops.append((302, url))
            url = callback
            continue
        async with s.get(URL(url, encoded=True), headers=headers, allow_redirects=False) as r:
            hops.append((r.status, url))
            if r.status in (301, 302, 303, 307, 308):
                url = str(URL(url).join(URL(r.headers["Location"], encoded=True)))
                continue
            if r.content_type == "application/json":
                return BrowserTrip(hops, r.status, await r.json())
            return BrowserTrip(hops, r.status, await r.text())
    raise AssertionError(f"more than {max_hops} hops:\n" + "\n".join(f"{s} {u}" for s, u in hops))


async def bearer_get(
    s: aiohttp.ClientSession, proxy: str, path: str, token: str, **headers: str
) -> tuple[int, Any]:
    """GET `proxy` + `path` as a bearer client, `Authorization: Bearer token` and no cookie
    (`s` must hold none: a fresh `browser()`): the status and the upstream's JSON (or the
    text of anything else), for the bearer-client cases through each proxy."""
    sent = {"Accept": "application/json", **headers, "Authorization": f"Bearer {token}"}
    async with s.get(proxy + path, headers=sent, allow_redirects=False) as r:
        if r.content_type == "application/json":
            return r.status, await r.json()
        return r.status, await r.text()
