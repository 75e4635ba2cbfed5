"""Request smuggling and forwarding-header spoofing through the sidecar (issue 12, holes 1, 3, 4).

Every request here is hostile and goes over a raw socket to the in-process sidecar, in front
of a strict upstream (llhttp) that records every request it parses on every connection.
Each must keep the invariant of `tests/support/probe.py`: exactly one upstream request with
the client's body bytes, framed by the sidecar, or a 4xx with nothing sent upstream (400 for
bad framing, RFC 9112 §6.3; 431 for oversized heads). A pooled upstream connection never
carries a request the client did not send as one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.probe import (
    Expect,
    IssueSite,
    assert_forwarded,
    assert_invariant,
    assert_refused,
    chunked,
    issue_config,
    probe,
    request,
)
from tests.support.raw_http import RawClient
from tests.support.recording_upstream import RecordingUpstream
from tests.support.sidecars import StartSidecar

SMUGGLED = (
    b"GET /admin/secret HTTP/1.1\r\nHost: x\r\n"
    b"X-Forwarded-User: alice\r\nX-Forwarded-Groups: admins\r\n\r\n"
)
assert len(SMUGGLED) == 92  # the issue's payload, byte for byte


# --- the corpus --------------------------------------------------------------------------

HELLO = b"hello"


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    body: bytes  # the body the client meant (de-chunked)
    expect: Expect
    status: int | None = None


def post(*lines: str, body: bytes, **kw: Any) -> bytes:
    return request("POST", "/public/x", *lines, body=body, **kw)


CONNECTION_NAMED = {
    # The header a client names in Connection, and a line of that header when there is one.
    "Content-Length": None,
    "Transfer-Encoding": None,
    "Host": None,
    "Connection": None,
    "Upgrade": None,
    "TE": "TE: trailers",
    "Authorization": "Authorization: Bearer forged",
    "X-Forwarded-For": "X-Forwarded-For: 6.6.6.6",
    "Cookie": "Cookie: a=b",
}


def _connection_cases() -> list[Case]:
    cases = []
    for name, line in CONNECTION_NAMED.items():
        extra = [line] if line else []
        cases.append(
            Case(
                f"connection-names-{name}-length",
                post(f"Connection: {name}", *extra, "Content-Length: 5", body=HELLO),
                HELLO,
                "forward",
            )
        )
        cases.append(
            Case(
                f"connection-names-{name}-chunked",
                post(
                    f"Connection: {name}",
                    *extra,
                    "Transfer-Encoding: chunked",
                    body=chunked(b"hel", b"lo"),
                ),
                HELLO,
                "forward",
            )
        )
    cases.append(
        Case(
            "connection-names-all-framing",
            post(
                "Connection: keep-alive, Content-Length, Transfer-Encoding, Host, TE, Upgrade",
                "Content-Length: 5",
                body=HELLO,
            ),
            HELLO,
            "forward",
        )
    )
    return cases


CORPUS: list[Case] = [
    *_connection_cases(),
    # The issue's reproduction: without Content-Length the body became a second request.
    Case(
        "issue-connection-content-length",
        post("Connection: Content-Length", "Content-Length: 92", body=SMUGGLED),
        SMUGGLED,
        "forward",
    ),
    Case(
        "issue-connection-transfer-encoding",
        post("Connection: Transfer-Encoding", "Transfer-Encoding: chunked", body=chunked(SMUGGLED)),
        SMUGGLED,
        "forward",
    ),
    # Content-Length and Transfer-Encoding together (RFC 9112 §6.3 ¶3): refused.
    Case(
        "cl-then-te",
        post("Content-Length: 4", "Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED),
        b"",
        "refuse",
        400,
    ),
    Case(
        "te-then-cl",
        post("Transfer-Encoding: chunked", "Content-Length: 40", body=chunked(SMUGGLED)),
        b"",
        "refuse",
        400,
    ),
    # Duplicate, signed or malformed Content-Length (RFC 9112 §6.3 ¶5).
    Case(
        "cl-duplicate-same",
        post("Content-Length: 5", "Content-Length: 5", body=HELLO),
        b"",
        "refuse",
        400,
    ),
    Case(
        "cl-duplicate-different",
        post("Content-Length: 5", "Content-Length: 0", body=HELLO),
        b"",
        "refuse",
        400,
    ),
    Case("cl-list", post("Content-Length: 5, 5", body=HELLO), b"", "refuse", 400),
    Case("cl-plus", post("Content-Length: +3", body=b"abc"), b"", "refuse", 400),
    Case("cl-minus", post("Content-Length: -1", body=b"abc"), b"", "refuse", 400),
    Case("cl-hex", post("Content-Length: 0x3", body=b"abc"), b"", "refuse", 400),
    Case("cl-inner-space", post("Content-Length: 3 3", body=b"abc"), b"", "refuse", 400),
    # Surrounding whitespace is OWS, not part of the value: reading 3 is as right as a 400.
    Case("cl-padded", post("Content-Length:  3 ", body=b"abc"), b"abc", "either"),
    # Transfer-Encoding other than exactly `chunked` (RFC 9112 §6.3 ¶4, §7).
    Case(
        "te-chunked-identity",
        post("Transfer-Encoding: chunked, identity", body=chunked(HELLO)),
        b"",
        "refuse",
        400,
    ),
    Case(
        "te-gzip-chunked",
        post("Transfer-Encoding: gzip, chunked", body=chunked(HELLO)),
        b"",
        "refuse",
        400,
    ),
    Case(
        "te-xchunked", post("Transfer-Encoding: xchunked", body=chunked(HELLO)), b"", "refuse", 400
    ),
    # Nothing follows the head: the 400 must still end the connection.
    Case(
        "te-gzip-chunked-no-body",
        request("GET", "/public/x", "Transfer-Encoding: gzip, chunked"),
        b"",
        "refuse",
        400,
    ),
    Case(
        "cl-te-no-body",
        request("GET", "/public/x", "Transfer-Encoding: chunked", "Content-Length: 0"),
        b"",
        "refuse",
        400,
    ),
    Case("te-identity", post("Transfer-Encoding: identity", body=HELLO), b"", "refuse", 400),
    Case(
        "te-twice",
        post("Transfer-Encoding: chunked", "Transfer-Encoding: chunked", body=chunked(HELLO)),
        b"",
        "refuse",
        400,
    ),
    Case(
        "te-http10",
        post("Transfer-Encoding: chunked", body=chunked(HELLO), version="HTTP/1.0"),
        b"",
        "refuse",
        400,
    ),
    # Coding names are case-insensitive (RFC 9112 §7): decoding it right is as good as a 400.
    Case(
        "te-capitalised", post("Transfer-Encoding: Chunked", body=chunked(HELLO)), HELLO, "either"
    ),
    # Line folding, bare CR and LF, NUL, names with whitespace (RFC 9112 §2.2, §5, §5.2).
    Case(
        "obs-fold",
        request("GET", "/public/x", "X-Folded: a", " b"),
        b"",
        "refuse",
        400,
    ),
    Case(
        "obs-fold-transfer-encoding",
        post("Content-Length: 5", "Transfer-Encoding:", " chunked", body=HELLO),
        b"",
        "refuse",
        400,
    ),
    Case("bare-lf", request("GET", "/public/x", "X-A: 1", eol="\n"), b"", "refuse", 400),
    Case(
        "bare-lf-one-line",
        b"GET /public/x HTTP/1.1\r\nHost: sidecar.test\nX-A: 1\r\n\r\n",
        b"",
        "refuse",
        400,
    ),
    Case(
        "bare-cr",
        b"GET /public/x HTTP/1.1\r\nHost: sidecar.test\rX-Forwarded-User: alice\r\n\r\n",
        b"",
        "refuse",
        400,
    ),
    Case("nul-in-value", request("GET", "/public/x", "X-A: a\x00b"), b"", "either"),
    Case("space-before-colon", request("GET", "/public/x", "X-Name : v"), b"", "refuse", 400),
    Case(
        "space-before-colon-te",
        post("Content-Length: 5", "Transfer-Encoding : chunked", body=HELLO),
        b"",
        "refuse",
        400,
    ),
    Case(
        "invalid-name",
        request("GET", "/public/x", "X(A): v"),
        b"",
        "refuse",
        400,
    ),
    # Chunk extensions and trailers are accepted; the body is re-framed.
    Case(
        "chunk-extension",
        post("Transfer-Encoding: chunked", body=chunked(b"hel", b"lo", extension=";ext=1")),
        HELLO,
        "forward",
    ),
    Case(
        "chunk-extension-quoted",
        post("Transfer-Encoding: chunked", body=chunked(HELLO, extension=';a="b;c"')),
        HELLO,
        "forward",
    ),
    Case(
        "chunk-trailer",
        post("Transfer-Encoding: chunked", body=chunked(HELLO, trailers="X-Trailer: 1\r\n")),
        HELLO,
        "forward",
    ),
    Case(
        "chunk-size-hex-upper",
        post("Transfer-Encoding: chunked", body=b"A\r\n0123456789\r\n0\r\n\r\n"),
        b"0123456789",
        "forward",
    ),
    # Request targets other than origin-form (RFC 9112 §3.2).
    Case(
        "absolute-form",
        request("GET", "http://evil.example/public/x", host="evil.example"),
        b"",
        "refuse",
        400,
    ),
    Case("asterisk-form", request("OPTIONS", "*"), b"", "refuse", 400),
    Case(
        "authority-form",
        request("CONNECT", "evil.example:443", host="evil.example:443"),
        b"",
        "refuse",
        400,
    ),
    # Host: exactly one is required of HTTP/1.1 (RFC 9112 §3.2); whatever the sidecar does,
    # the upstream gets one.
    Case("host-twice", request("GET", "/public/x", "Host: evil.example"), b"", "either"),
    Case("host-missing", request("GET", "/public/x", host=None), b"", "either"),
    # Bodies with ordinary framing still arrive exactly.
    Case(
        "get-with-body",
        request("GET", "/public/x", "Content-Length: 5", body=HELLO),
        HELLO,
        "forward",
    ),
    Case(
        "http10-length", post("Content-Length: 5", body=HELLO, version="HTTP/1.0"), HELLO, "forward"
    ),
    Case("empty-chunked", post("Transfer-Encoding: chunked", body=chunked()), b"", "forward"),
]


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
async def test_hostile_request(case: Case, issue_site: IssueSite) -> None:
    """One upstream request with the client's body, or a 4xx with nothing upstream.

    Breaks when the sidecar takes framing from the client (Connection tokens, CL+TE, odd
    Content-Length or Transfer-Encoding), so the upstream reads a body as a request.
    """
    outcome = await probe(issue_site.url, issue_site.upstream, case.data)
    assert_invariant(outcome, case.body, case.expect, case.status)


async def test_issue_smuggling_payload(issue_site: IssueSite) -> None:
    """The issue's payload: the upstream sees one anonymous POST whose body is the GET.

    Breaks when `Connection: Content-Length` strips the framing: the upstream then runs
    `GET /admin/secret` with the forged identity.
    """
    data = post("Connection: Content-Length", "Content-Length: 92", body=SMUGGLED)
    outcome = await probe(issue_site.url, issue_site.upstream, data)
    sent = assert_forwarded(outcome, SMUGGLED)
    assert (sent.method, sent.target) == ("POST", "/public/x")
    assert all(r.target != "/admin/secret" for r in issue_site.upstream.requests)
    assert sent.getall("x-forwarded-user") == []


@pytest.mark.parametrize(
    "lines",
    [["X-Big: " + "a" * 9000], [f"X-Many-{i}: v" for i in range(101)]],
    ids=["header-line-over-8190", "more-than-100-headers"],
)
async def test_oversized_head(lines: list[str], issue_site: IssueSite) -> None:
    """A header line over 8190 bytes or more than 100 headers: 431, nothing upstream.

    Breaks when the limits are missing or answered with another status.
    """
    outcome = await probe(issue_site.url, issue_site.upstream, request("GET", "/public/x", *lines))
    assert_refused(outcome, 431)


async def test_two_requests_back_to_back(issue_site: IssueSite) -> None:
    """Two pipelined requests on one keep-alive connection arrive once each, bodies intact.

    Breaks when the sidecar mis-frames the first body and eats or splits the second request.
    """
    first = post("Content-Length: 5", body=HELLO)
    second = request(
        "PUT", "/public/y", "Transfer-Encoding: chunked", "Connection: close", body=chunked(b"abc")
    )
    client = await RawClient.connect(issue_site.url)
    try:
        await client.send(first + second)
        one = await client.response()
        two = await client.response()
    finally:
        await client.close()
    assert (one.status, one.body) == (200, b"ok POST /public/x")
    assert (two.status, two.body) == (200, b"ok PUT /public/y")
    seen = issue_site.upstream.requests
    assert [(r.method, r.target, r.body) for r in seen] == [
        ("POST", "/public/x", HELLO),
        ("PUT", "/public/y", b"abc"),
    ], issue_site.upstream.describe()
    assert not issue_site.upstream.anomalies, issue_site.upstream.describe()


# --- forwarding and identity headers in every spelling -----------------------------------

IDENTITY_SPELLINGS = [
    "X-Forwarded-User: mallory",
    "X_Forwarded_User: mallory",
    "x-forwarded-user: mallory",
    "X-FORWARDED-USER: mallory",
    "X-Forwarded_User: mallory",
    "X-Forwarded-Email: mallory@example.com",
    "X_Forwarded_Email: mallory@example.com",
    "X-Forwarded-Groups: admins",
    "x_forwarded_groups: admins",
    "Authorization: Bearer forged",
    "authorization: Bearer forged",
    "AUTHORIZATION: Bearer forged",
]
FORWARDING_SPELLINGS = [
    "X-Forwarded-For: 6.6.6.6",
    "X_Forwarded_For: 6.6.6.6",
    "X-Real-IP: 6.6.6.6",
    "X_Real_IP: 6.6.6.6",
    "X-Forwarded-Host: evil.example",
    "X_Forwarded_Host: evil.example",
    "X-Forwarded-Proto: https",
    "X_Forwarded_Proto: https",
    "X-Forwarded-Port: 443",
    "X-Forwarded-Prefix: /admin",
    "X_Forwarded_Prefix: /admin",
    "Forwarded: for=6.6.6.6;host=evil.example;proto=https",
    "X-Original-URL: /admin/secret",
    "X-Rewrite-URL: /admin/secret",
    "X-Original-URI: /admin/secret",
    "X-Forwarded-Uri: /admin/secret",
    "X-Forwarded-Method: DELETE",
]
# Lower-cased, `_` as `-`: what no untrusted client may set, in any spelling.
REWRITE_NAMES = {
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-forwarded-uri",
    "x-forwarded-method",
    "x-forwarded-prefix",
    "x-forwarded-port",
    "x-real-ip",
    "forwarded",
}
IDENTITY_NAMES = {"x-forwarded-user", "x-forwarded-email", "x-forwarded-groups", "authorization"}


async def test_spoofed_headers_from_untrusted_peer(issue_site: IssueSite) -> None:
    """Identity, forwarding and rewrite headers in every spelling never reach the upstream.

    Breaks when a `_` spelling (read as `-` by CGI/WSGI servers), a rewrite header
    (X-Original-URL) or a second X-Forwarded-* line slips through (oauth2-proxy
    CVE-2025-64484, GHSA-7x63-xv5r-3p2x).
    """
    data = request(
        "GET",
        "/public/x",
        *IDENTITY_SPELLINGS,
        *FORWARDING_SPELLINGS,
        "X_Custom_Thing: 1",
        "X-Kept: yes",
    )
    outcome = await probe(issue_site.url, issue_site.upstream, data)
    sent = assert_forwarded(outcome, b"")
    names = sent.names()
    why = issue_site.upstream.describe()
    assert not [n for n in names if "_" in n], why
    assert not REWRITE_NAMES & set(names), why
    assert not IDENTITY_NAMES & set(names), why
    assert sent.getall("x-forwarded-for") == ["127.0.0.1"], why
    assert sent.getall("x-forwarded-proto") == ["http"], why
    assert sent.getall("x-forwarded-host") == ["sidecar.test"], why
    assert sent.getall("x-kept") == ["yes"], why


async def test_identity_headers_dropped_even_from_trusted_proxy(
    start_sidecar: StartSidecar,
) -> None:
    """A trusted proxy's forwarding chain is kept as one line each; identity names never pass.

    Breaks when a trusted peer can choose the user or the token (any spelling), or the
    upstream gets the chain in several lines.
    """
    upstream = RecordingUpstream()
    try:
        url = await upstream.start()
        sidecar = await start_sidecar(issue_config(url, trusted_proxies=["127.0.0.1/32"]))
        data = request(
            "GET",
            "/public/x",
            *IDENTITY_SPELLINGS,
            "X-Forwarded-For: 6.6.6.6",
            "X-Forwarded-For: 7.7.7.7",
            "X-Forwarded-Proto: https",
            "X-Forwarded-Host: app.example",
        )
        outcome = await probe(sidecar.url("/"), upstream, data)
        sent = assert_forwarded(outcome, b"", peer="6.6.6.6, 7.7.7.7, 127.0.0.1")
        why = upstream.describe()
        normalised = {n.replace("_", "-") for n in sent.names()}
        assert not IDENTITY_NAMES & normalised, why
        assert sent.getall("x-forwarded-proto") == ["https"], why
        assert sent.getall("x-forwarded-host") == ["app.example"], why
    finally:
        await upstream.close()
