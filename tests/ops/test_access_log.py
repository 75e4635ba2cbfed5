"""The access log at production cost (sidecar/access_log.py; docs/operations.md, "Access log"):
the same lines as through `logging`, written in batches off the event loop, none lost on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from sidecar.access_log import FLUSH_INTERVAL, MAX_PENDING, AccessLog, json_string
from sidecar.app import build_apps
from sidecar.config import Config
from sidecar.forwarding.paths import PATH
from sidecar.logging import REQUEST_ID, JSONFormatter
from sidecar.server import main_runner_options, main_site
from tests.support.configs import config_dict, make_config
from tests.support.raw_http import raw_exchange, raw_get
from tests.support.sidecars import SidecarProcess, console_script
from tests.support.stores import store_sections
from tests.support.upstreams import Serve, echo_app

ACCESS = '"logger": "sidecar.access"'


class Capture(io.StringIO):
    """Where an in-process sidecar writes its access log: the text, each write and its thread."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[int, str]] = []

    def write(self, text: str) -> int:
        self.writes.append((threading.get_ident(), text))
        return super().write(text)

    def lines(self) -> list[str]:
        return self.getvalue().splitlines()

    async def wait_lines(self, count: int, within: float = 3.0) -> list[str]:
        """The lines once there are `count` (the writer thread runs on its own), or after
        `within` seconds."""
        for _ in range(int(within / 0.01)):
            if len(self.lines()) >= count:
                break
            await asyncio.sleep(0.01)
        return self.lines()


def reference_fields(
    request: web.BaseRequest, response: web.StreamResponse, time_: float
) -> dict[str, Any]:
    """The access record's fields exactly as the `logging` access logger computed them before
    issue 18: the contract the new lines keep."""
    return {
        "request_id": request.get(REQUEST_ID, ""),
        "method": request.method,
        "path": canonical.path
        if (canonical := request.get(PATH)) is not None
        else request.raw_path.partition("?")[0][:256],
        "status": response.status,
        "bytes": response.body_length,
        "duration_ms": round(time_ * 1000, 2),
        "remote": request.remote,
        "user_agent": request.headers.get("User-Agent", "")[:256],
    }


def formatter_line(fields: dict[str, Any], ts: float) -> str:
    """What `logging` with the production JSONFormatter wrote for those fields at `ts`."""
    record = logging.getLogger("sidecar.access").makeRecord(
        "sidecar.access", logging.INFO, __file__, 0, "request", (), None, extra=fields
    )
    record.created = ts
    return JSONFormatter().format(record)


class Served:
    """An in-process sidecar with production's runner options and listener; its access log
    goes to `capture`, and `reference` gets each request's fields as the old logger saw them."""

    def __init__(self, base: str, capture: Capture, reference: list[dict[str, Any]]) -> None:
        self.base = base
        self.capture = capture
        self.reference = reference


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[Served]:
    main, _ = build_apps(config)
    capture = Capture()
    options = main_runner_options(config, main, access_stream=capture)
    reference: list[dict[str, Any]] = []
    production = options.get("access_log_class")
    if production is not None:

        class Recording(production):  # type: ignore[misc,valid-type]
            __slots__ = ()

            def log(self, request: Any, response: Any, time_: float) -> None:
                reference.append(reference_fields(request, response, time_))
                super().log(request, response, time_)

        options["access_log_class"] = Recording
    runner = web.AppRunner(main, handle_signals=False, **options)
    await runner.setup()
    site = main_site(runner, config, "127.0.0.1", 0)
    await site.start()
    try:
        yield Served(f"http://127.0.0.1:{site.port}", capture, reference)
    finally:
        await runner.cleanup()


@pytest.fixture(autouse=True)
def info_level() -> Any:
    """The root logger at INFO, as `configure_logging` sets it for `logging.level: info`."""
    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.INFO)
    yield
    root.setLevel(saved)


