"""JSON-lines logs, the access log, request ids, and that no secret ever reaches a log line."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from sidecar.app import build_apps
from sidecar.config import Config
from sidecar.logging import JSONFormatter, configure_logging
from sidecar.server import main_runner_options
from tests.support.configs import make_config
from tests.support.ports import free_port
from tests.support.upstreams import Serve, echo_app

SECRETS = {
    "bearer": "BEARERTOKENVALUE123",
    "cookie": "COOKIEVALUE456",
    "query": "QUERYSECRET789",
    "set_cookie": "SETCOOKIEVALUE000",
    "basic": "QmFzaWNVc2VyOlBhc3M=",
}
SET_COOKIE = f"upstream={SECRETS['set_cookie']}; Path=/"  # the echo upstream's secret cookie


class LogLines:
    """Every record of every logger, formatted by the production JSONFormatter."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    def access(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["logger"] == "sidecar.access"]

    async def wait_access(self, count: int) -> list[dict[str, Any]]:
        """The access log is written after the response went out, in batches: wait for it."""
        for _ in range(300):
            if len(self.access()) >= count:
                break
            await asyncio.sleep(0.01)
        return self.access()


@pytest.fixture
def logs() -> Iterator[LogLines]:
    """Capture every log record at DEBUG as the JSON lines production writes."""
    captured = LogLines()
    handler = logging.StreamHandler(captured.stream)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield captured
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.fixture
async def sidecar(logs: LogLines) -> AsyncIterator[Callable[[Config], Awaitable[TestServer]]]:
    """The main listener in-process, with production's runner options (access log included,
    written where `logs` captures)."""
    servers: list[TestServer] = []

    async def start(config: Config) -> TestServer:
        main, _ = build_apps(config)
        server = TestServer(main, host="127.0.0.1")
        options = main_runner_options(config, main, access_stream=logs.stream)
        options.pop("handler_cancellation")  # TestServer sets it itself
        await server.start_server(**options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def quiet_upstream(upstream_app: Serve) -> Serve:
    """A real upstream that writes no access log, so every captured line is the sidecar's."""
    return functools.partial(upstream_app, access_log=None)


# --- formatter -------------------------------------------------------------------------------


def test_formatter_writes_one_json_object() -> None:
    """A record becomes one JSON line with ts, level, logger, msg and extra fields."""
    record = logging.LogRecord("sidecar.x", logging.WARNING, "f.py", 1, "hello %s", ("you",), None)
    record.upstream = "/api"
    line = JSONFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "warning"
    assert entry["logger"] == "sidecar.x"
    assert entry["msg"] == "hello you"
    assert entry["upstream"] == "/api"
    assert isinstance(entry["ts"], float)
    assert "args" not in entry
    assert "pathname" not in entry


def test_formatter_keeps_exception_on_one_line() -> None:
    """An exception's type and traceback stay inside the one JSON line."""
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, "f.py", 1, "failed", (), sys.exc_info())
    line = JSONFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["exc_type"] == "ValueError"
    assert "boom" in entry["exc"]


def test_formatter_survives_unserialisable_extra() -> None:
    """An extra field JSON cannot encode is written as text instead of failing."""
    record = logging.LogRecord("x", logging.INFO, "f.py", 1, "m", (), None)
    record.thing = object()
    assert json.loads(JSONFormatter().format(record))["thing"].startswith("<object")


