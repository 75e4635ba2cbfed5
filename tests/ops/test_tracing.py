"""OpenTelemetry traces (docs/operations.md, "Traces"): the span tree of a login, a proxied
request and an upstream error, kept by the SDK's in-memory exporter; the caller's W3C trace
continued and handed upstream as our own span's; nothing secret in any span; and with
telemetry off, no span, no opentelemetry import and the client's `traceparent` untouched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from yarl import URL

from sidecar.config import Config
from sidecar.config.load import parse_config
from sidecar.errors import ConfigError
from sidecar.web.keys import SESSIONS
from tests.support.configs import fixed_config, make_config
from tests.support.login import HTML, authorize, browser, local, login, session_cookie
from tests.support.ports import free_port
from tests.support.repo import REPO_ROOT
from tests.support.sidecars import Sidecar, ready
from tests.support.tracing import Recorded, children, from_memory, one, secrets_in, traceparent
from tests.support.upstreams import Serve, echo_app, header

# Never reached: the spans go to the in-memory exporter instead.
ENDPOINT = "http://127.0.0.1:9/v1/traces"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
CLIENT_STATE = "congo=t61rcWkgMzE"

Traced = Callable[..., Awaitable[tuple[Sidecar, InMemorySpanExporter]]]


@pytest.fixture
async def traced(upstream_app: Serve) -> AsyncIterator[Traced]:
    """`await traced(**telemetry)`: an in-process sidecar before `echo_app` whose spans stay
    in memory; `telemetry` replaces keys of the section (`otlp_endpoint: ""` turns it off)."""
    started: list[Sidecar] = []

    async def start(
        upstream: str | None = None, **telemetry: Any
    ) -> tuple[Sidecar, InMemorySpanExporter]:
        base = upstream or await upstream_app(echo_app())
        config = make_config(
            base, public_paths=[], telemetry={"otlp_endpoint": ENDPOINT, **telemetry}
        )
        exporter = InMemorySpanExporter()
        sc = Sidecar(config, span_exporter=exporter)
        await sc.start()
        started.append(sc)
        await ready(sc)
        return sc, exporter

    yield start
    for sc in started:
        await sc.close()


def server_span(spans: list[Recorded], name: str) -> Recorded:
    found = [s for s in spans if s.kind == "server" and s.name == name]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


async def test_login_span_tree(traced: Traced) -> None:
    """The callback is a server span named by its route; below it the code exchange, and
    below that the IdP's token endpoint call (authorization_code, outcome ok) as a client
    span. Neither the code nor the state shows anywhere."""
    sc, exporter = await traced()
    async with browser() as s:
        callback = await authorize(s, sc)
        async with s.get(local(sc, callback), headers=HTML, allow_redirects=False) as r:
            assert r.status == 302
        cookie = session_cookie(s)
    spans = from_memory(exporter)

    start = server_span(spans, "GET /oauth2/start")
    assert start.attributes["http.route"] == "/oauth2/start"
    assert start.attributes["http.response.status_code"] == 302
    assert start.attributes["url.path"] == "/oauth2/start"

    done = server_span(spans, "GET /oauth2/callback")
    assert done.parent_id is None and done.status == "unset"
    assert done.attributes["http.request.method"] == "GET"
    assert done.attributes["url.path"] == "/oauth2/callback"  # never the query
    assert done.attributes["client.address"] == "127.0.0.1"
    (exchange,) = children(spans, done)
    assert exchange.name == "login.code_exchange"
    assert exchange.attributes["sidecar.login.outcome"] == "ok"
    (token,) = children(spans, exchange)
    assert (token.name, token.kind) == ("idp.token", "client")
    assert token.attributes["sidecar.grant_type"] == "authorization_code"
    assert token.attributes["sidecar.idp.outcome"] == "ok"
    assert token.attributes["url.path"] == "/token"
    assert token.attributes["server.address"] == "127.0.0.1"

    query = URL(callback).query
    assert secrets_in(spans, [query["code"], query["state"], cookie]) == []


async def test_proxied_request_continues_the_callers_trace(
    traced: Traced, upstream_app: Serve
) -> None:
    """A request with the caller's `traceparent` and `tracestate` is a server span of the
    caller's trace, with the session load and the upstream exchange below it; the upstream
    receives one `traceparent`, naming our client span, and the caller's `tracestate`."""
    sc, exporter = await traced()
    async with browser() as s:
        await login(s, sc)
        exporter.clear()
        cookie = session_cookie(s)
        headers = {"traceparent": CLIENT_PARENT, "tracestate": CLIENT_STATE, **HTML}
        async with s.get(sc.url("/app/page?token=query-secret"), headers=headers) as r:
            assert r.status == 200
            echoed = await r.json()
        async with s.get(sc.url("/app/page"), headers=headers) as r:
            assert r.status == 200
    spans = from_memory(exporter)

    first, second = sorted((s for s in spans if s.kind == "server"), key=lambda s: spans.index(s))
    for request in (first, second):
        assert request.name == "GET /"  # the upstream's route: its path prefix
        assert (request.trace_id, request.parent_id) == (CLIENT_TRACE, CLIENT_SPAN)
        assert request.attributes["http.route"] == "/"
        assert request.attributes["url.path"] == "/app/page"
        assert request.attributes["http.response.status_code"] == 200
        load, upstream = children(spans, request)
        assert (load.name, upstream.name, upstream.kind) == ("session.load", "upstream", "client")
        assert load.attributes["sidecar.session.found"] is True
        assert upstream.attributes["http.response.status_code"] == 200
        assert upstream.attributes["url.path"] == "/app/page"
        assert upstream.attributes["sidecar.upstream"] == "/"
    # The session was created by the login: the first request reads the store, the second
    # finds it in this process's cache.
    loads = [children(spans, r)[0] for r in (first, second)]
    assert [x.attributes["sidecar.session.source"] for x in loads] == ["store", "cache"]
    assert (
        loads[0].attributes["sidecar.session.hash"] == loads[1].attributes["sidecar.session.hash"]
    )

    upstream = children(spans, first)[1]
    (sent,) = header(echoed, "traceparent")
    assert traceparent(sent) == (CLIENT_TRACE, upstream.span_id, True)
    assert header(echoed, "tracestate") == [CLIENT_STATE]
    session = await sc.app[SESSIONS].load(cookie)
    assert session is not None
    record = session.record
    stored = [record.access_token, record.refresh_token or "", record.id_token or ""]
    assert record.access_token == echoed["authorization"].removeprefix("Bearer ")
    assert secrets_in(spans, [*stored, cookie, "query-secret"]) == []
    assert secrets_in(spans, [loads[0].attributes["sidecar.session.hash"]])  # the scan sees


