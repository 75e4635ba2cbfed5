"""Real Redis processes of one test: plain, ACL, TLS, Sentinel and Cluster (never the shared one).

Every server listens on 127.0.0.1 on a free port, keeps nothing on disk (`--save ""
--appendonly no`) unless started with `persist=True` (an fsync'd append-only file, so that
`Fleet.restart` after a kill brings every acknowledged write back), writes its files into a
test's tmp dir and is stopped at teardown. Every wait is bounded and names what it waited for.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.support.ports import free_port
from tests.support.processes import stop_process

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def free_cluster_port() -> int:
    """A free port p whose cluster bus port p + 10000 is free as well.

    Both lie below the ephemeral range and outside `free_port`'s (ports.py).
    """
    for _ in range(200):
        port = random.randint(10000, 11999)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `check` every 50 ms until it holds; the seconds it took, or a TimeoutError."""
    start = time.monotonic()
    last: BaseException | None = None
    while time.monotonic() - start < timeout:
        try:
            if check():
                return time.monotonic() - start
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not after {timeout}s (last error: {last!r})")


@dataclass
class RedisProcess:
    """One `redis-server` (or sentinel) process with its config file and log in `dir`."""

    name: str
    port: int
    dir: Path
    proc: subprocess.Popen[bytes]
    client_kwargs: dict[str, Any] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)  # the command line, for a restart

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **overrides: Any) -> redis.Redis:
        """A synchronous admin client (short timeouts) to this process."""
        kwargs = {"socket_timeout": 2.0, "socket_connect_timeout": 1.0, **self.client_kwargs}
        kwargs.update(overrides)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_process(self.proc, 5)


class Fleet:
    """The processes one test started; `stop()` ends them all (used as a fixture)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.processes: list[RedisProcess] = []

    def start(
        self,
        name: str,
        conf: list[str],
        *,
        sentinel: bool = False,
        tls_port: bool = False,
        client_kwargs: dict[str, Any] | None = None,
        ready: bool = True,
        port: int | None = None,
        persist: bool = False,
    ) -> RedisProcess:
        """Start one server from `conf` lines (port, bind, dir and log are added).

        `persist`: every write is fsync'd to an append-only file before it is acknowledged.
        """
        port = port or free_port()
        workdir = self.tmp / name
        workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            "bind 127.0.0.1",
            f"dir {workdir}",
            f"logfile {workdir / 'redis.log'}",
            *(["port 0", f"tls-port {port}"] if tls_port else [f"port {port}"]),
            *conf,
        ]
        conf_path = workdir / ("sentinel.conf" if sentinel else "redis.conf")
        conf_path.write_text("\n".join(lines) + "\n")
        args = [REDIS_SERVER, str(conf_path)]
        if sentinel:
            args.append("--sentinel")  # `redis-sentinel` is this binary under another name
        elif persist:
            args += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--save", "", "--appendonly", "no"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        process = RedisProcess(name, port, workdir, proc, client_kwargs or {}, args)
        self.processes.append(process)
        if ready:
            self.wait_ping(process)
        return process

    def restart(self, process: RedisProcess) -> float:
        """Start a stopped or killed `process` again: same port, config and data directory.

        Returns the seconds until it answered PING.
        """
        if process.proc.poll() is None:
            raise RuntimeError(f"{process.name} is still running")
        if process.proc.stderr is not None:
            process.proc.stderr.close()
        started = time.monotonic()
        process.proc = subprocess.Popen(
            process.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.wait_ping(process)
        return time.monotonic() - started

    def wait_ping(self, process: RedisProcess, timeout: float = 10.0) -> None:
        """Until `process` answers PING; an early exit fails at once with its stderr and log."""

        def answers() -> bool:
            if process.proc.poll() is not None:
                err = process.proc.stderr.read().decode() if process.proc.stderr else ""
                raise RuntimeError(f"{process.name} exited: {err} {process.log()}")
            with process.client() as c:
                return bool(c.ping())

        wait_until(answers, timeout, f"{process.name} answers PING")

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
            if process.proc.stderr is not None:
                process.proc.stderr.close()


@contextmanager
def fleet(tmp: Path) -> Iterator[Fleet]:
    """`with fleet(tmp) as f:` the processes `f` starts are stopped at the block's end."""
    started = Fleet(tmp)
    try:
        yield started
    finally:
        started.stop()