@pytest.fixture
def quiet_upstream(upstream_app: Serve) -> Callable[[], Any]:
    async def start() -> str:
        return await upstream_app(echo_app(), access_log=None)

    return start


# --- the line --------------------------------------------------------------------------------

HOSTILE = [
    raw_get("/plain?code=SECRET"),
    raw_get('/quo"te/x?y="z"'),
    raw_get("/back\\slash"),  # refused (400): the raw path is logged
    raw_get("/pct/%ff%fe%c3%28/%22%3c"),  # escapes that do not decode to UTF-8: kept
    raw_get("/pct/%ff%5c%00"),  # an escaped backslash and NUL: refused
    # Refused by the HTTP parser (400), logged as aiohttp reports them: UNKNOWN /.
    raw_get("/ctl/\x7f\x01"),
    raw_get("/caf\xc3\xa9/\xff\xfe"),  # raw bytes, UTF-8 and not
    raw_get("/long/" + "\\" * 400),  # refused, cut to 256 characters
    raw_get("/ua", 'User-Agent: "q" \\b\\ \x7f caf\xc3\xa9 \xff\xfe ' + "u" * 300),
    raw_get("/ua", 'User-Agent: "q" \\b\\ \t</x> ' + "u" * 300),
    raw_get("/ua", "User-Agent: caf\xc3\xa9 \xe2\x80\xa8 \xf0\x9f\x98\x80"),  # UTF-8
    raw_get("/ua", "User-Agent: not utf-8 \xff\xfe\xc3"),
    raw_get("/big", "User-Agent: " + "A" * 8000, "X-Filler: " + "f" * 8000),
    raw_get("/id", 'X-Request-Id: "inj\\"ected'),
    raw_get("/id", "X-Request-Id: fine-id.1"),
    raw_get("/m", method="PURGE"),
    raw_get("/big-header", "X-Too-Big: " + "t" * 9000),  # 431 before any path
    b"NOT HTTP AT ALL\r\n\r\n",
]


async def test_lines_are_what_logging_wrote_for_hostile_requests(
    quiet_upstream: Callable[[], Any],
) -> None:
    """For quotes, backslashes, control characters, non-UTF-8 escapes and bytes, huge headers
    and refused requests, each line is byte for byte the JSONFormatter's line of the fields
    the `logging` access logger computed, and parses back to them."""
    async with serving(make_config(await quiet_upstream())) as served:
        started = time.time()
        statuses = []
        for request in HOSTILE:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                statuses.append((await raw_exchange(served.base, request)).status)
        lines = await served.capture.wait_lines(len(served.reference))
        ended = time.time()
    assert {200, 400, 431} <= set(statuses), statuses
    assert len(served.reference) >= len(statuses)
    assert len(lines) == len(served.reference)
    for line, fields in zip(lines, served.reference, strict=True):
        entry = json.loads(line)
        assert started - 0.001 <= entry["ts"] <= ended + 0.001
        assert line == formatter_line(fields, entry["ts"])
        assert {k: entry[k] for k in fields} == fields
        assert line.isascii()
        assert "SECRET" not in line
    paths = [json.loads(line)["path"] for line in lines]
    assert '/quo"te/x' in paths
    assert "/back\\slash" in paths
    assert "/long/" + "\\" * 250 in paths
    agents = [json.loads(line)["user_agent"] for line in lines]
    assert "not utf-8 \udcff\udcfe\udcc3" in agents  # bytes kept as Python decoded them


@given(st.text(st.characters(codec=None, exclude_categories=())))
def test_json_string_is_json_dumps(text: str) -> None:
    """Any text, lone surrogates and control characters included, is encoded as json.dumps
    encodes it: one ASCII line that parses back to the same text."""
    encoded = json_string(text)
    assert encoded == json.dumps(text)
    assert encoded.isascii() and "\n" not in encoded and "\r" not in encoded
    assert json.loads(encoded) == text


# --- buffering -------------------------------------------------------------------------------


