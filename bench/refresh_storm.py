"""Refresh storm (issue 4): C concurrent clients on one session while its token keeps expiring,
then bursts of M concurrent requests at K sessions whose tokens have all expired.

    .venv/bin/python bench/refresh_storm.py [--duration 10] [--clients 100]
        [--replicas 1,3] [--ttl 3] [--token-delay 0] [--burst 300] [--sessions 1,30]

Everything listens on 127.0.0.1 on free ports and is stopped at exit:

* the dev IdP (`sidecar.dev.idp`, refresh-token rotation and reuse detection) in a thread of
  this script, access tokens living `--ttl` seconds (3 s: a rotation about every 2 s with
  `refresh.before_expiry: 1s`);
* an upstream (aiohttp, a subprocess of this script) answering 200 with a small body;
* for each replica count: that many `python -m sidecar run` processes, Redis store on
  127.0.0.1:6379 under a unique key prefix (deleted at exit), `public_paths: []`.

For each replica count it logs in once (code flow through replica 1), then `--clients`
aiohttp clients send `GET /api` with that one session cookie for `--duration` seconds,
client i always to replica i mod N. It prints requests, req/s, non-200 answers, client
p50/p99/max latency, the IdP's refresh grants and reuse detections, the sidecars' rotations
(`sidecar_refresh_total{outcome="refreshed"}`), and per replica the refresh figures from
its `/metrics`: IdP token-request latency, lock contention and lock wait, single-flight joins.

Then, for each K in `--sessions`: K fresh logins; `--burst` concurrent requests spread over
the K sessions and the replicas while the tokens are fresh (the baseline), then the same burst
once every token has expired, so each request waits for its session's refresh (a lock holder's
grant, or a wait on another replica's). It prints the IdP's refresh grants (K when each
session refreshed once), reuse detections, non-200 answers, both bursts' p50/p99, the latency
the refresh added (expired minus fresh, per percentile) and, next to it, the IdP's own token
latency as the sidecars measured it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxy as bench

HOST = bench.HOST
REDIS_URL = bench.REDIS_URL
COOKIE = "sidecar_storm"
JSON = {"Accept": "application/json"}
READY_TIMEOUT = 30.0  # seconds for a sidecar process to answer /readyz
free_port = bench.free_port


# --- the upstream (runs as `bench/refresh_storm.py --upstream PORT`) ----------------------


def run_upstream(port: int) -> None:
    from aiohttp import web

    async def handle(request: web.BaseRequest) -> web.Response:
        ok = request.headers.get("Authorization", "").startswith("Bearer ")
        return web.Response(status=200 if ok else 401, text="hello from the upstream\n")

    async def main() -> None:
        runner = web.ServerRunner(web.Server(handle), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


# --- sidecar processes --------------------------------------------------------------------


@dataclasses.dataclass
class Replica:
    base: str
    management: str
    proc: subprocess.Popen[bytes]
    log: Path


def start_replica(
    tmp: Path, port: int, issuer: str, upstream: str, key: str, prefix: str
) -> Replica:
    import yaml

    base, mport = f"http://{HOST}:{port}", free_port()
    config = {
        "server": {"listen": f"{HOST}:{port}", "public_url": base},
        "management": {"listen": f"{HOST}:{mport}"},
        "oidc": {
            "issuer": issuer,
            "client_id": bench.CLIENT_ID,
            "client_secret": bench.CLIENT_SECRET,
            "scopes": ["openid", "email", "profile", "offline_access"],
            "post_logout_redirect_url": base + "/",
        },
        "session": {
            "store": "redis",
            "cookie_name": COOKIE,
            "cookie_secure": False,
            "encryption_keys": [key],
        },
        "redis": {"url": REDIS_URL, "key_prefix": prefix},
        "refresh": {"before_expiry": "1s", "idp_timeout": "5s", "lock_ttl": "15s"},
        "upstreams": [{"path": "/", "url": upstream}],
        "public_paths": [],
        "logging": {"level": "warning", "access_log": False},
    }
    path = tmp / f"sidecar-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp / f"sidecar-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Replica(base, f"http://{HOST}:{mport}", proc, log)


async def wait_ready(session: Any, replica: Replica) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if replica.proc.poll() is not None:
            raise RuntimeError(f"sidecar exited: {replica.log.read_text(errors='replace')}")
        try:
            async with session.get(replica.management + "/readyz") as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(f"sidecar not ready: {replica.log.read_text(errors='replace')}")


async def login(base: str, user: str = "alice") -> str:
    """A full code flow through the sidecar and the dev IdP; the session cookie's value."""
    import aiohttp

    nav = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as s:
        url = base + "/app"
        for _ in range(4):
            async with s.get(url, headers=nav, allow_redirects=False) as r:
                if r.status not in (302, 303):
                    raise RuntimeError(f"login: {url} answered {r.status}")
                location = r.headers["Location"]
            url = location if "://" in location else base + location
            if "/authorize" in url:
                url += "&login_hint=" + user
        for cookie in jar:
            if cookie.key == COOKIE:
                return cookie.value
    raise RuntimeError("login: no session cookie was set")


