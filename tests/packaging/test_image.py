"""The container image, built from the repository's Dockerfile and run as production runs it.

The Dockerfile is built once per session with podman, without any `--build-arg`; the image
(`localhost/auth-sidecar:test`) is kept, so later sessions rebuild from cache. The container
runs as the Helm chart runs it: the image's user (10001), a read-only root filesystem with a
tmpfs at /tmp the only writable path, all capabilities dropped, no privilege escalation, and
the configuration mounted read-only at /etc/auth-sidecar/config.yaml. It uses the host's
network: the dev IdP and an echo upstream run in threads of this process on 127.0.0.1.

podman (and, without a registry, mmdebstrap) is required under CI (`.ci/install-image-tools`):
missing, these tests fail there and skip elsewhere. tests/support/containers.py explains the
two machine workarounds (a stand-in base image, a runtime without rlimits); neither touches
the Dockerfile.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.support.configs import config_dict
from tests.support.containers import (
    Build,
    Container,
    Podman,
    announce,
    build_image,
    dockerfile_args,
    outside,
    podman,
    reap_leftovers,
    run_python,
)
from tests.support.idp import ThreadedIdP
from tests.support.login import HTML, browser, local, login
from tests.support.ports import free_port
from tests.support.repo import REPO_ROOT
from tests.support.threads import AppThread
from tests.support.upstreams import echo_app, jwt_claims

ACCESS_TTL = 300.0  # the module's dev IdP (tests/conftest.py `idp`)
UID = 10001  # the Dockerfile's USER; the Helm chart's securityContext assumes it
CONFIG_PATH = "/etc/auth-sidecar/config.yaml"  # AUTH_SIDECAR_CONFIG in the image
SHUTDOWN_DELAY = 2.0  # /readyz says 503 while the sidecar keeps serving
SHUTDOWN_GRACE = 6.0  # then in-flight requests get this long
SLOW_SECONDS = 3.5  # the in-flight request: longer than the delay, shorter than the grace
READY_TIMEOUT = 30.0
# What a container's filesystem may differ in from the image: the tmpfs, the mounted
# configuration, and the files podman itself puts in every container.
PODMAN_FILES = ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run/.containerenv"]


# --- the image --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pm() -> Podman:
    tool = podman()
    reap_leftovers(tool)
    return tool


@pytest.fixture(scope="module")
def image(pm: Podman, request: pytest.FixtureRequest, tmp_path_factory: Any) -> Build:
    build = build_image(pm, REPO_ROOT, tmp_path_factory.mktemp("image-build"))
    announce(
        request.config,
        f"{build.image} built in {build.seconds:.1f} s ({build.cache}) on the {build.base.how} "
        f"base {build.base.name}: {build.size_mb:.0f} MB (podman image inspect); "
        f"containers run with {build.runtime}",
    )
    return build


# --- what runs on the host: the upstream ------------------------------------------------------


@dataclass
class Upstream:
    """`echo_app` in a thread, plus `/app/slow`, which answers after `SLOW_SECONDS`."""

    url: str
    slow_started: threading.Event


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    started = threading.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(SLOW_SECONDS)
        return web.json_response({"slow": "done"})

    app = echo_app()
    app.router.add_get("/app/slow", slow)  # more specific than the echo's catch-all
    server = AppThread(app, free_port(), "image-upstream")
    yield Upstream(server.url, started)
    server.stop()


# --- the container ----------------------------------------------------------------------------


@dataclass
class RunningSidecar:
    """The sidecar in its container: `url`/`config` as tests/support/login.py reads them."""

    container: Container
    config: dict[str, Any]

    def url(self, path: str) -> str:
        return f"http://{self.config['server']['listen']}{path}"

    def management_url(self, path: str) -> str:
        return f"http://{self.config['management']['listen']}{path}"


def container_config(upstream: Upstream, idp: ThreadedIdP) -> dict[str, Any]:
    """Memory sessions, every path protected, plain HTTP at http://127.0.0.1:<port>."""
    config = config_dict(upstream.url, idp=idp, public_paths=[])
    config["server"].update(
        shutdown_delay=f"{SHUTDOWN_DELAY:g}s", shutdown_grace=f"{SHUTDOWN_GRACE:g}s"
    )
    assert config["session"]["store"] == "memory"
    assert config["session"]["cookie_secure"] is False
    assert not config["session"]["cookie_name"].startswith("__Host-")
    return config