# --- Sentinel ------------------------------------------------------------------------------


@dataclass
class SentinelSetup:
    """A master, its replica and three sentinels watching them as `mymaster`."""

    master: RedisProcess
    replica: RedisProcess
    sentinels: list[RedisProcess]
    master_name: str = "mymaster"

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    def current_master_port(self) -> int:
        with self.sentinels[0].client() as c:
            _, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return int(port)


def start_sentinel_setup(
    f: Fleet, password: str | None = None, sentinel_password: str | None = None
) -> SentinelSetup:
    """One master, one replica of it, three sentinels (quorum 2), all aware of each other.

    `password` protects the data nodes, `sentinel_password` the sentinels themselves.
    """
    auth = [f"requirepass {password}", f"masterauth {password}"] if password else []
    kwargs = {"password": password} if password else {}
    master = f.start("master", auth, client_kwargs=kwargs)
    replica = f.start(
        "replica", [*auth, f"replicaof 127.0.0.1 {master.port}"], client_kwargs=kwargs
    )
    sentinels = [
        f.start(
            f"sentinel{i}",
            [
                f"sentinel monitor mymaster 127.0.0.1 {master.port} 2",
                *([f"sentinel auth-pass mymaster {password}"] if password else []),
                "sentinel down-after-milliseconds mymaster 1000",
                "sentinel failover-timeout mymaster 3000",
                "sentinel parallel-syncs mymaster 1",
                *(
                    [
                        f"requirepass {sentinel_password}",
                        f"sentinel sentinel-pass {sentinel_password}",
                    ]
                    if sentinel_password
                    else []
                ),
            ],
            sentinel=True,
            client_kwargs={"password": sentinel_password} if sentinel_password else None,
        )
        for i in range(3)
    ]
    setup = SentinelSetup(master, replica, sentinels)

    def synced() -> bool:
        with replica.client() as c:
            return bool(c.info("replication").get("master_link_status") == "up")

    wait_until(synced, 10.0, "replica in sync with master")

    def sentinels_see_everything() -> bool:
        for s in sentinels:
            with s.client() as c:
                replicas = c.sentinel_slaves("mymaster")  # parsed: dicts, flags as a set
                peers = c.sentinel_sentinels("mymaster")
                if len(peers) != 2 or not any(
                    r["port"] == replica.port and not r["is_sdown"] for r in replicas
                ):
                    return False
        return True

    # Sentinels find replicas by INFO and each other by hello messages (every 2 s).
    wait_until(sentinels_see_everything, 15.0, "sentinels know the replica and each other")
    return setup


# --- Cluster -------------------------------------------------------------------------------


@dataclass
class ClusterSetup:
    """Cluster masters, each serving a share of the slots."""

    nodes: list[RedisProcess]

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def node_of_key(self, key: str) -> RedisProcess:
        """The master that serves `key`'s slot."""
        with self.nodes[0].client() as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = int(master[1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(key)


def start_cluster(f: Fleet, masters: int = 3) -> ClusterSetup:
    """`masters` cluster nodes, joined with `redis-cli --cluster create`, state ok everywhere."""
    nodes = [
        f.start(
            f"node{i}",
            ["cluster-enabled yes", "cluster-config-file nodes.conf", "cluster-node-timeout 2000"],
            port=free_cluster_port(),
        )
        for i in range(masters)
    ]
    subprocess.run(
        [
            REDIS_CLI,
            "--cluster",
            "create",
            *(n.address for n in nodes),
            *("--cluster-replicas", "0", "--cluster-yes"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )

    def all_ok() -> bool:
        for n in nodes:
            with n.client() as c:
                info = c.execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info or f"cluster_known_nodes:{masters}" not in info:
                    return False
        return True

    wait_until(all_ok, 15.0, "cluster_state:ok on every node")
    return ClusterSetup(nodes)


def tls_supported() -> bool:
    """Whether this redis-server was built with TLS (it then knows `tls-port`)."""
    out = subprocess.run(
        [REDIS_SERVER, "--port", "0", "--tls-port", "0", "--save", ""],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return b"Bad directive" not in out.stdout + out.stderr
