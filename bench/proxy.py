"""Side-by-side proxy benchmark (issue 7): one command, one run, alternating rows, one table.

    .venv/bin/python bench/proxy.py [--duration 10] [--connections 50] [--rounds 2]
                                    [--baseline GIT_REF] [--rows bearer,rules,nginx,accesslog]

Everything listens on 127.0.0.1 on free ports and is stopped at exit:

* upstream: nginx (Debian `nginx-light`) answering a small static body, in its own temp
  prefix, `daemon off;`; without nginx, a fast Python (uvloop + aiohttp) upstream instead;
* an nginx reverse proxy to it (skipped without nginx);
* a bare aiohttp pass-through proxy written here (uvloop, one ClientSession, streamed bodies):
  the floor for a proxy built on aiohttp's server and client (the reference issue 7 names);
* the sidecar (`python -m sidecar run`) with 1 and with 2 workers, Redis store (127.0.0.1:6379,
  unique key prefix): one row on a public path, one row with an authenticated session (cookie
  from a real login at the dev IdP).

With `--baseline REF` (a commit, tag or branch of this repository) a 1-worker sidecar built
from that commit's source runs beside today's, its public and authenticated rows alternating
with the current code's in every round: the cost of a change, measured in one run.

With `--rows` (issue 16), more rows alternate with the others in every round:

* `bearer`: the 1-worker sidecar with `bearer.accept_provider_tokens`, called with
  `Authorization: Bearer <the dev IdP's access token>` and no cookie, beside the same
  sidecar's cookie-authenticated row;
* `rules`: a 1-worker sidecar like it whose upstream has 20 route rules (19 that do not match
  the path, then `/**` authenticated), cookie-authenticated, beside the rule-less one;
* `nginx`: nginx with `auth_request` to the 1-worker sidecar's `/oauth2/auth` in front of the
  upstream, beside the plain nginx reverse proxy;
* `accesslog` (issue 18): a 1-worker and a 2-worker sidecar like the others but with the access
  log on (`logging: {level: info, access_log: true}`, the defaults; lines to a file), each
  cookie-authenticated beside its unlogged twin.

With any of them the 1-worker sidecar also gets `server.trusted_proxies: [127.0.0.1/32]` and
`bearer.accept_provider_tokens: true`; without `--rows` nothing changes.

Besides req/s and latency, each proxy's CPU time per request (its process tree, from psutil)
is reported: on a shared 2-core machine it is steadier than throughput.

Load comes from `wrk` (Debian package `wrk`); the script installs nothing. The sidecar's
access log is off (`logging.access_log: false`) so it does the same work as the others,
except on the `accesslog` rows.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
PATH = "/public/bench"  # public on every sidecar; every row requests the same path
BODY = "hello from the upstream, a small static response\n"
REDIS_URL = "redis://127.0.0.1:6379/0"
COOKIE = "sidecar_bench"
CLIENT_ID = "bench"
CLIENT_SECRET = "bench-client-secret"

TARGETS = {
    "auth_vs_bare": 0.95,  # authenticated ≥ 0.95 x bare aiohttp proxy
    "w2_vs_w1": 1.6,  # 2 workers ≥ 1.6 x 1 worker
    "w2_vs_nginx": 0.25,  # 2 workers ≥ 0.25 x nginx reverse proxy
    "p99_added_ms": 1.0,  # sidecar p99 - bare proxy p99 ≤ 1 ms
    "redis_extra_bytes": 200,  # Redis bytes per session ≤ raw token bytes + 200
    "bearer_vs_cookie": 0.9,  # issue 16: bearer JWT ≥ 0.9 x cookie-authenticated
    "rules_vs_none": 0.95,  # issue 16: 20 rules ≥ 0.95 x no rules
    "logged_vs_unlogged": 0.9,  # issue 18: access log on ≥ 0.9 x off
}
EXTRA_ROWS = ("bearer", "rules", "nginx", "accesslog")  # `--rows`: issues 16 and 18
RULES = 20  # route rules on the `rules` row's upstream; the last one matches
AUTH_ROW = "sidecar authenticated (1 worker)"
BEARER_ROW = "sidecar bearer JWT (1 worker)"
RULES_ROW = f"sidecar authenticated, {RULES} rules (1 worker)"
NGINX_AUTH_ROW = "nginx + auth_request + sidecar (1 worker)"
AUTH2_ROW = "sidecar authenticated (2 workers, Redis)"
LOGGED_ROW = "sidecar authenticated, access log (1 worker)"
LOGGED2_ROW = "sidecar authenticated, access log (2 workers, Redis)"
LOGGED = {"logging": {"level": "info", "access_log": True}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s")


# --- the bare aiohttp pass-through proxy (runs as `bench/proxy.py --bare-proxy PORT URL`) ---

HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    )
)


def run_bare_proxy(port: int, upstream: str) -> None:
    import aiohttp
    import uvloop
    from aiohttp import web

    async def main() -> None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

        async def handle(request: web.Request) -> web.StreamResponse:
            headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
            body = request.content if request.body_exists else None
            async with session.request(
                request.method,
                upstream + request.raw_path,
                headers=headers,
                data=body,
                allow_redirects=False,
            ) as up:
                resp = web.StreamResponse(status=up.status, reason=up.reason)
                for k, v in up.headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        resp.headers.add(k, v)
                if up.content_length is not None:
                    resp.content_length = up.content_length
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp

        server = web.Server(handle)
        runner = web.ServerRunner(server, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port).start()
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
            await session.close()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvloop.run(main())


def run_python_upstream(port: int) -> None:
    """Fallback upstream when nginx is missing: uvloop + aiohttp's low-level server."""
    import uvloop
    from aiohttp import web

    payload = BODY.encode()

    async def handle(request: web.BaseRequest) -> web.Response:
        return web.Response(body=payload, content_type="text/plain")

    async def main() -> None:
        runner = web.ServerRunner(web.Server(handle), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port).start()
        await asyncio.Event().wait()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvloop.run(main())