def test_configure_logging_writes_json_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """configure_logging routes every logger to stderr as JSON lines at the chosen level."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("warning")
        logging.getLogger("sidecar.test").info("hidden")
        logging.getLogger("sidecar.test").warning("shown", extra={"k": 1})
        logging.getLogger("aiohttp.server").error("also shown")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = capsys.readouterr().err.splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["msg"] for e in entries] == ["shown", "also shown"]
    assert entries[0]["k"] == 1


# --- access log ------------------------------------------------------------------------------


async def test_access_log_fields(logs: LogLines, sidecar: Any, quiet_upstream: Serve) -> None:
    """One access line per request with request_id, method, path without query, status, duration."""
    base = await quiet_upstream(echo_app(set_cookie=SET_COOKIE))
    server = await sidecar(make_config(base))
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            server.make_url("/orders/7?page=2"), data=b"x", headers={"X-Request-Id": "req-1"}
        ) as resp,
    ):
        assert resp.status == 200
    (entry,) = await logs.wait_access(1)
    assert entry["msg"] == "request"
    assert entry["level"] == "info"
    assert entry["request_id"] == "req-1"
    assert entry["method"] == "POST"
    assert entry["path"] == "/orders/7"
    assert entry["status"] == 200
    assert isinstance(entry["duration_ms"], float)
    assert entry["duration_ms"] >= 0


async def test_access_log_records_error_status(logs: LogLines, sidecar: Any) -> None:
    """A request the upstream cannot answer is logged with the status the client got."""
    server = await sidecar(make_config(f"http://127.0.0.1:{free_port()}"))
    async with aiohttp.ClientSession() as client, client.get(server.make_url("/down")) as resp:
        assert resp.status == 502
    (entry,) = await logs.wait_access(1)
    assert (entry["path"], entry["status"]) == ("/down", 502)


async def test_access_log_can_be_switched_off(
    logs: LogLines, sidecar: Any, quiet_upstream: Serve
) -> None:
    """logging.access_log: false writes no access line."""
    base = await quiet_upstream(echo_app(set_cookie=SET_COOKIE))
    server = await sidecar(make_config(base, logging={"level": "info", "access_log": False}))
    async with aiohttp.ClientSession() as client, client.get(server.make_url("/")) as resp:
        assert resp.status == 200
    await asyncio.sleep(0.05)
    assert logs.access() == []


async def test_no_secret_in_any_log_line(
    logs: LogLines, sidecar: Any, quiet_upstream: Serve
) -> None:
    """Authorization, Cookie, Set-Cookie and query-string values never appear in a log line."""
    base = await quiet_upstream(echo_app(set_cookie=SET_COOKIE))
    server = await sidecar(make_config(base))
    down = await sidecar(make_config(f"http://127.0.0.1:{free_port()}"))
    headers = {
        "Authorization": f"Bearer {SECRETS['bearer']}",
        "Cookie": f"__Host-sidecar={SECRETS['cookie']}; other={SECRETS['cookie']}",
        "Proxy-Authorization": f"Basic {SECRETS['basic']}",
        "X-Request-Id": "secret-test",
    }
    path = f"/callback?code={SECRETS['query']}&state={SECRETS['query']}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        for target in (server, down):
            for method in ("GET", "POST"):
                async with client.request(
                    method, target.make_url(path), headers=headers, data=b"body"
                ) as resp:
                    await resp.read()
    await logs.wait_access(4)
    assert len(logs.access()) == 4
    assert any(r["msg"] == "upstream error" for r in logs.records())
    text = "\n".join(logs.lines)
    for secret in SECRETS.values():
        assert secret not in text
    assert "code=" not in text
    for entry in logs.records():
        assert "?" not in str(entry.get("path", ""))


# --- request ids -----------------------------------------------------------------------------


async def test_request_id_kept_passed_upstream_and_echoed(
    logs: LogLines, sidecar: Any, quiet_upstream: Serve
) -> None:
    """A well-formed X-Request-Id is logged, forwarded upstream once and echoed to the client."""
    seen: list[CIMultiDict[str]] = []
    server = await sidecar(
        make_config(await quiet_upstream(echo_app(seen=seen, set_cookie=SET_COOKIE)))
    )
    request_id = "abc-123.DEF_456:789"
    url = server.make_url("/")
    headers = {"X-Request-Id": request_id}
    async with aiohttp.ClientSession() as client, client.get(url, headers=headers) as resp:
        assert resp.headers["X-Request-Id"] == request_id
    assert seen[0].getall("X-Request-Id") == [request_id]
    (entry,) = await logs.wait_access(1)
    assert entry["request_id"] == request_id


@pytest.mark.parametrize(
    "given",
    [
        None,
        "",
        "has space",
        'quote"inside',
        "x" * 129,
        "semi;colon",
        '{"json":1}',
    ],
)
async def test_request_id_generated_when_missing_or_malformed(
    logs: LogLines, sidecar: Any, quiet_upstream: Serve, given: str | None
) -> None:
    """A missing or malformed X-Request-Id is replaced by a generated one, used everywhere."""
    seen: list[CIMultiDict[str]] = []
    server = await sidecar(
        make_config(await quiet_upstream(echo_app(seen=seen, set_cookie=SET_COOKIE)))
    )
    headers = {} if given is None else {"X-Request-Id": given}
    url = server.make_url("/")
    async with aiohttp.ClientSession() as client, client.get(url, headers=headers) as resp:
        echoed = resp.headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", echoed)
    assert seen[0].getall("X-Request-Id") == [echoed]
    (entry,) = await logs.wait_access(1)
    assert entry["request_id"] == echoed


async def test_generated_request_ids_differ(sidecar: Any, quiet_upstream: Serve) -> None:
    """Each request without an id gets its own."""
    server = await sidecar(make_config(await quiet_upstream(echo_app(set_cookie=SET_COOKIE))))
    ids = set()
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.get(server.make_url("/")) as resp:
                ids.add(resp.headers["X-Request-Id"])
    assert len(ids) == 3
