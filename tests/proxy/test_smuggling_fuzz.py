"""Property: no header set, method or body smuggles a request past the sidecar (issue 12).

Hypothesis generates requests from a pool of header names that matter for framing, hop-by-
hop handling and identity (in random case and in `_` spellings), random Connection token
lists, methods, and bodies sent with Content-Length or chunked. Each goes over a raw socket
through one real sidecar to one strict recording upstream, and must keep the invariant of
`tests/support/probe.py`: a 4xx with nothing upstream, or exactly one upstream request with
exactly the client's body and at most one framing header. A small model of RFC 9112 §6
says which requests must be refused (bad framing), which must be forwarded, and which may
go either way.

Bounded for CI: a fixed number of derandomised examples, no example database, no shrinking
(a failure prints the generated request; shrinking against timeouts could take minutes).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from tests.support.probe import (
    Expect,
    Outcome,
    assert_forwarded,
    assert_refused,
    issue_config,
    probe,
)
from tests.support.recording_upstream import RecordingUpstream
from tests.support.sidecars import Sidecar

MAX_EXAMPLES = 300
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
SMUGGLED = (
    b"GET /admin/secret HTTP/1.1\r\nHost: x\r\n"
    b"X-Forwarded-User: alice\r\nX-Forwarded-Groups: admins\r\n\r\n"
)
# Names that decide framing, hop-by-hop handling, routing or identity somewhere.
NAMES = [
    "Content-Length",
    "Transfer-Encoding",
    "Host",
    "Connection",
    "Upgrade",
    "TE",
    "Keep-Alive",
    "Proxy-Connection",
    "Trailer",
    "Authorization",
    "Cookie",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Forwarded-User",
    "X-Forwarded-Groups",
    "X-Real-IP",
    "Forwarded",
    "X-Original-URL",
    "Content-Type",
    "X-Custom",
]
TE_VALUES = [
    "chunked",
    "Chunked",
    "CHUNKED",
    "chunked, chunked",
    "gzip, chunked",
    "chunked, identity",
    "identity",
    "xchunked",
    "gzip",
]
OTHER_VALUES = ["v", "Bearer forged", "6.6.6.6", "evil.example", "admins", "https", "a=b", "h2c"]
IDENTITY = {"x-forwarded-user", "x-forwarded-groups", "authorization"}
UNTRUSTED = {"x-real-ip", "forwarded", "x-original-url"}


@dataclass(frozen=True)
class FuzzCase:
    version: str
    method: str
    headers: tuple[tuple[str, str], ...]
    wire_body: bytes  # the bytes after the head
    body: bytes  # the body they carry, under the model's reading
    expect: Expect

    def data(self) -> bytes:
        lines = [f"{self.method} /public/fuzz {self.version}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.wire_body


def spelled(name: str) -> st.SearchStrategy[str]:
    """`name` in another case, or with `_` for `-` (a different header to HTTP, not to CGI)."""
    cases = st.sampled_from([name, name.lower(), name.upper(), name.title()])
    return st.tuples(cases, st.booleans()).map(
        lambda pair: pair[0].replace("-", "_") if pair[1] else pair[0]
    )


def value_for(name: str, size: int) -> st.SearchStrategy[str]:
    lowered = name.lower()
    if lowered == "content-length":
        n = str(size)
        return st.sampled_from([n, n, f"+{n}", "-1", f"0x{size:x}", f"{n}, {n}", f"{n} {n}", "x"])
    if lowered == "transfer-encoding":
        return st.sampled_from(TE_VALUES)
    if lowered == "connection":
        tokens = st.one_of(
            st.sampled_from(["close", "keep-alive", "upgrade"]),
            st.sampled_from(NAMES).flatmap(spelled),
        )
        return st.lists(tokens, min_size=1, max_size=4).map(", ".join)
    if lowered == "host":
        return st.sampled_from(["sidecar.test", "evil.example", "a:80"])
    if lowered == "te":
        return st.sampled_from(["trailers", "gzip", "chunked"])
    return st.sampled_from(OTHER_VALUES)


def header(size: int) -> st.SearchStrategy[tuple[str, str]]:
    return st.sampled_from(NAMES).flatmap(
        lambda name: st.tuples(spelled(name), value_for(name, size))
    )


def encode_chunked(body: bytes, cuts: list[int], extension: str) -> bytes:
    edges = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    parts = [body[a:b] for a, b in itertools.pairwise(edges) if b > a]
    out = b"".join(b"%x%b\r\n%b\r\n" % (len(p), extension.encode(), p) for p in parts)
    return out + b"0\r\n\r\n"


def classify(version: str, headers: list[tuple[str, str]]) -> tuple[Expect, str]:
    """The model: what RFC 9112 §6.3 and the sidecar's contract demand; and the framing."""
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(value)
    lengths = values.get("content-length", [])
    codings = values.get("transfer-encoding", [])
    expect: Expect
    if lengths and codings:
        return "refuse", "bad"
    if codings:
        if version != "HTTP/1.1" or len(codings) != 1 or codings[0].lower() != "chunked":
            return "refuse", "bad"
        framing = "chunked"
        expect = "forward" if codings[0] == "chunked" else "either"  # `Chunked`: RFC allows
    elif lengths:
        if len(lengths) != 1 or not (lengths[0].isascii() and lengths[0].isdigit()):
            return "refuse", "bad"
        framing, expect = "length", "forward"
    else:
        framing, expect = "none", "forward"
    tokens = {t.strip().lower() for v in values.get("connection", []) for t in v.split(",")}
    if (
        len(values.get("host", [])) != 1  # RFC 9112 §3.2 wants a 400 for these
        or len(values.get("content-type", [])) > 1  # a singleton field twice
        or ("upgrade" in tokens and "upgrade" in values)
    ):
        expect = "either"
    return expect, framing