# --- process management ---------------------------------------------------------------


class Procs:
    """Every child process, stopped in reverse order at exit."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


NGINX_CONF = """
daemon off;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    {upstream_block}
    server {{
        listen {host}:{port};
        {location}
    }}
}}
"""


# `--rows nginx`: the reverse proxy's location behind an `auth_request` to the sidecar's
# forward-auth endpoint, which decides on the original method and URI (the sidecar trusts
# 127.0.0.1) and answers the headers nginx copies upstream. Keep-alive to both.
NGINX_AUTH_LOCATIONS = """
        location = /_auth {
            internal;
            proxy_pass http://sidecar/oauth2/auth;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Method $request_method;
            proxy_set_header X-Forwarded-Uri $request_uri;
            proxy_set_header X-Forwarded-Host $http_host;
        }
        location / {
            auth_request /_auth;
            auth_request_set $auth_user $upstream_http_x_forwarded_user;
            auth_request_set $auth_authorization $upstream_http_authorization;
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-User $auth_user;
            proxy_set_header Authorization $auth_authorization;
        }
"""


def start_nginx(
    procs: Procs, name: str, port: int, proxy_to: str | None, auth_via: str | None = None
) -> int:
    """nginx answering the static body (`proxy_to` None) or proxying to `proxy_to`; with
    `auth_via` (the sidecar's host:port), each request first asks its `/oauth2/auth`."""
    prefix = procs.tmp / name
    prefix.mkdir()
    if proxy_to is not None and auth_via is not None:
        upstream_block = (
            f"upstream backend {{ server {proxy_to}; keepalive 64; }}\n"
            f"    upstream sidecar {{ server {auth_via}; keepalive 64; }}"
        )
        location = NGINX_AUTH_LOCATIONS
    elif proxy_to is None:
        upstream_block = ""
        location = (
            "location / { default_type text/plain; return 200 '" + BODY.rstrip("\n") + "\\n'; }"
        )
    else:
        upstream_block = f"upstream backend {{ server {proxy_to}; keepalive 64; }}"
        location = (
            "location / { proxy_pass http://backend; proxy_http_version 1.1; "
            'proxy_set_header Connection ""; proxy_set_header Host $host; }'
        )
    conf = prefix / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            workers="auto",
            prefix=prefix,
            host=HOST,
            port=port,
            upstream_block=upstream_block,
            location=location,
        )
    )
    proc = procs.start(name, ["nginx", "-p", str(prefix), "-c", str(conf), "-e", "stderr"])
    wait_http(f"http://{HOST}:{port}{PATH}", proc=proc)
    return proc.pid


def start_upstream(procs: Procs, port: int) -> None:
    """The small static upstream on `port`: nginx, or the Python one without nginx."""
    if shutil.which("nginx"):
        start_nginx(procs, "upstream", port, None)
        return
    me = str(Path(__file__).resolve())
    p = procs.start("upstream", [sys.executable, me, "--python-upstream", str(port)])
    wait_http(f"http://{HOST}:{port}{PATH}", proc=p)


# --- the dev IdP, in a thread of this process ------------------------------------------