# --- metrics ------------------------------------------------------------------------------


def scrape(text: str) -> dict[str, float]:
    """`name{labels}` → value, for the sidecar's refresh samples."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "refresh" in sample.name or "idp_token" in sample.name:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def bucket_quantile(samples: dict[str, float], name: str, q: float) -> float | None:
    """Upper bound of the histogram bucket holding quantile q (None without samples)."""
    buckets = sorted(
        (float(k.split("le=")[1].rstrip("}")), v)
        for k, v in samples.items()
        if k.startswith(name + "_bucket{")
    )
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    for le, count in buckets:
        if count >= q * total:
            return le
    return None


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.1f}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- one scenario -------------------------------------------------------------------------


async def scenario(
    tmp: Path, idp: bench.ThreadedIdP, upstream: str, ports: list[int], args: argparse.Namespace
) -> None:
    import aiohttp
    import redis.asyncio as redis

    prefix = f"storm-{secrets.token_hex(4)}"
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    replicas = [start_replica(tmp, p, idp.issuer, upstream, key, prefix) for p in ports]
    connector = aiohttp.TCPConnector(limit=0)
    http = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())
    try:
        for replica in replicas:
            await wait_ready(http, replica)
        cookie = await login(replicas[0].base)
        before = idp.stats()
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        stop_at = time.monotonic() + args.duration

        async def client(i: int) -> None:
            replica = replicas[i % len(replicas)]
            while time.monotonic() < stop_at:
                status, seconds = await get(http, replica, cookie)
                latencies.append(seconds)
                statuses[status] = statuses.get(status, 0) + 1

        wall = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(args.clients)))
        wall = time.monotonic() - wall
        after = idp.stats()
        per_replica = [await metrics(http, r) for r in replicas]
        report_storm(replicas, args, wall, latencies, statuses, before, after, per_replica)
        rows = [await burst(http, idp, replicas, k, args) for k in args.sessions]
        report_bursts(len(replicas), rows)
    finally:
        await http.close()
        for replica in replicas:
            replica.proc.terminate()
        for replica in replicas:
            try:
                replica.proc.wait(20)
            except subprocess.TimeoutExpired:
                replica.proc.kill()
        client_ = redis.Redis.from_url(REDIS_URL)
        keys = [k async for k in client_.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client_.delete(*keys)
        await client_.aclose()


async def get(http: Any, replica: Replica, cookie: str) -> tuple[int, float]:
    """One API call with a session cookie: (status, 0 without an answer; seconds)."""
    import aiohttp

    started = time.perf_counter()
    try:
        async with http.get(
            replica.base + "/api", headers={**JSON, "Cookie": f"{COOKIE}={cookie}"}
        ) as r:
            await r.read()
            status = r.status
    except aiohttp.ClientError:
        status = 0
    return status, time.perf_counter() - started


async def metrics(http: Any, replica: Replica) -> dict[str, float]:
    async with http.get(replica.management + "/metrics") as r:
        return scrape(await r.text())


def report_storm(
    replicas: list[Replica],
    args: argparse.Namespace,
    wall: float,
    latencies: list[float],
    statuses: dict[int, int],
    before: Any,
    after: Any,
    per_replica: list[dict[str, float]],
) -> None:
    n = len(latencies)
    non_200 = n - statuses.get(200, 0)
    rotations = sum(m.get("sidecar_refresh_total{outcome=refreshed}", 0) for m in per_replica)
    print(f"\n### {len(replicas)} replica(s), {args.clients} clients, {wall:.1f} s\n")
    print(f"requests            {n}")
    print(f"req/s               {n / wall:,.0f}")
    print(f"non-200             {non_200}  {dict(sorted(statuses.items()))}")
    print(
        f"latency p50/p99/max {ms(percentile(latencies, 0.5))} / "
        f"{ms(percentile(latencies, 0.99))} / {ms(max(latencies))} ms"
    )
    print(f"rotations (sidecar) {rotations:.0f}")
    print(f"refresh grants (IdP) {after.refresh_grants - before.refresh_grants}")
    print(f"token requests (IdP) {after.token_requests - before.token_requests}")
    print(f"reuse detections    {after.reuse_detected - before.reuse_detected}")
    print()
    print(
        "| replica | refreshed | elsewhere | other outcomes | IdP token ms mean / p99≤ "
        "| lock contention | lock waits | lock wait ms mean / p99≤ | joins |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for i, m in enumerate(per_replica, 1):
        outcomes = {
            k.split("outcome=")[1].rstrip("}"): v
            for k, v in m.items()
            if k.startswith("sidecar_refresh_total{")
        }
        other = {
            k: int(v)
            for k, v in outcomes.items()
            if k not in ("refreshed", "refreshed_elsewhere") and v
        }
        idp_n = m.get("sidecar_idp_token_request_duration_seconds_count", 0)
        idp_sum = m.get("sidecar_idp_token_request_duration_seconds_sum", 0)
        wait_n = m.get("sidecar_refresh_lock_wait_seconds_count", 0)
        wait_sum = m.get("sidecar_refresh_lock_wait_seconds_sum", 0)
        print(
            f"| {i} | {outcomes.get('refreshed', 0):.0f} "
            f"| {outcomes.get('refreshed_elsewhere', 0):.0f} | {other or '—'} "
            f"| {ms(idp_sum / idp_n if idp_n else None)} / "
            f"{ms(bucket_quantile(m, 'sidecar_idp_token_request_duration_seconds', 0.99))} "
            f"| {m.get('sidecar_refresh_lock_contention_total', 0):.0f} | {wait_n:.0f} "
            f"| {ms(wait_sum / wait_n if wait_n else None)} / "
            f"{ms(bucket_quantile(m, 'sidecar_refresh_lock_wait_seconds', 0.99))} "
            f"| {m.get('sidecar_refresh_singleflight_joins_total', 0):.0f} |"
        )


# --- bursts at expired sessions -------------------------------------------------------------


@dataclasses.dataclass
class BurstRow:
    sessions: int
    requests: int
    non_200: int
    grants: int
    reuse: int
    fresh: list[float]  # latencies, s
    expired: list[float]
    idp_token: float | None  # mean token-request latency the sidecars measured, s


async def fire(
    http: Any, replicas: list[Replica], cookies: list[str], n: int
) -> list[tuple[int, float]]:
    """`n` requests at once, request i on session i mod K and replica i mod N."""
    calls = (get(http, replicas[i % len(replicas)], cookies[i % len(cookies)]) for i in range(n))
    return list(await asyncio.gather(*calls))


def idp_token_mean(m0: list[dict[str, float]], m1: list[dict[str, float]]) -> float | None:
    """Mean IdP token-request latency the replicas measured between two scrapes."""
    name = "sidecar_idp_token_request_duration_seconds"
    pairs = list(zip(m0, m1, strict=True))
    count = sum(b.get(name + "_count", 0) - a.get(name + "_count", 0) for a, b in pairs)
    total = sum(b.get(name + "_sum", 0) - a.get(name + "_sum", 0) for a, b in pairs)
    return total / count if count else None


async def burst(
    http: Any, idp: bench.ThreadedIdP, replicas: list[Replica], k: int, args: argparse.Namespace
) -> BurstRow:
    """K new sessions; a burst while their tokens are fresh, then one after they all expired."""
    users = ("alice", "bob", "carol")
    cookies = list(
        await asyncio.gather(
            *(login(replicas[i % len(replicas)].base, users[i % 3]) for i in range(k))
        )
    )
    logged_in = time.monotonic()
    await fire(http, replicas, cookies, args.burst)  # warm-up: opens the client's connections
    fresh = await fire(http, replicas, cookies, args.burst)
    # Every token expired: the IdP's exp is a whole second, hence the extra second.
    await asyncio.sleep(max(0.0, logged_in + args.ttl + 1.0 - time.monotonic()))
    before, m0 = idp.stats(), [await metrics(http, r) for r in replicas]
    expired = await fire(http, replicas, cookies, args.burst)
    after, m1 = idp.stats(), [await metrics(http, r) for r in replicas]
    answers = fresh + expired
    return BurstRow(
        sessions=k,
        requests=args.burst,
        non_200=sum(1 for status, _ in answers if status != 200),
        grants=after.refresh_grants - before.refresh_grants,
        reuse=after.reuse_detected - before.reuse_detected,
        fresh=[t for _, t in fresh],
        expired=[t for _, t in expired],
        idp_token=idp_token_mean(m0, m1),
    )


def report_bursts(replicas: int, rows: list[BurstRow]) -> None:
    print(
        f"\nbursts at expired sessions, {replicas} replica(s):\n\n"
        "| sessions | requests | non-200 | IdP refresh grants | reuse | fresh p50 / p99 ms "
        "| expired p50 / p99 ms | added by refresh p50 / p99 ms | IdP token ms (mean) |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for row in rows:
        f50, f99 = percentile(row.fresh, 0.5), percentile(row.fresh, 0.99)
        e50, e99 = percentile(row.expired, 0.5), percentile(row.expired, 0.99)
        print(
            f"| {row.sessions} | {row.requests} | {row.non_200} | {row.grants} | {row.reuse} "
            f"| {ms(f50)} / {ms(f99)} | {ms(e50)} / {ms(e99)} "
            f"| {ms(e50 - f50)} / {ms(e99 - f99)} | {ms(row.idp_token)} |"
        )


async def run(args: argparse.Namespace, idp: bench.ThreadedIdP, upstream: str, ports: Any) -> None:
    print(
        f"refresh storm: access_token_ttl {args.ttl:g} s, refresh.before_expiry 1 s, "
        f"IdP token delay {args.token_delay:g} s, {args.duration:g} s per run; "
        f"python {sys.version.split()[0]}"
    )
    with tempfile.TemporaryDirectory(prefix="refresh-storm-") as tmp:
        for count in args.counts:
            await scenario(Path(tmp), idp, upstream, ports[count], args)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--upstream":
        run_upstream(int(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per replica count")
    parser.add_argument("--clients", type=int, default=100, help="concurrent clients")
    parser.add_argument("--replicas", default="1,3", help="replica counts to run, in order")
    parser.add_argument("--ttl", type=float, default=3, help="access token lifetime, seconds")
    parser.add_argument("--token-delay", type=float, default=0.0, help="IdP /token delay, s")
    parser.add_argument("--burst", type=int, default=300, help="requests per burst")
    parser.add_argument("--sessions", default="1,30", help="sessions per burst, in order")
    args = parser.parse_args()
    args.counts = [int(c) for c in args.replicas.split(",")]
    args.sessions = [int(k) for k in args.sessions.split(",")]
    ports = {c: [free_port() for _ in range(c)] for c in args.counts}
    bases = [f"http://{HOST}:{p}" for ps in ports.values() for p in ps]
    idp = bench.ThreadedIdP(
        free_port(), bases, access_token_ttl=args.ttl, token_delay=args.token_delay
    )
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port)])
    try:
        asyncio.run(run(args, idp, f"http://{HOST}:{up_port}", ports))
    finally:
        upstream.terminate()
        upstream.wait(10)
        idp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
