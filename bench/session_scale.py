"""Scale benchmark (issue 7): does a request cost more with 100,000 sessions in Redis?

    .venv/bin/python bench/session_scale.py [--sessions 1000,100000] [--hot 1000] [--duration 8]

The first count is measured again at the end (the extra sessions deleted), so the table
shows how much two runs at the same count differ on this machine.

One sidecar process (Redis store on 127.0.0.1:6379, a unique key prefix deleted at exit)
in front of nginx (or the bench's Python upstream), and the dev IdP in a thread for one real
login: its record, opened with the sidecar's key, is the template for every generated session
(same token sizes; each gets its own id, subject and seal). For each session count it fills
Redis up to that count, then wrk sends `GET /private/bench` with a random cookie out of `--hot`
sessions per request (a wrk Lua script), once with the session cache off (`cache_ttl: 0s`:
every request reads, opens and parses its record from Redis) and once with it on (default).
Printed: req/s and latency per row, and Redis memory per session (INFO used_memory growth over
the generated sessions, indexes included; MEMORY USAGE of one record) against raw token bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxy as bench

WRK_SCRIPT = """
local cookies = {}
function init(args)
  for line in io.lines(args[1]) do cookies[#cookies + 1] = line end
end
function request()
  return wrk.format("GET", "/private/bench", {["Cookie"] = cookies[math.random(#cookies)]})
end
"""


async def fill(prefix: str, key: str, template_cookie: str, total: int, have: int) -> list[str]:
    """Create sessions up to `total` (cloning the template's record); their cookie values."""
    from sidecar.config import SessionConfig
    from sidecar.redis.store import RedisSessionStore
    from sidecar.session import Keyring, SessionManager

    store = RedisSessionStore.from_url(bench.REDIS_URL, prefix)
    keyring = Keyring.from_base64([key])
    sessions = SessionManager(store, keyring, SessionConfig(encryption_keys=[key]))
    template_id = template_cookie.partition("=")[2]
    template = await sessions.load(template_id)
    if template is None:
        raise RuntimeError("the template session is not in Redis")
    cookies: list[str] = []
    semaphore = asyncio.Semaphore(256)

    async def one(i: int) -> None:
        async with semaphore:
            record = template.record.evolve(
                subject=f"user-{i}", claims={**template.record.claims, "sub": f"user-{i}"}
            )
            created = await sessions.create(record)
            cookies.append(f"{bench.COOKIE}={created.id}")

    await asyncio.gather(*(one(i) for i in range(have, total)))
    await store.close()
    return cookies


async def drop(prefix: str, cookies: list[str]) -> None:
    """Delete the sessions behind `cookies` (record, attempt mark and user index)."""
    from sidecar.redis.store import RedisSessionStore
    from sidecar.session import session_hash

    store = RedisSessionStore.from_url(bench.REDIS_URL, prefix)
    client = store.client
    for start in range(0, len(cookies), 1000):
        keys = []
        for cookie in cookies[start : start + 1000]:
            h = session_hash(cookie.partition("=")[2])
            keys += [f"{prefix}:s:{{{h}}}", f"{prefix}:a:{{{h}}}"]
        await client.unlink(*keys)
    await store.close()


def used_memory() -> int:
    import redis

    r = redis.Redis.from_url(bench.REDIS_URL)
    try:
        return int(r.info("memory")["used_memory"])
    finally:
        r.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", default="1000,100000", help="session counts, ascending")
    parser.add_argument("--hot", type=int, default=1000, help="sessions wrk picks from")
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    counts = [int(c) for c in args.sessions.split(",")]
    if shutil.which("wrk") is None:
        print("wrk is not installed: `apt-get install wrk`, then run again.", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="sidecar-scale-"))
    procs = bench.Procs(tmp)
    prefix = f"bench-scale-{os.getpid()}-{secrets.token_hex(3)}"
    idp = None
    try:
        ports = {k: bench.free_port() for k in ("up", "cold", "warm", "idp")}
        upstream = f"{bench.HOST}:{ports['up']}"
        bench.start_upstream(procs, ports["up"])
        bases = [f"http://{bench.HOST}:{ports['cold']}", f"http://{bench.HOST}:{ports['warm']}"]
        idp = bench.ThreadedIdP(ports["idp"], bases)
        cold = bench.start_sidecar(
            procs,
            "cache-off",
            ports["cold"],
            idp.issuer,
            "http://" + upstream,
            1,
            prefix,
            cache_ttl="0s",
        )
        key = cold.key
        warm = bench.start_sidecar(
            procs,
            "cache-on",
            ports["warm"],
            idp.issuer,
            "http://" + upstream,
            1,
            prefix,
            encryption_keys=[key],
        )
        template = bench.login(cold.base)
        memory_before = used_memory()
        probe = bench.redis_bytes_per_session(prefix, template, key)

        cookies: list[str] = []
        script = tmp / "cookies.lua"
        script.write_text(WRK_SCRIPT)
        cookie_file = tmp / "cookies.txt"
        rows: list[tuple[int, str, bench.Result, float | None]] = []
        # Ascending counts, then back down to the first: the repeat tells noise from growth.
        plan = [*counts, counts[0]] if len(counts) > 1 else counts
        for total in plan:
            per: float | None = None
            if total >= len(cookies):
                cookies += asyncio.run(fill(prefix, key, template, total, len(cookies)))
                per = (used_memory() - memory_before) / len(cookies)
            else:  # the user index keys stay: no memory figure for the repeat
                asyncio.run(drop(prefix, cookies[total:]))
                del cookies[total:]
            cookie_file.write_text("\n".join(random.sample(cookies, min(args.hot, len(cookies)))))
            for name, sc in (("cache off", cold), ("cache on", warm)):
                argv = [
                    "wrk",
                    "-t2",
                    f"-c{args.connections}",
                    f"-d{args.duration:g}s",
                    "--latency",
                    "-s",
                    str(script),
                    sc.base,
                    "--",
                    str(cookie_file),
                ]
                out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
                result = bench.parse_wrk(out)
                rows.append((total, name, result, per))
                print(
                    f"{total:>7} sessions, {name:9}: {result.rps:8.0f} req/s "
                    f"p50 {result.p50_ms:.2f} ms p99 {result.p99_ms:.2f} ms {result.errors}",
                    file=sys.stderr,
                    flush=True,
                )

        print()
        print(
            f"wrk -t2 -c{args.connections} -d{args.duration:g}s, `GET /private/bench` with a "
            f"random cookie of {args.hot} sessions; one sidecar process; {os.cpu_count()} CPUs"
        )
        print()
        print(
            "| sessions in Redis | session cache | req/s | p50 ms | p99 ms | Redis bytes/session |"
        )
        print("|---:|---|---:|---:|---:|---:|")
        for total, name, r, per in rows:
            err = f" ⚠ {r.errors}" if r.errors else ""
            print(
                f"| {total:,} | {name}{err} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
                f"| {f'{per:,.0f}' if per else '—'} |"
            )
        print()
        print(
            f"One record: MEMORY USAGE {probe.redis:,} bytes (sealed {probe.sealed:,}) against "
            f"{probe.tokens:,} raw token bytes: raw + {probe.redis - probe.tokens:,}. "
            "Bytes/session above is used_memory growth per generated session, so it also "
            "counts the per-user index keys (one user per session here)."
        )
        return 0
    finally:
        if idp is not None:
            idp.stop()
        procs.stop_all()
        bench.redis_cleanup(prefix)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