async def test_upstream_error_fails_both_spans(traced: Traced) -> None:
    """An upstream that refuses connections: the client span fails with the error's kind,
    the request span with its 502; no exception message is recorded."""
    sc, exporter = await traced(upstream=f"http://127.0.0.1:{free_port()}")
    async with browser() as s:
        await login(s, sc)
        exporter.clear()
        async with s.get(sc.url("/app/page"), headers=HTML) as r:
            assert r.status == 502
    spans = from_memory(exporter)
    request = server_span(spans, "GET /")
    assert request.status == "error"
    assert request.attributes["error.type"] == "502"
    assert request.attributes["http.response.status_code"] == 502
    upstream = one(children(spans, request), "upstream")
    assert upstream.status == "error" and upstream.status_message == ""
    assert upstream.attributes["error.type"] == "UpstreamUnavailable"
    assert "http.response.status_code" not in upstream.attributes
    assert all(s.events == [] for s in spans)


async def test_sampling_follows_the_callers_flag(traced: Traced) -> None:
    """At ratio 0 a new trace records nothing, yet the upstream still receives a
    `traceparent` (not sampled) of the same trace; a caller's sampled trace is recorded."""
    sc, exporter = await traced(sampling=0.0)
    async with browser() as s:
        await login(s, sc)
        exporter.clear()
        async with s.get(sc.url("/app/page"), headers=HTML) as r:
            unsampled = await r.json()
        assert from_memory(exporter) == []
        (sent,) = header(unsampled, "traceparent")
        assert not traceparent(sent)[2]

        headers = {"traceparent": CLIENT_PARENT, **HTML}
        async with s.get(sc.url("/app/page"), headers=headers) as r:
            sampled = await r.json()
    request = server_span(from_memory(exporter), "GET /")
    assert request.trace_id == CLIENT_TRACE
    (sent,) = header(sampled, "traceparent")
    assert traceparent(sent) == (CLIENT_TRACE, one(from_memory(exporter), "upstream").span_id, True)