def wait_ready(sidecar: RunningSidecar) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        state = sidecar.container.inspect()["State"]
        if not state["Running"]:
            raise AssertionError(
                f"container exited {state['ExitCode']}:\n{sidecar.container.logs()}"
            )
        try:
            with urllib.request.urlopen(sidecar.management_url("/readyz"), timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready after {READY_TIMEOUT:g}s:\n{sidecar.container.logs()}")


@pytest.fixture(scope="module")
def sidecar(
    pm: Podman,
    image: Build,
    idp: ThreadedIdP,
    upstream: Upstream,
    tmp_path_factory: Any,
) -> Iterator[RunningSidecar]:
    workdir = tmp_path_factory.mktemp("image-run")
    config = container_config(upstream, idp)
    config_file = workdir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    config_file.chmod(0o644)  # the container's user is not the file's owner
    container = Container(
        pm,
        image.image,
        name=f"auth-sidecar-test-{os.getpid()}-{secrets.token_hex(3)}",
        options=[
            *image.run_options,
            "--network=host",
            "--read-only",
            "--read-only-tmpfs=false",  # podman's default would add /run and /var/tmp too
            "--tmpfs=/tmp:rw,size=64m,mode=1777",  # the chart's emptyDir (sizeLimit 64Mi)
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges",
            f"--volume={config_file}:{CONFIG_PATH}:ro",
        ],
        log_path=workdir / "container.log",
    )
    try:
        container.start()
        running = RunningSidecar(container, config)
        wait_ready(running)
        yield running
    finally:
        container.remove()


# --- shutting it down (once, after the tests of the running container) ------------------------


@dataclass
class Shutdown:
    exit_code: int
    seconds: float  # from `podman stop` to the container's exit
    readyz_while_draining: int | None
    healthz_while_draining: int | None
    in_flight: tuple[int, dict[str, Any]]
    stop_output: str
    logs: str


async def _status(url: str) -> int | None:
    try:
        async with aiohttp.ClientSession() as client, client.get(url) as r:
            await r.read()
            return r.status
    except aiohttp.ClientError:
        return None


async def _shut_down(pm: Podman, sidecar: RunningSidecar, upstream: Upstream) -> Shutdown:
    """Log in, start a slow request, `podman stop` (the image's STOPSIGNAL, SIGTERM)."""
    upstream.slow_started.clear()
    async with browser() as s:
        await login(s, sidecar)

        async def in_flight() -> tuple[int, dict[str, Any]]:
            async with s.get(sidecar.url("/app/slow"), headers=HTML) as r:
                return r.status, await r.json(content_type=None)

        request = asyncio.create_task(in_flight())
        assert await asyncio.to_thread(upstream.slow_started.wait, 10), "slow request not sent"
        # No SIGKILL before the drain could have ended: exit 0 then means a clean drain.
        timeout = str(int(SHUTDOWN_DELAY + SHUTDOWN_GRACE + 5))
        stop = await asyncio.create_subprocess_exec(
            pm.binary,
            "stop",
            "--time",
            timeout,
            sidecar.container.name,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        stopping = time.monotonic()
        readyz = healthz = None
        while time.monotonic() - stopping < SHUTDOWN_DELAY:
            readyz = await _status(sidecar.management_url("/readyz"))
            if readyz != 200:
                healthz = await _status(sidecar.management_url("/healthz"))
                break
            await asyncio.sleep(0.05)
        answered = await asyncio.wait_for(request, SHUTDOWN_DELAY + SHUTDOWN_GRACE + 5)
        output, _ = await stop.communicate()
        seconds = time.monotonic() - stopping
    state = sidecar.container.inspect()["State"]
    return Shutdown(
        exit_code=int(state["ExitCode"]),
        seconds=seconds,
        readyz_while_draining=readyz,
        healthz_while_draining=healthz,
        in_flight=answered,
        stop_output=output.decode(errors="replace"),
        logs=sidecar.container.logs(),
    )


@pytest.fixture(scope="module")
def shutdown(
    pm: Podman, sidecar: RunningSidecar, upstream: Upstream, request: pytest.FixtureRequest
) -> Shutdown:
    done = asyncio.run(_shut_down(pm, sidecar, upstream))
    announce(
        request.config,
        f"podman stop: exit {done.exit_code} after {done.seconds:.1f} s "
        f"(shutdown_delay {SHUTDOWN_DELAY:g} s, shutdown_grace {SHUTDOWN_GRACE:g} s)",
    )
    return done


# --- the tests --------------------------------------------------------------------------------


def test_builds_without_build_args(image: Build) -> None:
    """`podman build .` as the Dockerfile's header shows it: no ARG lacks a default, and the
    build (the `image` fixture's, which printed its time and size) passed none."""
    assert not any(a.startswith("--build-arg") for a in image.command), image.command
    missing = [
        name
        for name, default in dockerfile_args(REPO_ROOT / "Dockerfile").items()
        if default is None
    ]
    assert missing == [], f"ARGs without a default need --build-arg: {missing}"


def test_the_image_holds_this_tree(image: Build) -> None:
    """The installed `sidecar` package is the tree's, file for file, with its requirements
    (nothing left out by .dockerignore, no stale layer of an earlier build)."""
    assert image.differences == []


# Inside the image: what it holds besides the interpreter and the sidecar's installed
# dependencies. Printed as JSON for the test below.
_INVENTORY = """
import importlib.metadata as md, json, os, re, shutil, site, sys
def closure(name, seen):
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return
    seen.add(key)
    try:
        requires = md.requires(name) or []
    except md.PackageNotFoundError:
        return
    for line in requires:
        if "extra ==" in line:
            continue
        closure(re.split(r"[ ;<>=!~\\[(]", line, maxsplit=1)[0], seen)
needed = set()
closure("auth-sidecar", needed)
for extra in ("hiredis",):  # redis[hiredis]
    closure(extra, needed)
installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in md.distributions()}
roots = site.getsitepackages()
print(json.dumps({
    "top": sorted(os.listdir("/")),
    "compilers": [c for c in ("cc", "gcc", "g++", "clang", "make", "ld") if shutil.which(c)],
    "extra_distributions": sorted(installed - needed - {"pip", "setuptools", "wheel"}),
    "missing_distributions": sorted(needed - installed),
    "tests_dirs": [r for r in roots if os.path.isdir(os.path.join(r, "tests"))],
    "source_trees": [p for p in ("/src", "/wheels", "/tmp/src") if os.path.exists(p)],
    "pip_cache": [p for p in ("/root/.cache/pip", "/tmp/.cache/pip") if os.path.exists(p)],
}))
"""


def test_the_image_holds_no_compiler_cache_tests_or_source(
    pm: Podman, image: Build, request: pytest.FixtureRequest
) -> None:
    """The final image is the interpreter, the sidecar and its dependencies: no compiler, no
    pip cache, no tests, no source tree or wheels (the build stage keeps those)."""
    done = run_python(pm, image.run_options, _INVENTORY, image.image)
    assert done.returncode == 0, done.stderr
    inventory = json.loads(done.stdout)
    announce(request.config, f"image top level: {' '.join(inventory['top'])}")
    assert inventory["compilers"] == []
    assert inventory["extra_distributions"] == []
    assert inventory["missing_distributions"] == []
    assert inventory["tests_dirs"] == []
    assert inventory["source_trees"] == []
    assert inventory["pip_cache"] == []


def test_runs_as_uid_10001_on_a_read_only_root(sidecar: RunningSidecar) -> None:
    """The image's USER runs the sidecar itself as PID 1 (exec form); only /tmp is writable."""
    container = sidecar.container
    config = container.inspect()
    assert config["Config"]["User"] == f"{UID}:{UID}"
    assert config["HostConfig"]["ReadonlyRootfs"] is True
    pid1 = Path(f"/proc/{config['State']['Pid']}")  # the container's PID 1, seen from here
    assert f"Uid:\t{UID}\t{UID}\t{UID}\t{UID}\n" in (pid1 / "status").read_text()
    cmdline = (pid1 / "cmdline").read_bytes().split(b"\0")
    assert cmdline[1:3] == [b"/usr/local/bin/auth-sidecar", b"run"], cmdline
    uid = container.exec("id", "-u")
    assert (uid.returncode, uid.stdout.strip()) == (0, str(UID)), uid.stderr
    probes = ("/probe", "/etc/auth-sidecar/probe", "/var/tmp/probe", "/run/probe")
    script = "".join(f"(echo x >> {path}) 2>&1 || true; " for path in probes)
    writes = container.exec("sh", "-c", script + "echo x > /tmp/probe && rm /tmp/probe && echo ok")
    assert writes.returncode == 0, writes
    *refused, tmp = writes.stdout.splitlines()
    assert len(refused) == len(probes), writes.stdout
    assert all("Read-only file system" in line for line in refused), writes.stdout
    assert tmp == "ok", writes


async def test_readyz_on_the_management_port(sidecar: RunningSidecar) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.get(sidecar.management_url("/readyz")) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        async with client.get(sidecar.url("/readyz"), allow_redirects=False) as r:
            assert r.status != 200  # the probes are on the management port only
    assert body["ready"] is True and body["draining"] is False, body


async def test_browser_login_reaches_the_upstream_with_a_bearer_token(
    sidecar: RunningSidecar, idp: ThreadedIdP
) -> None:
    """The whole code flow through the container, then the page: the echo upstream got
    alice's access token, and the IdP accepts it."""
    async with browser() as s:
        landing = await login(s, sidecar, "/app/page", "alice")
        async with s.get(local(sidecar, landing), headers=HTML, allow_redirects=False) as r:
            assert r.status == 200, (landing, r.status, await r.text())
            echoed = await r.json()
    assert echoed["path"] == "/app/page"
    authorization = echoed["authorization"]
    assert authorization and authorization.startswith("Bearer "), echoed
    token = authorization.removeprefix("Bearer ")
    claims = jwt_claims(token)
    assert claims["sub"] == "alice" and claims["iss"] == idp.issuer, claims
    async with (
        aiohttp.ClientSession() as client,
        client.get(idp.issuer + "/userinfo", headers={"Authorization": authorization}) as r,
    ):
        assert r.status == 200, await r.text()
        assert (await r.json())["sub"] == "alice"


def test_sigterm_drains_and_exits_0_within_the_grace(shutdown: Shutdown) -> None:
    """`podman stop`: /readyz turns 503 (liveness stays 200), the in-flight request is
    answered, and the sidecar exits 0 before shutdown_delay + shutdown_grace are up."""
    assert shutdown.readyz_while_draining == 503, shutdown.logs
    assert shutdown.healthz_while_draining == 200, shutdown.logs
    assert shutdown.in_flight == (200, {"slow": "done"}), shutdown.logs
    assert shutdown.exit_code == 0, f"{shutdown.stop_output}\n{shutdown.logs}"
    assert shutdown.seconds < SHUTDOWN_DELAY + SHUTDOWN_GRACE, shutdown.seconds
    messages = [json.loads(ln)["msg"] for ln in shutdown.logs.splitlines() if ln.startswith("{")]
    assert "draining" in messages and "stopped" in messages, shutdown.logs
    assert messages.index("draining") < messages.index("stopped")


def test_nothing_written_outside_tmp(sidecar: RunningSidecar, shutdown: Shutdown) -> None:
    """After the login, the drain and the exit, `podman diff` shows no change to the image's
    filesystem but the mount points (the configuration and podman's own files); /tmp is a
    tmpfs, not an anonymous volume left behind."""
    container = sidecar.container
    mounts = container.inspect()["Mounts"]
    assert [(m["Destination"], m["RW"]) for m in mounts] == [(CONFIG_PATH, False)], mounts
    allowed = ["/tmp", CONFIG_PATH, *PODMAN_FILES]
    changes = container.diff()
    assert outside(changes, allowed) == [], changes