@st.composite
def fuzz_cases(draw: st.DrawFn) -> FuzzCase:
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]))
    method = draw(st.sampled_from(METHODS))
    mode = draw(st.sampled_from(["length", "chunked", "none"]))
    body = b"" if mode == "none" else draw(st.one_of(st.binary(max_size=48), st.just(SMUGGLED)))
    headers = draw(st.lists(header(len(body)), max_size=6))
    if draw(st.integers(0, 9)):  # mostly one Host of the client's own
        headers.insert(0, ("Host", "sidecar.test"))
    framing_line = {"length": ("Content-Length", str(len(body))), "chunked": None, "none": None}
    if mode == "chunked":
        framing_line["chunked"] = ("Transfer-Encoding", "chunked")
    if (line := framing_line[mode]) is not None:
        headers.insert(draw(st.integers(0, len(headers))), line)
    expect, framing = classify(version, headers)
    cuts = draw(st.lists(st.integers(0, 64), max_size=3))
    extension = draw(st.sampled_from(["", "", ";a=b", ';q="x;y"']))
    if framing == "chunked" or (framing == "bad" and mode == "chunked"):
        wire = encode_chunked(body, cuts, extension)
    else:
        wire = body if mode == "length" else b""
    return FuzzCase(version, method, tuple(headers), wire, body, expect)


def check(case: FuzzCase, outcome: Outcome) -> None:
    """The invariant, with what the model says must happen."""
    first = outcome.first
    refused = not outcome.upstream and first is not None and 400 <= first.status < 500
    if case.expect == "refuse":
        assert_refused(outcome, 400)
        return
    if case.expect == "either" and refused:
        assert_refused(outcome, close=False)
        return
    sent = assert_forwarded(outcome, case.body)
    names = sent.names()
    why = outcome.explain()
    assert not [n for n in names if "_" in n], f"a `_` header reached the upstream\n{why}"
    assert not IDENTITY & set(names), f"a client identity header reached the upstream\n{why}"
    assert not UNTRUSTED & set(names), f"an untrusted forwarding header was kept\n{why}"
    assert sent.method == case.method, why


def test_no_header_set_smuggles_a_request() -> None:
    """Generated requests keep the invariant through one sidecar and one strict upstream.

    Breaks when any combination of framing headers, Connection tokens, spellings, methods
    and bodies makes the upstream parse other bytes or other requests than the client sent.
    """
    with asyncio.Runner() as runner:
        upstream = RecordingUpstream()
        url = runner.run(upstream.start())
        sidecar = Sidecar(issue_config(url))
        runner.run(sidecar.start())
        base = sidecar.url("/")

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(fuzz_cases())
        def keeps_invariant(case: FuzzCase) -> None:
            data = case.data()
            note(f"request: {data!r}\nexpect: {case.expect}")
            outcome = runner.run(probe(base, upstream, data, wait=2.0))
            check(case, outcome)

        try:
            keeps_invariant()
        finally:
            runner.run(sidecar.close())
            runner.run(upstream.close())