async def test_a_malformed_traceparent_starts_a_new_trace(traced: Traced) -> None:
    """A `traceparent` that is not W3C's is not continued and not forwarded: the request
    starts a trace of its own, and the upstream gets its span."""
    sc, exporter = await traced()
    async with browser() as s:
        await login(s, sc)
        exporter.clear()
        bad = f"00-{CLIENT_TRACE}-{'0' * 16}-01"  # an all-zero parent id is invalid
        async with s.get(sc.url("/app/page"), headers={"traceparent": bad, **HTML}) as r:
            echoed = await r.json()
    spans = from_memory(exporter)
    request = server_span(spans, "GET /")
    assert request.parent_id is None and request.trace_id != CLIENT_TRACE
    (sent,) = header(echoed, "traceparent")
    assert traceparent(sent) == (request.trace_id, one(spans, "upstream").span_id, True)


async def test_telemetry_off_exports_nothing_and_forwards_traceparent(traced: Traced) -> None:
    """With no endpoint nothing is traced (the exporter gets no span) and the caller's
    `traceparent` and `tracestate` reach the upstream as they were sent, as before."""
    sc, exporter = await traced(otlp_endpoint="")
    async with browser() as s:
        await login(s, sc)
        headers = {"traceparent": CLIENT_PARENT, "tracestate": CLIENT_STATE, **HTML}
        async with s.get(sc.url("/app/page"), headers=headers) as r:
            echoed = await r.json()
    assert from_memory(exporter) == []
    assert header(echoed, "traceparent") == [CLIENT_PARENT]
    assert header(echoed, "tracestate") == [CLIENT_STATE]


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_telemetry_off_needs_no_opentelemetry() -> None:
    """With opentelemetry hidden from the interpreter (the base install, without the `otel`
    extra), every module imports and the apps build with telemetry off.

    (Not "nothing imports it": redis-py imports opentelemetry by itself when installed.)"""
    code = (
        "import json, sys\n"
        "sys.modules['opentelemetry'] = None  # as if the extra were not installed\n"
        "from sidecar.app import build_apps\n"
        "from sidecar.config import Config\n"
        "main, _ = build_apps(Config.model_validate(json.loads(sys.argv[1])))\n"
        "print([getattr(m, '__name__', '') for m in main.middlewares].count('trace'))\n"
    )
    done = _run_python(code, json.dumps(fixed_config()))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0\n"  # no request-span middleware


def test_missing_extra_is_a_config_error_naming_the_key(tmp_path: Any) -> None:
    """Tracing configured without the `otel` extra: `check-config` fails and names
    `telemetry.otlp_endpoint` and the extra (opentelemetry hidden from the interpreter)."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(fixed_config(telemetry={"otlp_endpoint": ENDPOINT})))
    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # as if the extra were not installed\n"
        "from sidecar.cli import main\n"
        "sys.exit(main(['check-config', '--config', sys.argv[1]]))\n"
    )
    done = _run_python(code, str(path))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "telemetry.otlp_endpoint: " in done.stderr
    assert "auth-sidecar[otel]" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("telemetry", "message"),
    [
        ({"sampling": 1.5}, "telemetry.sampling: "),
        ({"sampling": -0.1}, "telemetry.sampling: "),
        ({"otlp_endpoint": "collector:4318"}, "telemetry.otlp_endpoint: expected an absolute"),
        ({"service_name": ""}, "telemetry.service_name: "),
        ({"endpoint": ENDPOINT}, "telemetry.endpoint: unknown key"),
    ],
)
def test_config_errors_name_the_key(telemetry: dict[str, Any], message: str) -> None:
    """Each bad telemetry setting is refused with its dotted key."""
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump(fixed_config(telemetry=telemetry)), env={}, source="t")
    assert message in str(caught.value), str(caught.value)


def test_defaults() -> None:
    """Off by default; service name auth-sidecar; every new trace recorded once on."""
    telemetry = Config.model_validate(fixed_config()).telemetry
    assert (telemetry.otlp_endpoint, telemetry.service_name, telemetry.sampling) == (
        "",
        "auth-sidecar",
        1.0,
    )