class ThreadedIdP:
    """`sidecar.dev.idp.DevIdP` served from its own event loop and thread (refresh_storm.py
    and session_scale.py use it too)."""

    def __init__(
        self,
        port: int,
        redirect_bases: list[str],
        *,
        access_token_ttl: float = 6 * 3600.0,
        token_delay: float = 0.0,
    ) -> None:
        """By default tokens outlive the benchmark: no refresh happens during a measurement."""
        from aiohttp import web

        from sidecar.dev.idp import DevClient, DevIdP, default_users

        self.issuer = f"http://{HOST}:{port}"
        client = DevClient(
            CLIENT_ID,
            CLIENT_SECRET,
            tuple(b + "/oauth2/callback" for b in redirect_bases),
            tuple(b + "/" for b in redirect_bases),
        )
        self.idp = DevIdP(
            self.issuer,
            clients={CLIENT_ID: client},
            users=default_users(),
            access_token_ttl=access_token_ttl,
            refresh_token_ttl=12 * 3600.0,
        )
        self.idp.token_endpoint_delay = token_delay
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            runner = web.AppRunner(self.idp.app(), access_log=None)
            self._loop.run_until_complete(runner.setup())
            self._loop.run_until_complete(web.TCPSite(runner, HOST, port).start())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="dev-idp", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("dev IdP did not start")

    def stats(self) -> Any:
        """A copy of the IdP's counters, taken on its own thread."""

        async def copy() -> Any:
            return dataclasses.replace(self.idp.stats)

        return asyncio.run_coroutine_threadsafe(copy(), self._loop).result(10)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def login(base: str, user: str = "alice") -> str:
    """Log in through the sidecar and the dev IdP, following redirects by hand; the cookie."""
    import http.cookiejar

    jar = http.cookiejar.CookieJar()

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), NoRedirect)

    def get(url: str) -> str:
        req = urllib.request.Request(url, headers={"Accept": "text/html"})
        try:
            with opener.open(req, timeout=10) as r:
                raise RuntimeError(f"login: {url} answered {r.status}, expected a redirect")
        except urllib.error.HTTPError as e:
            if e.code not in (302, 303):
                raise RuntimeError(f"login: {url} answered {e.code}: {e.read()[:300]!r}") from e
            location = e.headers["Location"]
            return location if "://" in location else base + location

    start = get(base + "/private/page")
    authorize = get(start)
    callback = get(authorize + "&login_hint=" + user)
    get(callback)
    for c in jar:
        if c.name == COOKIE:
            return f"{c.name}={c.value}"
    raise RuntimeError("login: no session cookie was set")


# --- the sidecar ------------------------------------------------------------------------


@dataclass
class Sidecar:
    name: str
    base: str
    management: str
    proc: subprocess.Popen[bytes]
    key: str  # the session encryption key: the bench opens a record to count its token bytes


def start_sidecar(
    procs: Procs,
    name: str,
    port: int,
    issuer: str,
    upstream: str,
    workers: int,
    prefix: str,
    source: Path | None = None,
    launcher: tuple[str, ...] = (),
    start_timeout: float = 30,
    extra_config: dict[str, Any] | None = None,
    **session_options: Any,
) -> Sidecar:
    """`source`: a checkout whose `sidecar` package runs instead of this one (`-m` imports
    from the working directory first). `launcher`: a command the interpreter runs under
    (bench/instructions.py uses valgrind's callgrind). `extra_config`: sections merged into
    the configuration (a mapping updates the section's mapping, anything else replaces it)."""
    import yaml

    key = base64.b64encode(secrets.token_bytes(32)).decode()
    mport = free_port()
    base = f"http://{HOST}:{port}"
    session: dict[str, Any] = {
        "store": "redis",
        "cookie_name": COOKIE,
        "cookie_secure": False,
        "encryption_keys": [key],
        **session_options,
    }
    config: dict[str, Any] = {
        "server": {"listen": f"{HOST}:{port}", "public_url": base, "workers": workers},
        "management": {"listen": f"{HOST}:{mport}"},
        "oidc": {
            "issuer": issuer,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "scopes": ["openid", "email", "profile", "offline_access"],
            "post_logout_redirect_url": base + "/",
        },
        "session": session,
        "upstreams": [{"path": "/", "url": upstream}],
        "public_paths": ["/public/"],
        "logging": {"level": "warning", "access_log": False},
    }
    config["redis"] = {"url": REDIS_URL, "key_prefix": prefix}
    for section, value in (extra_config or {}).items():
        if isinstance(value, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **value}
        else:
            config[section] = value
    path = procs.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [*launcher, sys.executable, "-m", "sidecar", "run", "--config", str(path)]
    proc = procs.start(name, argv, cwd=source)
    try:
        wait_http(f"http://{HOST}:{mport}/readyz", timeout=start_timeout, proc=proc)
    except (RuntimeError, TimeoutError) as e:
        raise RuntimeError(f"{name} did not start: {e}\n{procs.log(name)}") from e
    return Sidecar(name, base, f"http://{HOST}:{mport}", proc, key)


def rss_mib(proc: subprocess.Popen[bytes]) -> list[tuple[int, str, float]]:
    import psutil

    p = psutil.Process(proc.pid)
    out = [(p.pid, "supervisor" if p.children() else "process", p.memory_info().rss / 2**20)]
    for child in p.children(recursive=True):
        out.append((child.pid, "worker", child.memory_info().rss / 2**20))
    return out


def export_commit(ref: str, into: Path) -> Path:
    """The source tree of `ref` (this repository's), unpacked into `into`."""
    into.mkdir(parents=True)
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", ref, "sidecar"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


# --- wrk --------------------------------------------------------------------------------


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: str
    requests: int = 0
    cpu_us: float | None = None  # CPU time of the proxy's processes per request
    others_us: float | None = None  # CPU time of wrk and the upstream per request


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (workers): noise-resistant cost."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"unparsed latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> Result:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and p50 and p99):
        raise RuntimeError(f"could not parse wrk output:\n{out}")
    errors = []
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        errors.append(f"{non2xx.group(1)} non-2xx")
    sock = re.search(r"Socket errors:(.*)", out)
    if sock:
        errors.append("socket errors:" + sock.group(1))
    total = re.search(r"(\d+) requests in", out)
    return Result(
        float(rps.group(1)),
        _ms(p50.group(1)),
        _ms(p99.group(1)),
        "; ".join(errors),
        int(total.group(1)) if total else 0,
    )


