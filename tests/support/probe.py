"""Send one hostile request through the sidecar and check what reached the strict upstream.

The invariant every hostile request must keep (issue 12): EITHER exactly one upstream
request carrying exactly the client's body bytes, framed by the sidecar (at most one of
Content-Length / `Transfer-Encoding: chunked`, one Host, an origin-form target, one
X-Forwarded-For/Proto/Host line), OR a 4xx answer with nothing sent upstream. After each
probe a sentinel request follows, on the same client connection when it is still open:
it must be answered by its own upstream response, so neither the client connection nor a
pooled upstream connection can hold bytes the attacker left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, Literal

from sidecar.config import Config
from tests.support.configs import config_dict
from tests.support.raw_http import RawClient, RawMessage, read_body, read_head
from tests.support.recording_upstream import RecordingUpstream, UpstreamRequest

__all__ = [
    "SENTINEL",
    "Expect",
    "Outcome",
    "assert_forwarded",
    "assert_invariant",
    "assert_refused",
    "chunked",
    "issue_config",
    "probe",
    "request",
]

SENTINEL = "/public/sentinel"
Expect = Literal["forward", "refuse", "either"]
# Never copied from a client; the sidecar may write its own Connection.
NEVER_COPIED = ("upgrade", "te", "keep-alive", "proxy-connection", "trailer")


def issue_config(upstream_url: str, trusted_proxies: list[str] | None = None) -> Config:
    """The issue's set-up: `/public` is public, `/admin` (same upstream) is for `admins`."""
    data = config_dict(
        upstream_url,
        public_paths=["/public"],
        upstreams=[
            {"path": "/", "url": upstream_url},
            {"path": "/admin", "url": upstream_url, "access": {"allowed_groups": ["admins"]}},
        ],
    )
    if trusted_proxies is not None:
        data["server"]["trusted_proxies"] = trusted_proxies
    return Config.model_validate(data)


def request(
    method: str,
    target: str,
    *lines: str,
    body: bytes = b"",
    version: str = "HTTP/1.1",
    host: str | None = "sidecar.test",
    eol: str = "\r\n",
) -> bytes:
    """A request head with exactly these header lines (Host first unless `host` is None)."""
    head = [f"{method} {target} {version}"]
    if host is not None:
        head.append(f"Host: {host}")
    head.extend(lines)
    return (eol.join(head) + eol + eol).encode("latin-1") + body


def chunked(*parts: bytes, extension: str = "", trailers: str = "") -> bytes:
    """`parts` as a chunked body; `extension` (such as `;a=b`) follows every chunk size."""
    out = b"".join(f"{len(p):x}{extension}\r\n".encode("latin-1") + p + b"\r\n" for p in parts if p)
    return out + f"0{extension}\r\n{trailers}\r\n".encode("latin-1")


@dataclass
class Outcome:
    """What one probe produced, on both sides of the sidecar."""

    sent: bytes
    first: RawMessage | None  # the sidecar's answer to the probe (None: closed, no answer)
    after: list[RawMessage]  # answers that followed on the same client connection
    sentinel: RawMessage  # the sidecar's answer to the sentinel request
    upstream: list[UpstreamRequest]  # requests the upstream parsed for the probe
    recorder: RecordingUpstream = field(repr=False)
    closed: bool = False  # the sidecar ended the probe's connection after answering

    def explain(self) -> str:
        return (
            f"sent {self.sent!r}\n"
            f"answer: {self.first and (self.first.start_line, self.first.body)!r}\n"
            f"after: {[(m.start_line, m.body) for m in self.after]!r}"
            f"{' (then closed)' if self.closed else ' (left open)'}\n"
            f"upstream: {self.recorder.describe()}"
        )


