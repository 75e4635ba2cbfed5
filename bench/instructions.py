"""Instructions per request, old code against new: a cost figure the machine's noise cannot move.

    .venv/bin/python bench/instructions.py --baseline GIT_REF [--requests 1000]

`bench/proxy.py` measures throughput, which on a shared 2-core machine moves by several per
cent from one run to the next: too coarse for a budget of a few per cent. Here each sidecar
(today's and the one built from GIT_REF) runs under valgrind's callgrind, which counts the
instructions the process executes. After a warm-up the counters are zeroed, a fixed number
of requests is sent one after another on one keep-alive connection, and the count is read:
instructions per request, the same from run to run to well under one per cent.

Both sidecars use one worker, the Redis store (127.0.0.1:6379) and an nginx upstream (a
Python one without nginx), as in bench/proxy.py; one row requests a public path, one an
authenticated one (a session from a real login at the dev IdP). Needs Debian's `valgrind`.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxy as bench  # bench/proxy.py: the processes, the login and the IdP

_TOTALS = re.compile(rb"^(?:totals|summary): (\d+)", re.MULTILINE)


def send(base: str, path: str, cookie: str | None, count: int) -> None:
    """`count` GETs in a row on one keep-alive connection; each must answer 200."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"Cookie": cookie} if cookie else {}
    try:
        for _ in range(count):
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{base}{path} answered {response.status}")
    finally:
        conn.close()


def counted(pid: int, out: Path, run: Callable[[], None]) -> int:
    """Instructions the process `pid` executes while `run()` runs."""
    subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
    run()
    before = set(out.parent.glob(out.name + "*"))
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
    (dump,) = set(out.parent.glob(out.name + "*")) - before
    match = _TOTALS.search(dump.read_bytes())
    if match is None:
        raise RuntimeError(f"no totals in {dump}")
    return int(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", metavar="GIT_REF", required=True)
    parser.add_argument("--requests", type=int, default=1000, help="requests per row")
    parser.add_argument("--warmup", type=int, default=200, help="requests before counting")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed: `apt-get install valgrind`.", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="sidecar-instr-"))
    procs = bench.Procs(tmp)
    idp = None
    prefix = f"bench-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        ports = {k: bench.free_port() for k in ("up", "new", "old", "idp")}
        upstream = f"{bench.HOST}:{ports['up']}"
        bench.start_upstream(procs, ports["up"])
        bases = [f"http://{bench.HOST}:{ports[k]}" for k in ("new", "old")]
        idp = bench.ThreadedIdP(ports["idp"], bases)
        source = bench.export_commit(args.baseline, tmp / "baseline")
        sidecars = {}
        for name, port, src in (("new", ports["new"], None), ("old", ports["old"], source)):
            out = tmp / f"callgrind-{name}.out"
            launcher = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}")
            sc = bench.start_sidecar(
                procs, name, port, idp.issuer, "http://" + upstream, 1, prefix, src,
                launcher=launcher, start_timeout=600,
            )  # fmt: skip
            sidecars[name] = (sc, out, bench.login(sc.base))
        rows = {}
        for name, (sc, out, cookie) in sidecars.items():
            for row, path, with_cookie in (
                ("public", bench.PATH, None),
                ("authenticated", "/private/bench", cookie),
            ):
                send(sc.base, path, with_cookie, args.warmup)
                total = counted(
                    sc.proc.pid, out, partial(send, sc.base, path, with_cookie, args.requests)
                )
                rows[name, row] = total / args.requests
                print(f"{name:3} {row:13} {rows[name, row]:12,.0f} instructions/request",
                      file=sys.stderr, flush=True)  # fmt: skip
        print()
        print(f"callgrind, {args.requests} sequential requests per row after {args.warmup} warm-up")
        print(f"| row | {args.baseline} | today | today / {args.baseline} |")
        print("|---|---:|---:|---:|")
        for row in ("public", "authenticated"):
            old, new = rows["old", row], rows["new", row]
            print(f"| {row} | {old:,.0f} | {new:,.0f} | {new / old:.3f}x |")
        return 0
    finally:
        procs.stop_all()
        if idp is not None:
            idp.stop()
        bench.redis_cleanup(prefix)


if __name__ == "__main__":
    sys.exit(main())