async def test_a_line_is_written_within_the_flush_interval_without_more_traffic(
    quiet_upstream: Callable[[], Any],
) -> None:
    """One request and then silence: its line is written by the timer, not by later traffic."""
    async with serving(make_config(await quiet_upstream())) as served:
        async with aiohttp.ClientSession() as client, client.get(served.base + "/one") as resp:
            await resp.read()
            answered = time.monotonic()
        lines = await served.capture.wait_lines(1, within=FLUSH_INTERVAL + 1.0)
        took = time.monotonic() - answered
        assert len(lines) == 1
        assert took <= FLUSH_INTERVAL + 0.4, took


async def test_lines_are_written_in_batches_off_the_event_loop(
    quiet_upstream: Callable[[], Any],
) -> None:
    """Requests are not written one by one on the event loop: a thread of the access log writes
    batches of whole lines, each within PIPE_BUF so that processes sharing a pipe never
    interleave inside a line."""
    loop_thread = threading.get_ident()
    async with serving(make_config(await quiet_upstream())) as served:
        async with aiohttp.ClientSession() as client:

            async def get(i: int) -> None:
                async with client.get(f"{served.base}/batch/{i}") as resp:
                    await resp.read()

            for first in range(0, 300, 30):
                await asyncio.gather(*(get(i) for i in range(first, first + 30)))
        await served.capture.wait_lines(300)
    writes = served.capture.writes
    assert len(served.capture.lines()) == 300
    assert len(writes) <= 300 / 5, len(writes)
    assert all(thread != loop_thread for thread, _ in writes)
    for _, text in writes:
        assert text.endswith("\n")
        assert len(text) <= 4096 or text.count("\n") == 1