def others_cpu_seconds(upstream_pid: int | None) -> float:
    """CPU of this process's finished children (wrk runs, once waited for) and the upstream."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    upstream = cpu_seconds(upstream_pid) if upstream_pid else 0.0
    return usage.ru_utime + usage.ru_stime + upstream


def wrk(
    url: str,
    connections: int,
    duration: float,
    headers: list[str],
    pid: int | tuple[int, ...] | None = None,
    upstream_pid: int | None = None,
) -> Result:
    """One wrk run; with `pid`, also that proxy's CPU microseconds per request (of several
    process trees when `pid` is a tuple: nginx and the sidecar it asks), and what wrk and the
    upstream (`upstream_pid`) spent per request beside it."""
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{duration:g}s", "--latency"]
    for h in headers:
        argv += ["-H", h]
    pids = pid if isinstance(pid, tuple) else (pid,) if pid else ()
    before = sum(cpu_seconds(p) for p in pids)
    others_before = others_cpu_seconds(upstream_pid)
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    others = others_cpu_seconds(upstream_pid)
    result = parse_wrk(out)
    if pids and result.requests:
        result.cpu_us = (sum(cpu_seconds(p) for p in pids) - before) / result.requests * 1e6
        result.others_us = (others - others_before) / result.requests * 1e6
    return result


# --- Redis probe --------------------------------------------------------------------------


def redis_commands_per_request(base: str, cookie: str, n: int = 500) -> float:
    """Authenticated requests against the Redis-backed sidecar; commands/request from INFO."""
    import redis

    r = redis.Redis.from_url(REDIS_URL)

    def processed() -> int:
        return int(r.info("stats")["total_commands_processed"])

    idle0 = processed()
    idle1 = processed()  # what the INFO calls and background traffic cost on their own
    req = urllib.request.Request(base + "/private/x", headers={"Cookie": cookie})
    before = processed()
    for _ in range(n):
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"authenticated request answered {resp.status}")
    after = processed()
    r.close()
    return max(0, (after - before) - (idle1 - idle0)) / n


@dataclass
class SessionBytes:
    redis: int  # MEMORY USAGE of the session key: what Redis spends on it
    sealed: int  # the encrypted record
    tokens: int  # access + refresh + ID token, as the IdP issued them


def redis_bytes_per_session(prefix: str, cookie: str, key: str) -> SessionBytes:
    """Open the bench session's record with its key: Redis bytes against raw token bytes."""
    used, sealed, record = open_session(prefix, cookie, key)
    tokens = sum(len(t or "") for t in (record.access_token, record.refresh_token, record.id_token))
    return SessionBytes(used, sealed, tokens)


def open_session(prefix: str, cookie: str, key: str) -> tuple[int, int, Any]:
    """The bench session's record, opened with the sidecar's key: (MEMORY USAGE of its key,
    sealed bytes, the `SessionRecord`)."""
    import redis

    from sidecar.session import Keyring, SessionRecord, session_hash

    session_id = cookie.partition("=")[2]
    h = session_hash(session_id)
    r = redis.Redis.from_url(REDIS_URL)
    try:
        name = f"{prefix}:s:{{{h}}}"
        used = int(r.memory_usage(name, samples=0) or 0)
        value = r.get(name)
    finally:
        r.close()
    if not isinstance(value, bytes):
        raise RuntimeError("the bench session is not in Redis")
    sealed = value.partition(b":")[2]  # `<version>:<sealed record>`
    plain, _ = Keyring.from_base64([key]).open(session_id.encode(), h.encode(), sealed)
    return used, len(sealed), SessionRecord.from_bytes(plain)