async def _next_response(reader: asyncio.StreamReader) -> RawMessage | None:
    """The next final response (1xx skipped), or None when the connection ends first."""
    while True:
        try:
            message = await read_head(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        if message is None:
            return None
        if message.status >= 200:
            try:
                await read_body(reader, message, to_eof=True)
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            return message


def _sentinel_request() -> bytes:
    return request("GET", SENTINEL, "Accept: application/json", "Connection: close")


async def probe(
    url: str, upstream: RecordingUpstream, data: bytes, *, wait: float = 3.0
) -> Outcome:
    """Send `data` on a fresh connection to the sidecar at `url`, then the sentinel.

    After a 2xx the sentinel follows on the same connection; after a 4xx the connection
    must end (checked by `assert_refused`) and the sentinel takes a fresh one.
    """
    before = len(upstream.requests)
    client = await RawClient.connect(url)
    first: RawMessage | None = None
    after: list[RawMessage] = []
    closed = False
    try:
        with contextlib.suppress(ConnectionError):
            await client.send(data)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                first = await _next_response(client.reader)
        if first is not None and not 400 <= first.status < 500:
            with contextlib.suppress(ConnectionError):
                await client.send(_sentinel_request())
        if first is not None:
            # A server closes right after its answer: a second is plenty to see the end.
            ending = wait if not 400 <= first.status < 500 else min(wait, 1.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ending):
                    while (message := await _next_response(client.reader)) is not None:
                        after.append(message)
                    closed = True
    finally:
        client.writer.transport.abort()
    if after and after[-1].body == f"ok GET {SENTINEL}".encode():
        sentinel = after[-1]
    else:
        fresh = await RawClient.connect(url)
        try:
            await fresh.send(_sentinel_request())
            sentinel = await fresh.response(wait=wait)
        finally:
            await fresh.close()
    # The sentinel's upstream answer came back: everything the probe sent upstream was
    # parsed before it (same pooled connection) or long before (another one).
    await asyncio.sleep(0.01)
    seen = upstream.requests[before:]
    probe_requests = [r for r in seen if r.target != SENTINEL]
    return Outcome(data, first, after, sentinel, probe_requests, upstream, closed)


def _check_sentinel(outcome: Outcome) -> None:
    why = outcome.explain()
    assert not outcome.recorder.anomalies, f"the upstream parsed an anomaly\n{why}"
    assert outcome.sentinel.status == 200, f"the sentinel was not answered\n{why}"
    assert outcome.sentinel.body == f"ok GET {SENTINEL}".encode(), (
        f"the sentinel got another request's answer: a desynchronised connection\n{why}"
    )
    sentinels = [r for r in outcome.recorder.requests if r.target == SENTINEL]
    assert sentinels and sentinels[-1] is outcome.recorder.requests[-1], (
        f"the upstream parsed something after the sentinel\n{why}"
    )
    assert len(outcome.after) <= 1, f"one request, several answers: the client desynced\n{why}"


def assert_refused(outcome: Outcome, status: int | None = None, *, close: bool = True) -> None:
    """A 4xx (exactly `status` when given), nothing at all sent upstream, and (`close`) the
    connection closed after the answer."""
    why = outcome.explain()
    assert outcome.upstream == [], f"a refused request reached the upstream\n{why}"
    assert outcome.first is not None, f"no answer at all, expected a 4xx\n{why}"
    if status is not None:
        assert outcome.first.status == status, f"expected {status}\n{why}"
    else:
        assert 400 <= outcome.first.status < 500, f"expected a 4xx\n{why}"
    if close:
        # RFC 9112 §6.3: after a framing error the server closes the connection; bytes
        # left on it must never be read as a next request.
        assert outcome.closed and not outcome.after, f"the connection was not closed\n{why}"
    _check_sentinel(outcome)


def assert_forwarded(outcome: Outcome, body: bytes, *, peer: str = "127.0.0.1") -> UpstreamRequest:
    """Exactly one upstream request, with `body` exactly, framed and addressed by the sidecar."""
    why = outcome.explain()
    assert len(outcome.upstream) == 1, f"expected exactly one upstream request\n{why}"
    sent = outcome.upstream[0]
    assert outcome.first is not None, f"no answer to a forwarded request\n{why}"
    assert outcome.first.status == 200, f"expected the upstream's 200\n{why}"
    assert outcome.first.body == f"ok {sent.method} {sent.target}".encode("latin-1"), (
        f"the client got another request's answer\n{why}"
    )
    assert sent.body == body, f"the upstream got other body bytes than the client sent\n{why}"
    framing = sent.framing()
    assert len(framing) <= 1, f"more than one framing header upstream\n{why}"
    if body:
        assert len(framing) == 1, f"a body without a framing header\n{why}"
    for name, value in framing:
        if name.lower() == "content-length":
            assert value == str(len(body)), f"Content-Length does not match the body\n{why}"
        else:
            assert value == "chunked", f"Transfer-Encoding other than chunked\n{why}"
    assert len(sent.getall("host")) == 1, f"not exactly one Host upstream\n{why}"
    assert sent.target.startswith("/"), f"the upstream target is not origin-form\n{why}"
    for name in NEVER_COPIED:
        assert name not in sent.names(), f"{name} reached the upstream\n{why}"
    assert sent.getall("x-forwarded-for") == [peer], f"X-Forwarded-For is not the peer\n{why}"
    assert len(sent.getall("x-forwarded-proto")) == 1, f"not one X-Forwarded-Proto\n{why}"
    # One line; none only for a client that sent no Host (HTTP/1.0 allows that).
    assert len(sent.getall("x-forwarded-host")) <= 1, f"several X-Forwarded-Host\n{why}"
    _check_sentinel(outcome)
    return sent


def assert_invariant(
    outcome: Outcome, body: bytes, expect: Expect = "either", status: int | None = None
) -> None:
    """`expect`: what the contract demands of this request; `either` keeps the invariant."""
    if expect == "refuse":
        assert_refused(outcome, status)
    elif expect == "either" and _refused(outcome):
        assert_refused(outcome, close=False)
    else:
        assert_forwarded(outcome, body)


def _refused(outcome: Outcome) -> bool:
    """Whether the sidecar chose the 4xx branch: a 4xx answer and nothing upstream."""
    first = outcome.first
    return not outcome.upstream and first is not None and 400 <= first.status < 500


@dataclass
class IssueSite:
    """The sidecar of `issue_config` (public_paths [/public], `/admin` for admins only) in
    front of a strict recording upstream."""

    sidecar: Any
    upstream: RecordingUpstream

    @property
    def url(self) -> str:
        return str(self.sidecar.url("/"))