async def test_a_stuck_stderr_costs_dropped_lines_not_a_blocked_loop() -> None:
    """When the output stops draining, lines beyond MAX_PENDING bytes are dropped and counted;
    the event loop never waits for the output, and once it drains every other line arrives."""

    class Stuck(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.release = threading.Event()

        def write(self, text: str) -> int:
            self.release.wait(30)
            return super().write(text)

    stuck = Stuck()
    dropped: list[int] = []
    access = AccessLog(dropped.append, stuck)
    access.start()
    line = '{"msg": "request", "pad": "' + "x" * 200 + '"}\n'
    count = 3 * MAX_PENDING // len(line)
    began = time.monotonic()
    for _ in range(count):
        access.append(line)
    access.flush()
    spent = time.monotonic() - began
    assert sum(dropped) > 0
    stuck.release.set()
    await access.close()
    assert spent < 5.0  # 120,000 appends; a blocking write would never have returned
    assert len(stuck.getvalue().splitlines()) + sum(dropped) == count
    assert sum(dropped) <= count * 2 // 3 + count // 10


# --- real processes ----------------------------------------------------------------------


def access_ids(log: str) -> list[str]:
    return [json.loads(line)["request_id"] for line in log.splitlines() if ACCESS in line]


async def load_until_gone(base: str, stop_after: Callable[[int], bool]) -> set[str]:
    """20 clients send requests with unique ids until the sidecar stops answering; the ids of
    the requests answered. `stop_after(answered)` is called after each answer."""
    answered: set[str] = set()
    gone = asyncio.Event()

    async def client(n: int) -> None:
        async with aiohttp.ClientSession() as session:
            i = 0
            while not gone.is_set():
                request_id = f"load-{n}-{i}"
                i += 1
                try:
                    async with session.get(
                        f"{base}/load", headers={"X-Request-Id": request_id}
                    ) as resp:
                        await resp.read()
                        if resp.status == 200:
                            answered.add(request_id)
                            stop_after(len(answered))
                except (aiohttp.ClientError, OSError):
                    await asyncio.sleep(0.05)
                    if await refused(base):
                        gone.set()

    await asyncio.wait_for(asyncio.gather(*(client(n) for n in range(20))), 60)
    return answered


async def refused(base: str) -> bool:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return True
    writer.close()
    return False


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_under_load_loses_no_line(
    workers: int,
    quiet_upstream: Callable[[], Any],
    sidecar_process: Callable[..., SidecarProcess],
    redis_prefix: str,
) -> None:
    """SIGTERM to a sidecar (and with 2 workers, to their supervisor) while 20 clients keep
    it busy: every request answered has its line in the output once the process has exited."""
    data = config_dict(await quiet_upstream())
    if workers > 1:
        data = config_dict(await quiet_upstream(), **store_sections("redis", redis_prefix))
    data["server"].update(workers=workers, shutdown_delay="0.3s", shutdown_grace="5s")
    proc = sidecar_process(data)
    signalled = False

    def stop_after(answered: int) -> None:
        nonlocal signalled
        if answered >= 600 and not signalled:
            signalled = True
            proc.proc.send_signal(signal.SIGTERM)

    answered = await load_until_gone(proc.base, stop_after)
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    logged = access_ids(proc.logs())
    assert len(answered) >= 600
    assert answered - set(logged) == set(), f"{len(answered - set(logged))} lines lost"
    assert len(logged) == len(set(logged))


def start_piped(tmp_path: Path, data: dict[str, Any]) -> subprocess.Popen[bytes]:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(data))
    return subprocess.Popen(
        [console_script(), "run", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def get(url: str, request_id: str = "") -> tuple[int, str]:
    headers = {"X-Request-Id": request_id} if request_id else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as resp:
        return resp.status, resp.read().decode()


async def test_a_closed_stderr_neither_crashes_nor_fails_a_request(
    quiet_upstream: Callable[[], Any], tmp_path: Path
) -> None:
    """With its output pipe closed (the reader gone), the sidecar keeps answering every
    request; the lines it cannot write are counted in sidecar_access_log_dropped_total."""
    data = config_dict(await quiet_upstream())
    proc = start_piped(tmp_path, data)
    try:
        assert proc.stdout is not None
        while b'"listening"' not in (line := await asyncio.to_thread(proc.stdout.readline)):
            assert line, "the sidecar exited before listening"
        proc.stdout.close()
        base = "http://" + data["server"]["listen"]
        management = "http://" + data["management"]["listen"]
        for i in range(50):
            status, _ = await asyncio.to_thread(get, f"{base}/after-close/{i}")
            assert status == 200
        await asyncio.sleep(FLUSH_INTERVAL + 0.3)
        _, metrics = await asyncio.to_thread(get, management + "/metrics")
        dropped = next(
            line for line in metrics.splitlines() if line.startswith("sidecar_access_log_dropped")
        )
        assert float(dropped.split()[-1]) >= 50
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_access_log_off_writes_nothing(
    quiet_upstream: Callable[[], Any], sidecar_process: Callable[..., SidecarProcess]
) -> None:
    """`logging.access_log: false`: no access line, not even at shutdown; other lines stay."""
    data = config_dict(await quiet_upstream(), logging={"level": "info", "access_log": False})
    proc = sidecar_process(data)
    for i in range(20):
        assert (await asyncio.to_thread(get, f"{proc.base}/off/{i}"))[0] == 200
    assert proc.stop() == 0
    log = proc.logs()
    assert '"msg": "stopped"' in log
    assert ACCESS not in log


async def test_level_warning_still_turns_access_lines_off(
    quiet_upstream: Callable[[], Any],
) -> None:
    """As before: access lines are INFO records, so `logging.level: warning` writes none."""
    logging.getLogger().setLevel(logging.WARNING)  # configure_logging("warning")
    config = make_config(await quiet_upstream(), logging={"level": "warning"})
    async with serving(config) as served:
        async with aiohttp.ClientSession() as client, client.get(served.base + "/") as resp:
            assert resp.status == 200
        await asyncio.sleep(FLUSH_INTERVAL + 0.1)
        assert served.capture.getvalue() == ""