def redis_cleanup(prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    try:
        batch: list[bytes] = []
        for k in r.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(k)
            if len(batch) == 1000:
                r.unlink(*batch)
                batch.clear()
        if batch:
            r.unlink(*batch)
    finally:
        r.close()


# --- issue 16's rows -----------------------------------------------------------------------


def token_lifetime(token: str) -> float:
    """Seconds until a JWT's `exp` (read, not verified: the sidecar verifies it)."""
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return float(claims["exp"]) - time.time()


def answer(url: str, headers: dict[str, str]) -> tuple[int, Any]:
    """Status and headers of one GET that asks for JSON (no login redirect)."""
    req = urllib.request.Request(url, headers={"Accept": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()
            return r.status, r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers


def check_issue16(
    extra: set[str], rows: list[tuple[str, str, list[str], Any]], sc1_base: str, cookie: str
) -> None:
    """Each new row measures what it says: the 200s it got came through the check it names."""
    row = {name: (url, dict(h.split(": ", 1) for h in headers)) for name, url, headers, _ in rows}
    failures = []
    if "bearer" in extra:
        url, headers = row[BEARER_ROW]
        token = headers["Authorization"].removeprefix("Bearer ")
        head, _, signature = token.rpartition(".")
        flipped = signature[:8] + ("A" if signature[8] != "A" else "B") + signature[9:]
        for what, sent, expect in (
            ("no token", {}, 401),
            ("a bad signature", {"Authorization": f"Bearer {head}.{flipped}"}, 401),
        ):
            got = answer(url, sent)[0]
            if got != expect:
                failures.append(f"{BEARER_ROW}: {what} answered {got}, expected {expect}")
    if "rules" in extra:
        url, headers = row[RULES_ROW]
        base = url.removesuffix("/private/bench")
        got = answer(base + "/r1/x", headers)[0]  # rule 1: group-1, which alice is not in
        if got != 403:
            failures.append(f"{RULES_ROW}: /r1/x answered {got}, expected 403 from rule 1")
    if "nginx" in extra:
        url, _ = row[NGINX_AUTH_ROW]
        got = answer(url, {})[0]
        if got != 401:
            failures.append(f"{NGINX_AUTH_ROW}: no cookie answered {got}, expected 401")
        status, headers = answer(
            sc1_base + "/oauth2/auth",
            {"Cookie": cookie, "X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/private/bench"},
        )
        if status != 202 or not headers.get("Authorization", "").startswith("Bearer "):
            failures.append(f"/oauth2/auth answered {status} without a bearer Authorization")
        if not headers.get("X-Forwarded-User"):
            failures.append("/oauth2/auth answered no X-Forwarded-User")
    if failures:
        raise RuntimeError("issue 16 rows: " + "; ".join(failures))


def issue16_lines(
    extra: set[str], results: dict[str, list[Result]], best: dict[str, Result]
) -> list[str]:
    """Each new row against its pair: best round, every round, CPU, target."""

    def pair(new: str, old: str) -> str:
        rounds = ", ".join(
            f"{n.rps / o.rps:.2f}x" for n, o in zip(results[new], results[old], strict=True)
        )
        cpu = "—"
        if best[new].cpu_us is not None and best[old].cpu_us is not None:
            cpu = f"{best[old].cpu_us:.0f} → {best[new].cpu_us:.0f}"
        return (
            f"{best[new].rps / best[old].rps:.2f}x req/s (round by round: {rounds}); "
            f"CPU µs/request {cpu}"
        )

    def verdict(new: str, old: str, target: float) -> str:
        return "met" if best[new].rps / best[old].rps >= target else "NOT met"

    lines = []
    if "bearer" in extra:
        lines.append(
            f"bearer JWT ≥ {TARGETS['bearer_vs_cookie']} x cookie-authenticated (1 worker): "
            f"{pair(BEARER_ROW, AUTH_ROW)} — "
            f"{verdict(BEARER_ROW, AUTH_ROW, TARGETS['bearer_vs_cookie'])}"
        )
    if "rules" in extra:
        lines.append(
            f"{RULES} route rules ≥ {TARGETS['rules_vs_none']} x no rules (cookie, 1 worker): "
            f"{pair(RULES_ROW, AUTH_ROW)} — "
            f"{verdict(RULES_ROW, AUTH_ROW, TARGETS['rules_vs_none'])}"
        )
    if "nginx" in extra:
        lines.append(
            f"nginx + auth_request + sidecar / plain nginx reverse proxy: "
            f"{pair(NGINX_AUTH_ROW, 'nginx reverse proxy')} (nginx + sidecar CPU); "
            f"/ the sidecar proxying alone (authenticated, 1 worker): "
            f"{best[NGINX_AUTH_ROW].rps / best[AUTH_ROW].rps:.2f}x req/s"
        )
    if "accesslog" in extra:
        target = TARGETS["logged_vs_unlogged"]
        for logged, unlogged in ((LOGGED_ROW, AUTH_ROW), (LOGGED2_ROW, AUTH2_ROW)):
            lines.append(
                f"access log on ≥ {target} x off ({unlogged.removeprefix('sidecar ')}): "
                f"{pair(logged, unlogged)} — {verdict(logged, unlogged, target)}"
            )
    return lines


# --- the run ------------------------------------------------------------------------------


def ceiling(two: Result, one: Result) -> str:
    """The best 2-worker / 1-worker ratio this machine allows at the measured costs.

    With every core busy, the 2-worker row can reach at most cores / (sidecar + wrk +
    upstream CPU per request); wrk and the upstream share the cores with the workers.
    """
    if two.cpu_us is None or two.others_us is None:
        return "—"
    best = (os.cpu_count() or 1) / ((two.cpu_us + two.others_us) / 1e6)
    return f"{best / one.rps:.2f}x"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "—"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; best wins")
    parser.add_argument("--warmup", type=float, default=1, help="seconds of warm-up per row")
    parser.add_argument(
        "--bare-proxy", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--baseline", metavar="GIT_REF", help="also run a 1-worker sidecar from this commit"
    )
    parser.add_argument("--python-upstream", metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument(
        "--rows",
        default="",
        metavar="LIST",
        help="also run issue 16's rows, comma-separated: bearer (bearer JWT beside the cookie), "
        "rules (20 route rules beside none), nginx (nginx + auth_request + sidecar beside plain "
        "nginx), accesslog (access log on beside off, 1 and 2 workers); all: every one",
    )
    args = parser.parse_args()
    extra = {r.strip() for r in args.rows.split(",") if r.strip()}
    if "all" in extra:
        extra = set(EXTRA_ROWS)
    if extra - set(EXTRA_ROWS):
        parser.error(f"--rows: unknown {sorted(extra - set(EXTRA_ROWS))}; know {EXTRA_ROWS}")
    if args.bare_proxy:
        run_bare_proxy(int(args.bare_proxy[0]), args.bare_proxy[1])
        return 0
    if args.python_upstream:
        run_python_upstream(int(args.python_upstream))
        return 0

    if shutil.which("wrk") is None:
        print(
            "wrk is not installed: `apt-get install wrk` (Debian/Ubuntu), then run again.",
            file=sys.stderr,
        )
        return 2
    have_nginx = shutil.which("nginx") is not None
    if not have_nginx:
        print(
            "nginx not found (`apt-get install nginx-light`): using a Python upstream and "
            "skipping the nginx reverse proxy row.",
            file=sys.stderr,
        )
        if "nginx" in extra:
            print("--rows nginx: no nginx, row skipped.", file=sys.stderr)
            extra.discard("nginx")

    tmp = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    procs = Procs(tmp)
    idp: ThreadedIdP | None = None
    prefix = f"bench-{os.getpid()}-{secrets.token_hex(4)}"
    me = str(Path(__file__).resolve())
    try:
        names = ("up", "nginx", "bare", "sc1", "sc2", "base", "idp", "rules", "nginx-auth")
        names += ("logged", "logged2")
        ports = {k: free_port() for k in names}
        upstream = f"{HOST}:{ports['up']}"
        if have_nginx:
            upstream_pid = start_nginx(procs, "upstream", ports["up"], None)
            nginx_pid = start_nginx(procs, "nginx-proxy", ports["nginx"], upstream)
        else:
            p = procs.start("upstream", [sys.executable, me, "--python-upstream", str(ports["up"])])
            wait_http(f"http://{upstream}{PATH}", proc=p)
            upstream_pid = p.pid
        bare_proc = procs.start(
            "bare-proxy",
            [sys.executable, me, "--bare-proxy", str(ports["bare"]), "http://" + upstream],
        )
        wait_http(f"http://{HOST}:{ports['bare']}{PATH}", proc=bare_proc)
        bases = [f"http://{HOST}:{ports[k]}" for k in ("sc1", "sc2", "base")]
        if "rules" in extra:
            bases.append(f"http://{HOST}:{ports['rules']}")
        if "accesslog" in extra:
            bases += [f"http://{HOST}:{ports[k]}" for k in ("logged", "logged2")]
        idp = ThreadedIdP(ports["idp"], bases)
        # Issue 16's rows: the 1-worker sidecar accepts the provider's tokens and believes
        # nginx's X-Forwarded-* (forward-auth); the rules sidecar is the same plus its rules.
        issue16: dict[str, Any] = {}
        if extra:
            issue16 = {
                "server": {"trusted_proxies": [f"{HOST}/32"]},
                "bearer": {"accept_provider_tokens": True},
            }
        sc1 = start_sidecar(
            procs, "sidecar-1w", ports["sc1"], idp.issuer, "http://" + upstream, 1, prefix,
            extra_config=issue16,
        )  # fmt: skip
        sc2 = start_sidecar(
            procs, "sidecar-2w", ports["sc2"], idp.issuer, "http://" + upstream, 2, prefix
        )
        cookie = login(sc1.base)
        cookie2 = login(sc2.base)
        if "accesslog" in extra:
            # Twins of the two sidecars above with the access log on: lines go to their log files.
            logged = start_sidecar(
                procs, "sidecar-logged-1w", ports["logged"], idp.issuer, "http://" + upstream, 1,
                prefix, extra_config={**issue16, **LOGGED},
            )  # fmt: skip
            logged2 = start_sidecar(
                procs, "sidecar-logged-2w", ports["logged2"], idp.issuer, "http://" + upstream,
                2, prefix, extra_config=LOGGED,
            )  # fmt: skip
            logged_cookie = login(logged.base)
            logged2_cookie = login(logged2.base)
        if "rules" in extra:
            # 19 rules the path does not match (each with a condition), then the one it does.
            rules: list[dict[str, Any]] = [
                {"paths": [f"/r{i}/**"], "groups": [f"group-{i}"]} for i in range(1, RULES)
            ]
            rules.append({"paths": ["/**"], "allow": "authenticated"})
            sc_rules = start_sidecar(
                procs, "sidecar-rules", ports["rules"], idp.issuer, "http://" + upstream, 1,
                prefix,
                extra_config={
                    **issue16,
                    "upstreams": [{"path": "/", "url": "http://" + upstream, "rules": rules}],
                },
            )  # fmt: skip
            rules_cookie = login(sc_rules.base)
        if "bearer" in extra:
            # The provider's access token, as the sidecar holds it for this session (and
            # forwards it upstream): a JWT whose aud is the client id.
            token = open_session(prefix, cookie, sc1.key)[2].access_token
        if "nginx" in extra:
            nginx_auth_pid = start_nginx(
                procs, "nginx-auth", ports["nginx-auth"], upstream, f"{HOST}:{ports['sc1']}"
            )
        baseline = None
        if args.baseline:
            source = export_commit(args.baseline, tmp / "baseline")
            baseline = start_sidecar(
                procs, "baseline-1w", ports["base"], idp.issuer, "http://" + upstream, 1,
                prefix, source,
            )  # fmt: skip
            baseline_cookie = login(baseline.base)

        # (name, URL, wrk headers, pid(s) whose process trees' CPU time is the proxy's cost)
        rows: list[tuple[str, str, list[str], int | tuple[int, ...] | None]] = [
            ("direct upstream", f"http://{upstream}{PATH}", [], None),
        ]
        if have_nginx:
            rows.append(
                ("nginx reverse proxy", f"http://{HOST}:{ports['nginx']}{PATH}", [], nginx_pid)
            )
        if "nginx" in extra:
            rows.append(
                (
                    NGINX_AUTH_ROW,
                    f"http://{HOST}:{ports['nginx-auth']}/private/bench",
                    [f"Cookie: {cookie}"],
                    (nginx_auth_pid, sc1.proc.pid),
                )
            )
        rows += [
            ("bare aiohttp proxy", f"http://{HOST}:{ports['bare']}{PATH}", [], bare_proc.pid),
            ("sidecar public (1 worker)", sc1.base + PATH, [], sc1.proc.pid),
            (
                AUTH_ROW,
                sc1.base + "/private/bench",
                [f"Cookie: {cookie}"],
                sc1.proc.pid,
            ),
            ("sidecar public (2 workers, Redis)", sc2.base + PATH, [], sc2.proc.pid),
            (
                "sidecar authenticated (2 workers, Redis)",
                sc2.base + "/private/bench",
                [f"Cookie: {cookie2}"],
                sc2.proc.pid,
            ),
        ]
        at = next(i for i, row in enumerate(rows) if row[0] == AUTH_ROW) + 1
        if "bearer" in extra:
            bearer_row = (
                BEARER_ROW,
                sc1.base + "/private/bench",
                [f"Authorization: Bearer {token}"],
            )
            rows.insert(at, (*bearer_row, sc1.proc.pid))
            at += 1
        if "rules" in extra:
            rules_row = (RULES_ROW, sc_rules.base + "/private/bench", [f"Cookie: {rules_cookie}"])
            rows.insert(at, (*rules_row, sc_rules.proc.pid))
        if "accesslog" in extra:
            # Each logged row right after its unlogged twin: they alternate in every round.
            rows.insert(
                at,
                (LOGGED_ROW, logged.base + "/private/bench", [f"Cookie: {logged_cookie}"],
                 logged.proc.pid),
            )  # fmt: skip
            at2 = next(i for i, row in enumerate(rows) if row[0] == AUTH2_ROW) + 1
            rows.insert(
                at2,
                (LOGGED2_ROW, logged2.base + "/private/bench", [f"Cookie: {logged2_cookie}"],
                 logged2.proc.pid),
            )  # fmt: skip
        if baseline is not None:
            # Old and new code side by side: each round runs them next to each other.
            at = next(i for i, row in enumerate(rows) if row[0] == "sidecar public (1 worker)")
            rows[at:at] = [
                (f"baseline {args.baseline} public (1 worker)", baseline.base + PATH, [],
                 baseline.proc.pid),
                (f"baseline {args.baseline} authenticated (1 worker)",
                 baseline.base + "/private/bench", [f"Cookie: {baseline_cookie}"],
                 baseline.proc.pid),
            ]  # fmt: skip
        # Every row must answer 200 before anything is measured.
        for name, url, headers, _ in rows:
            req = urllib.request.Request(url, headers=dict(h.split(": ", 1) for h in headers))
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status != 200:
                    raise RuntimeError(f"{name}: {url} answered {r.status}")
        if extra:
            check_issue16(extra, rows, sc1.base, cookie)
        if "bearer" in extra:  # the token outlives the run (the IdP's access_token_ttl)
            left = token_lifetime(token)
            budget = len(rows) * (args.rounds * args.duration + args.warmup) + 60
            if left < budget:
                raise RuntimeError(f"the access token expires in {left:.0f} s, before the run")

        results: dict[str, list[Result]] = {name: [] for name, _, _, _ in rows}
        if args.warmup > 0:
            for _name, url, headers, _ in rows:
                wrk(url, args.connections, args.warmup, headers)
        for rnd in range(args.rounds):
            order = rows if rnd % 2 == 0 else list(reversed(rows))
            for name, url, headers, pid in order:
                res = wrk(url, args.connections, args.duration, headers, pid, upstream_pid)
                results[name].append(res)
                print(
                    f"round {rnd + 1}: {name:36} {res.rps:10.0f} req/s  p50 {res.p50_ms:.2f} ms"
                    f"  p99 {res.p99_ms:.2f} ms {res.errors}",
                    file=sys.stderr,
                    flush=True,
                )

        best = {name: max(rs, key=lambda r: r.rps) for name, rs in results.items()}
        bare = best["bare aiohttp proxy"].rps
        nginx = best["nginx reverse proxy"].rps if have_nginx else None

        rss = {sc.name: rss_mib(sc.proc) for sc in (sc1, sc2)}
        cmds = redis_commands_per_request(sc2.base, cookie2)
        mem = redis_bytes_per_session(prefix, cookie2, sc2.key)

        print()
        print(
            f"wrk -t2 -c{args.connections} -d{args.duration:g}s --latency, best of "
            f"{args.rounds} alternating round(s); {os.cpu_count()} CPUs; upstream: "
            f"{'nginx' if have_nginx else 'Python (nginx missing)'}; sidecar access log off "
            "(on in the access log rows)"
        )
        print()
        print(
            "| row | req/s | p50 ms | p99 ms | x bare aiohttp | x nginx proxy "
            "| proxy CPU µs/request | wrk + upstream CPU µs/request |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, _, _, _ in rows:
            r = best[name]
            err = f" ⚠ {r.errors}" if r.errors else ""
            cpu = f"{r.cpu_us:.0f}" if r.cpu_us is not None else "—"
            others = f"{r.others_us:.0f}" if r.others_us is not None else "—"
            print(
                f"| {name}{err} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
                f"| {ratio(r.rps, bare)} | {ratio(r.rps, nginx)} | {cpu} | {others} |"
            )
        print()
        print("RSS per sidecar process (after the runs):")
        for name, procs_rss in rss.items():
            for pid, role, mib in procs_rss:
                print(f"- {name} pid {pid} ({role}): {mib:.1f} MiB")
        print(
            f"Redis commands per authenticated request: {cmds:.2f} (2-worker sidecar, 500 "
            "sequential requests, INFO delta; the session cache serves repeats)"
        )
        print(
            f"Redis bytes per session: {mem.redis:,} (MEMORY USAGE of the key; sealed record "
            f"{mem.sealed:,}) against {mem.tokens:,} raw token bytes (access + refresh + ID "
            f"token): raw + {mem.redis - mem.tokens:,}"
        )

        auth = best[AUTH_ROW]
        pub1 = best["sidecar public (1 worker)"]
        pub2 = best["sidecar public (2 workers, Redis)"]
        auth2 = best["sidecar authenticated (2 workers, Redis)"]
        bare_r = best["bare aiohttp proxy"]
        added = max(auth.p99_ms, pub1.p99_ms) - bare_r.p99_ms
        checks = [
            (
                "authenticated ≥ 0.95 x bare aiohttp proxy",
                f"{auth.rps / bare:.2f}x",
                auth.rps / bare >= TARGETS["auth_vs_bare"],
            ),
            (
                "2 workers ≥ 1.6 x 1 worker (public / authenticated rows)",
                f"{pub2.rps / pub1.rps:.2f}x / {auth2.rps / auth.rps:.2f}x "
                f"(ceiling here: {ceiling(pub2, pub1)} / {ceiling(auth2, auth)})",
                min(pub2.rps / pub1.rps, auth2.rps / auth.rps) >= TARGETS["w2_vs_w1"],
            ),
            (
                "2 workers ≥ 0.25 x nginx reverse proxy (authenticated)",
                f"{auth2.rps / nginx:.2f}x" if nginx else "no nginx",
                bool(nginx) and auth2.rps / nginx >= TARGETS["w2_vs_nginx"],
            ),
            (
                "p99 added over the bare proxy ≤ 1 ms (worse of public/authenticated)",
                f"{added:+.2f} ms",
                added <= TARGETS["p99_added_ms"],
            ),
        ]
        if baseline is not None:
            print()
            for kind in ("public", "authenticated"):
                new = best[f"sidecar {kind} (1 worker)"]
                old = best[f"baseline {args.baseline} {kind} (1 worker)"]
                cpu = ratio(new.cpu_us, old.cpu_us)
                print(
                    f"{kind}, this tree vs {args.baseline}: {new.rps / old.rps:.3f}x req/s, "
                    f"{cpu} CPU per request"
                )
        if extra:
            print()
            print(f"Extra rows (--rows {','.join(r for r in EXTRA_ROWS if r in extra)}):")
            for line in issue16_lines(extra, results, best):
                print(f"- {line}")
        print()
        print("Targets (issue 7):")
        for what, value, ok in checks:
            print(f"- {what}: {value} — {'met' if ok else 'NOT met'}")
        extra = mem.redis - mem.tokens
        print(
            f"- Redis bytes per session ≤ raw token bytes + 200: raw + {extra:,} — "
            f"{'met' if extra <= TARGETS['redis_extra_bytes'] else 'NOT met'}"
        )
        return 0
    finally:
        if idp is not None:
            idp.stop()
        procs.stop_all()
        try:
            redis_cleanup(prefix)
        except Exception as e:  # Redis absent: nothing to clean
            print(f"redis cleanup skipped: {e}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
