"""Central logout (issue 15): one back-channel logout ending 1,000 sessions, and what a login
costs in Redis round trips against the commit before the issue.

    .venv/bin/python bench/logout.py [--sessions 1000] [--repeat 5] [--logins 20]
                                     [--baseline c134cb4]

Everything runs on 127.0.0.1: the dev IdP in a thread of the script, Redis on :6379 (one
unique key prefix per sidecar, deleted at exit), and two sidecars (`python -m sidecar run`,
one worker, Redis store, default session settings, so `session.max_per_user: 0`): one from
this tree, one from `--baseline` (`git archive`d to a temp directory).

1. **Back-channel logout.** The script creates `--sessions` sessions of one user directly
   through `SessionManager.create` (same issuer and sub; each with its own `sid`, or without
   any `sid`, alternating per repetition), then times the whole `POST /oauth2/backchannel-logout`
   carrying a sub-only logout token the dev IdP signed. Afterwards it checks that the
   sidecar counted every session as ended (`sidecar_logout_total{kind="backchannel"}`), that
   `SessionManager.sessions_of_user` is empty and that no record, metadata or index key is
   left under the prefix. Printed: min / median / max seconds per variant (target < 1 s),
   and the Redis commands of one more, untimed, logout recorded with MONITOR.
2. **Redis commands per login.** `--logins` complete browser logins (GET a protected path →
   /oauth2/start → the IdP's authorize with `login_hint` → /oauth2/callback) at each sidecar,
   alternating, after one warm-up login each. Redis MONITOR records the run; an ECHO marker
   goes between logins, and a login is charged the commands issued between its markers that
   name its sidecar's prefix (keys or channel), except the change feed's heartbeat PUBLISH
   (every 0.5 s, idle traffic) and commands run inside Lua scripts. An idle window as long
   as the logins took is measured the same way: it should cost nothing. The login path uses
   no pipelines, so each command is one round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxy as bench  # bench/proxy.py: processes, the dev IdP, the login, Redis clean-up

REPO = Path(__file__).resolve().parent.parent
SUB = "bench-logout-user"
TARGET_SECONDS = 1.0
MARK = "bench-logout-mark"
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_MONITOR_LINE = re.compile(r"^[\d.]+ \[\d+ (\S*)\] (.*)$", re.S)


def on_idp(idp: bench.ThreadedIdP, fn: Callable[[], Any]) -> Any:
    """Run `fn` on the IdP's own loop thread (its state is not thread-safe)."""

    async def call() -> Any:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), idp._loop).result(10)


def logout_token(idp: bench.ThreadedIdP, sub: str) -> str:
    return str(on_idp(idp, lambda: idp.idp.backchannel_logout_token(bench.CLIENT_ID, sub=sub)))


# --- Redis MONITOR, split by markers ---------------------------------------------------------


@dataclass
class Command:
    client: str  # "lua" for commands a script ran
    name: str
    args: list[str]


@dataclass
class Segment:
    """The commands between two markers; `until` names the marker that closed it."""

    until: str
    commands: list[Command] = field(default_factory=list)

    def of(self, prefix: str) -> list[Command]:
        """Commands a client sent that name `prefix`'s keys or channel, heartbeats excluded."""
        head = prefix + ":"
        return [
            c
            for c in self.commands
            if c.client != "lua" and any(a.startswith(head) for a in c.args) and not is_heartbeat(c)
        ]

    def heartbeats(self, prefix: str) -> int:
        return sum(1 for c in self.commands if is_heartbeat(c) and c.args[0] == prefix + ":changed")


def is_heartbeat(c: Command) -> bool:
    """The change feed's own heartbeat (sidecar/redis/changes.py): PUBLISH `~…`."""
    return c.name == "PUBLISH" and len(c.args) == 2 and c.args[1].startswith("~")


