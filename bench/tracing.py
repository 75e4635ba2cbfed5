"""What tracing costs a request: the authenticated row with telemetry off, on at ratio 1.0 and
on at ratio 0 (docs/operations.md, "Traces").

    .venv/bin/python bench/tracing.py [--duration 10] [--connections 50] [--rounds 3]

Three one-worker sidecars as in bench/proxy.py (Redis store, nginx upstream, a session from
a real login at the dev IdP, access log off), the same except `telemetry`: off; on with
`sampling: 1.0` (every request a trace of three spans, exported over OTLP/HTTP to a sink in
this script that answers 200 and counts what it gets); on with `sampling: 0` (no span
recorded, the upstream still gets a `traceparent`). The rows alternate each round; each
row's best round is shown, with its CPU time per request (user + system, psutil), which
moves far less than req/s on a shared 2-core machine. Needs `wrk` (and `nginx-light`).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxy as bench  # bench/proxy.py: the processes, the login, the IdP and wrk


class _Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that takes every export and keeps only counts."""

    exports = 0
    received = 0

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(size)
        type(self).exports += 1
        type(self).received += size
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; best wins")
    parser.add_argument("--warmup", type=float, default=1, help="seconds of warm-up per row")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: `apt-get install wrk`.", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="sidecar-tracing-"))
    procs = bench.Procs(tmp)
    idp = None
    sink = ThreadingHTTPServer((bench.HOST, 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = f"http://{bench.HOST}:{sink.server_address[1]}/v1/traces"
    prefix = f"bench-{os.getpid()}-{secrets.token_hex(4)}"
    rows = {
        "telemetry off": {},
        "tracing on, sampling 1.0": {"otlp_endpoint": endpoint, "sampling": 1.0},
        "tracing on, sampling 0": {"otlp_endpoint": endpoint, "sampling": 0.0},
    }
    try:
        ports = {name: bench.free_port() for name in [*rows, "up", "idp"]}
        upstream = f"{bench.HOST}:{ports['up']}"
        if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
            upstream_pid: int | None = bench.start_nginx(procs, "upstream", ports["up"], None)
        else:
            bench.start_upstream(procs, ports["up"])
            upstream_pid = None
        idp = bench.ThreadedIdP(ports["idp"], [f"http://{bench.HOST}:{ports[n]}" for n in rows])
        sidecars = {}
        for i, (name, telemetry) in enumerate(rows.items()):
            sc = bench.start_sidecar(
                procs, f"sidecar-{i}", ports[name], idp.issuer, "http://" + upstream, 1, prefix,
                extra_config={"telemetry": telemetry},
            )  # fmt: skip
            sidecars[name] = (sc, f"Cookie: {bench.login(sc.base)}")
        best: dict[str, bench.Result] = {}
        spans_before = _Sink.received
        for round_ in range(args.rounds):
            order = list(rows) if round_ % 2 == 0 else list(reversed(rows))
            for name in order:
                sc, cookie = sidecars[name]
                url = sc.base + "/private/bench"
                bench.wrk(url, args.connections, args.warmup, [cookie])
                result = bench.wrk(
                    url, args.connections, args.duration, [cookie], sc.proc.pid, upstream_pid
                )
                cpu = result.cpu_us or 0
                line = f"round {round_ + 1} {name}: {result.rps:,.0f} req/s, {cpu:.0f} µs CPU"
                print(line, file=sys.stderr, flush=True)
                if name not in best or result.rps > best[name].rps:
                    best[name] = result
        off = best["telemetry off"]
        print()
        print(
            f"wrk -c{args.connections} -d{args.duration:g}s, {args.rounds} alternating rounds, "
            "best round per row; 1 worker, authenticated"
        )
        print("| row | req/s | p50 ms | p99 ms | x off | CPU µs/request | + µs/request |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name in rows:
            r = best[name]
            extra = (r.cpu_us or 0) - (off.cpu_us or 0)
            print(
                f"| {name} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                f"{r.rps / off.rps:.3f}x | {r.cpu_us or 0:.0f} | {extra:+.0f} |"
            )
        print(
            f"\nOTLP sink: {_Sink.exports} exports, "
            f"{(_Sink.received - spans_before) / 2**20:.1f} MiB of protobuf"
        )
        return 0
    finally:
        procs.stop_all()
        sink.shutdown()
        if idp is not None:
            idp.stop()
        bench.redis_cleanup(prefix)


if __name__ == "__main__":
    sys.exit(main())