class Monitor:
    """Redis MONITOR in a thread; `mark(name)` closes the current segment (an ECHO that the
    monitor sees after every command Redis ran before it)."""

    def __init__(self) -> None:
        import redis

        self._ctl = redis.Redis.from_url(bench.REDIS_URL)
        self._watch = redis.Redis.from_url(bench.REDIS_URL).monitor()
        self._watch.__enter__()
        self._token = secrets.token_hex(4)
        self._lines: list[str] = []
        self._thread = threading.Thread(target=self._read, name="redis-monitor", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        connection = self._watch.connection
        stop = f'"{MARK}:{self._token}:stop"'
        while connection is not None:
            raw = connection.read_response()
            line = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
            self._lines.append(line)
            if line.endswith(stop):
                return

    def mark(self, name: str) -> None:
        self._ctl.echo(f"{MARK}:{self._token}:{name}")

    def stop(self) -> list[Segment]:
        """Every segment, in order; the last one ends at the stop marker."""
        self.mark("stop")
        self._thread.join(30)
        self._watch.__exit__()
        self._ctl.close()
        if self._thread.is_alive():
            raise RuntimeError("MONITOR did not see the stop marker")
        head = f"{MARK}:{self._token}:"
        segments = [Segment("")]
        for line in self._lines:
            m = _MONITOR_LINE.match(line)
            if m is None:
                continue
            words = [w.replace('\\"', '"') for w in _QUOTED.findall(m.group(2))]
            if not words:
                continue
            command = Command(m.group(1), words[0].upper(), words[1:])
            if command.name == "ECHO" and command.args and command.args[0].startswith(head):
                segments[-1].until = command.args[0].removeprefix(head)
                segments.append(Segment(""))
            else:
                segments[-1].commands.append(command)
        return segments[:-1]


def redis_count(pattern: str) -> int:
    import redis

    r = redis.Redis.from_url(bench.REDIS_URL)
    try:
        return sum(1 for _ in r.scan_iter(match=pattern, count=1000))
    finally:
        r.close()


def backchannel_logouts(sc: bench.Sidecar) -> float:
    """`sidecar_logout_total{kind="backchannel"}` from the sidecar's /metrics."""
    with urllib.request.urlopen(sc.management + "/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r'^sidecar_logout_total\{kind="backchannel"\} ([\d.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


# --- 1. back-channel logout -----------------------------------------------------------------


@dataclass
class LogoutRun:
    variant: str
    seconds: float
    ended: float


def record(issuer: str, sid: str | None) -> Any:
    """A session of SUB at `issuer`, tokens of a realistic size (about 1.7 KB in all)."""
    from sidecar.session import SessionRecord

    now = time.time()
    return SessionRecord(
        issuer=issuer,
        subject=SUB,
        idp_session_id=sid,
        claims={"email": "bench@example.com", "name": "Bench User"},
        access_token="a" * 800,
        access_expires_at=now + 3600,
        refresh_token="r" * 400,
        refresh_expires_at=now + 12 * 3600,
        id_token="i" * 550,
        created_at=now,
        refreshed_at=now,
        expires_at=now + 12 * 3600,
    )


async def measure_logout(
    sc: bench.Sidecar, idp: bench.ThreadedIdP, prefix: str, sessions: int, repeat: int
) -> tuple[list[LogoutRun], Counter[str], int]:
    """Timed logouts (variants alternating), then one under MONITOR: its commands by name."""
    import aiohttp

    from sidecar.config import SessionConfig
    from sidecar.redis.store import RedisSessionStore
    from sidecar.session import Keyring, SessionManager

    store = RedisSessionStore.from_url(bench.REDIS_URL, prefix)
    manager = SessionManager(
        store, Keyring.from_base64([sc.key]), SessionConfig(encryption_keys=[sc.key])
    )
    url = sc.base + "/oauth2/backchannel-logout"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    runs: list[LogoutRun] = []
    try:
        async with aiohttp.ClientSession() as client:

            async def post(sub: str) -> tuple[int, float]:
                body = "logout_token=" + logout_token(idp, sub)  # minted before the clock
                t0 = time.perf_counter()
                async with client.post(url, data=body, headers=form) as r:
                    await r.read()
                    status = r.status
                return status, time.perf_counter() - t0

            # The sidecar must have the IdP's keys (503 until then); a user without sessions.
            for _ in range(150):
                status, _ = await post("nobody")
                if status != 503:
                    break
                await asyncio.sleep(0.2)
            if status != 200:
                raise RuntimeError(f"warm-up back-channel logout answered {status}")

            semaphore = asyncio.Semaphore(64)

            async def create(sid: str | None) -> None:
                async with semaphore:
                    await manager.create(record(idp.issuer, sid))

            async def fill(variant: str) -> None:
                tag = secrets.token_hex(3)
                sids = [
                    f"sid-{tag}-{i}" if variant == "a sid each" else None for i in range(sessions)
                ]
                await asyncio.gather(*(create(sid) for sid in sids))
                have = len(await manager.sessions_of_user(idp.issuer, SUB))
                if have != sessions:
                    raise RuntimeError(f"{have} sessions of {SUB} in Redis, expected {sessions}")

            async def check(variant: str, ended: float) -> None:
                left = {
                    "sessions_of_user": len(await manager.sessions_of_user(idp.issuer, SUB)),
                    **{k: redis_count(f"{prefix}:{k}:*") for k in ("s", "m", "a", "sub", "sid")},
                }
                leftovers = {k: n for k, n in left.items() if n}
                if leftovers or ended != sessions:
                    raise RuntimeError(
                        f"logout ({variant}): sidecar counted {ended:g} ended of {sessions}; "
                        f"left in Redis: {leftovers or 'nothing'}"
                    )

            variants = ("a sid each", "no sid")
            for i in range(2 * repeat):
                variant = variants[i % 2]
                await fill(variant)
                before = backchannel_logouts(sc)
                status, seconds = await post(SUB)
                if status != 200:
                    raise RuntimeError(f"back-channel logout answered {status}")
                ended = backchannel_logouts(sc) - before
                await check(variant, ended)
                runs.append(LogoutRun(variant, seconds, ended))
                print(f"logout {i + 1:2}: {sessions} sessions ({variant}): {seconds:.3f} s",
                      file=sys.stderr, flush=True)  # fmt: skip

            # One more, untimed, with every Redis command recorded.
            await fill(variants[0])
            monitor = await asyncio.to_thread(Monitor)
            await asyncio.to_thread(monitor.mark, "before")
            status, _ = await post(SUB)
            await asyncio.to_thread(monitor.mark, "after")
            segments = await asyncio.to_thread(monitor.stop)
            if status != 200:
                raise RuntimeError(f"back-channel logout answered {status}")
            (during,) = [s for s in segments if s.until == "after"]
            commands = during.of(prefix)
            by_name = Counter(c.name for c in commands)
            # Fill, timed runs and this one all ended: the user has no session left.
            await check(variants[0], float(sessions))
            inside_lua = sum(1 for c in during.commands if c.client == "lua")
            return runs, by_name, inside_lua
    finally:
        await store.close()


# --- 2. Redis commands per login -------------------------------------------------------------


@dataclass
class LoginCost:
    per_login: list[int] = field(default_factory=list)
    by_name: Counter[str] = field(default_factory=Counter)
    idle: int = 0  # in the idle window
    stray: int = 0  # during the other sidecar's logins
    heartbeats: int = 0


def measure_logins(
    sides: dict[str, tuple[bench.Sidecar, str]], logins: int
) -> tuple[dict[str, LoginCost], float]:
    """Alternating logins under MONITOR; per side its commands per login, and an idle window."""
    for sc, _ in sides.values():
        bench.login(sc.base)  # warm-up: discovery, connections, Lua scripts loaded
    names = list(sides)
    monitor = Monitor()
    monitor.mark("start")
    t0 = time.monotonic()
    for i in range(logins):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            bench.login(sides[name][0].base)
            monitor.mark(f"login:{name}:{i}")
    busy = time.monotonic() - t0
    time.sleep(busy)  # the same length of idle time: background traffic only
    monitor.mark("idle")
    segments = monitor.stop()

    costs = {name: LoginCost() for name in names}
    for seg in segments:
        kind, _, rest = seg.until.partition(":")
        for name, (_, prefix) in sides.items():
            cost = costs[name]
            mine = seg.of(prefix)
            if kind == "login":
                if rest.split(":")[0] == name:
                    cost.per_login.append(len(mine))
                    cost.by_name.update(c.name for c in mine)
                else:  # the other sidecar's login: this one should have been quiet
                    cost.stray += len(mine)
                cost.heartbeats += seg.heartbeats(prefix)
            elif kind == "idle":
                cost.idle += len(mine)
    for name, cost in costs.items():
        if len(cost.per_login) != logins:
            raise RuntimeError(f"{name}: {len(cost.per_login)} logins seen, expected {logins}")
    return costs, busy


# --- the run --------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    return (
        f"min {min(values):.3f} / median {statistics.median(values):.3f} / max {max(values):.3f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=1000, help="sessions of the one user")
    parser.add_argument("--repeat", type=int, default=5, help="timed logouts per variant")
    parser.add_argument("--logins", type=int, default=20, help="counted logins per sidecar")
    parser.add_argument("--baseline", metavar="GIT_REF", default="c134cb4")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sidecar-logout-"))
    procs = bench.Procs(tmp)
    idp: bench.ThreadedIdP | None = None
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    prefixes = {"today": f"bench-logout-{tag}", "baseline": f"bench-logout-base-{tag}"}
    try:
        ports = {k: bench.free_port() for k in ("today", "baseline", "idp", "up")}
        upstream = f"http://{bench.HOST}:{ports['up']}"  # never reached: nothing is proxied
        bases = [f"http://{bench.HOST}:{ports[k]}" for k in ("today", "baseline")]
        idp = bench.ThreadedIdP(ports["idp"], bases)
        source = bench.export_commit(args.baseline, tmp / "baseline")
        sidecars = {
            name: bench.start_sidecar(
                procs, name, ports[name], idp.issuer, upstream, 1, prefixes[name], src
            )
            for name, src in (("today", REPO), ("baseline", source))
        }

        runs, logout_commands, inside_lua = asyncio.run(
            measure_logout(sidecars["today"], idp, prefixes["today"], args.sessions, args.repeat)
        )
        sides = {name: (sidecars[name], prefixes[name]) for name in ("today", "baseline")}
        costs, busy = measure_logins(sides, args.logins)

        print()
        print(
            f"1. Back-channel logout of {args.sessions:,} sessions of one user (sub-only logout "
            f"token), Redis, 1-worker sidecar; whole HTTP POST, {args.repeat} runs per variant; "
            f"{os.cpu_count()} CPUs"
        )
        for variant in ("a sid each", "no sid"):
            seconds = [r.seconds for r in runs if r.variant == variant]
            verdict = "met" if max(seconds) < TARGET_SECONDS else "NOT met"
            print(f"- sessions with {variant}: {spread(seconds)} (target < 1 s: {verdict})")
        print(
            f"  every run: {args.sessions:,} counted ended by the sidecar; sessions_of_user "
            "empty; no record, metadata, attempt or index key left under the prefix"
        )
        total = sum(logout_commands.values())
        listing = ", ".join(f"{n} {k}" for k, n in logout_commands.most_common())
        print(
            f"- Redis commands of one logout ({args.sessions:,} sessions, a sid each; "
            "MONITOR, untimed): "
            f"{total:,}: {listing} (plus {inside_lua:,} inside Lua scripts)"
        )
        print()
        print(
            f"2. Redis commands per login (GET /private/page → /oauth2/start → IdP authorize "
            f"→ /oauth2/callback), {args.logins} logins per sidecar, alternating; "
            "session.max_per_user 0 (default)"
        )
        print(
            f"| sidecar | commands per login (min / mean / max) | by command | idle {busy:.1f} s |"
        )
        print("|---|---:|---|---:|")
        for name, label in (("baseline", args.baseline), ("today", "this tree")):
            c = costs[name]
            mean = statistics.mean(c.per_login)
            names = ", ".join(f"{k} {n / len(c.per_login):g}" for k, n in sorted(c.by_name.items()))
            print(
                f"| {label} | {min(c.per_login)} / {mean:.2f} / {max(c.per_login)} | {names} "
                f"| {c.idle} |"
            )
        new = statistics.mean(costs["today"].per_login)
        old = statistics.mean(costs["baseline"].per_login)
        print(
            f"difference: {new - old:+.2f} commands (= round trips: no pipeline on this path) "
            f"per login, this tree against {args.baseline} — "
            f"{'no more than the baseline' if new <= old else 'MORE than the baseline'}"
        )
        beats = {name: costs[name].heartbeats for name in costs}
        stray = {name: costs[name].stray for name in costs if costs[name].stray}
        if stray:
            print(f"⚠ commands while the other sidecar logged in: {stray}")
        print(
            f"(left out: change-feed heartbeats during the logins, today {beats['today']}, "
            f"baseline {beats['baseline']}; commands run inside Lua scripts)"
        )
        return 0
    finally:
        procs.stop_all()  # first: their connections to the IdP close
        if idp is not None:
            idp.stop()
        for prefix in prefixes.values():
            try:
                bench.redis_cleanup(prefix)
            except Exception as e:  # Redis absent: nothing to clean
                print(f"redis cleanup skipped: {e}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
