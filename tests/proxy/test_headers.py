"""Which client headers reach the upstream (sidecar/forwarding/headers.py), decided per peer."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from sidecar.forwarding.headers import ForwardedPolicy, RequestHeaderFilter

INJECTED = frozenset({"x-forwarded-user", "x-forwarded-groups", "authorization", "x-request-id"})
TRUSTED = ForwardedPolicy(["10.0.0.0/8"])


class _Peer:
    """The one thing a request asks its transport here: who is on the other end."""

    def __init__(self, address: str) -> None:
        self.address = address

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.address, 40000) if name == "peername" else default


def request(peer: str, *headers: tuple[str, str]) -> web.Request:
    return make_mocked_request(
        "GET", "/x", headers=CIMultiDict([("Host", "app.test"), *headers]), transport=_Peer(peer)
    )


def forwarded(peer: str, *headers: tuple[str, str]) -> list[tuple[str, str]]:
    return RequestHeaderFilter(TRUSTED, drop=INJECTED)(request(peer, *headers))


def names(headers: list[tuple[str, str]]) -> list[str]:
    return [name.lower() for name, _ in headers]


SPOOFS = [
    ("X-Forwarded-User", "admin"),
    ("X_Forwarded_User", "admin"),
    ("x-forwarded-user", "admin"),
    ("X-FORWARDED-GROUPS", "admins"),
    ("Authorization", "Bearer forged"),
    ("X-Request-Id", "forged"),
    ("X_Forwarded_For", "1.2.3.4"),
    ("X_Real_IP", "1.2.3.4"),
    ("X_Forwarded_Host", "evil.example"),
    ("X_Forwarded_Proto", "https"),
    ("X_Forwarded_Prefix", "/admin"),
    ("X-Original-URL", "/admin"),
    ("X-Rewrite-URL", "/admin"),
    ("X-Original-URI", "/admin"),
    ("X-Forwarded-Uri", "/admin"),
    ("X-Forwarded-Method", "DELETE"),
    ("X-Forwarded-Prefix", "/admin"),
    ("X-Real-IP", "1.2.3.4"),
    ("Forwarded", "for=1.2.3.4;host=evil.example"),
    ("True-Client-IP", "1.2.3.4"),
    ("Content-Length", "5"),
    ("Transfer-Encoding", "chunked"),
    ("TE", "trailers"),
    ("Upgrade", "h2c"),
    ("Keep-Alive", "timeout=5"),
    ("Expect", "100-continue"),
]


@pytest.mark.parametrize(("name", "value"), SPOOFS)
def test_untrusted_peer_cannot_set_owned_headers(name: str, value: str) -> None:
    """From an untrusted peer none of these arrive as sent, whatever the spelling."""
    out = forwarded("192.0.2.7", (name, value))
    assert (name, value) not in out
    assert value not in [v for _, v in out if _ != "Host"]


def test_one_forwarding_chain_built_by_the_sidecar() -> None:
    """An untrusted peer's own X-Forwarded-* never reach the upstream: exactly one of each."""
    out = forwarded(
        "192.0.2.7",
        ("X-Forwarded-For", "1.2.3.4"),
        ("X-Forwarded-For", "5.6.7.8"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
    )
    assert names(out).count("x-forwarded-for") == 1
    assert ("X-Forwarded-For", "192.0.2.7") in out
    assert ("X-Forwarded-Proto", "http") in out
    assert ("X-Forwarded-Host", "app.test") in out
    assert names(out).count("x-forwarded-host") == 1
    assert names(out).count("x-forwarded-proto") == 1


def test_trusted_proxy_chain_is_extended_once() -> None:
    """Behind a trusted proxy the chain is kept and extended, still one line of each."""
    out = forwarded(
        "10.1.2.3",
        ("X-Forwarded-For", "198.51.100.1, 10.9.9.9"),
        ("X-Forwarded-For", "10.8.8.8"),
        ("X-Forwarded-Proto", "http, https"),
        ("X-Forwarded-Host", "public.example"),
        ("X-Original-URL", "/kept"),
    )
    assert ("X-Forwarded-For", "198.51.100.1, 10.9.9.9, 10.8.8.8, 10.1.2.3") in out
    assert ("X-Forwarded-Proto", "https") in out
    assert ("X-Forwarded-Host", "public.example") in out
    assert ("X-Original-URL", "/kept") in out
    for name in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"):
        assert names(out).count(name) == 1


@pytest.mark.parametrize(
    ("proto", "host"), [("javascript", "a b"), ("https;x", "evil.example/path"), ("", "")]
)
def test_trusted_proxy_values_must_be_well_formed(proto: str, host: str) -> None:
    """A trusted proxy's malformed proto or host gives way to the sidecar's own view."""
    out = forwarded("10.1.2.3", ("X-Forwarded-Proto", proto), ("X-Forwarded-Host", host))
    assert ("X-Forwarded-Proto", "http") in out
    assert ("X-Forwarded-Host", "app.test") in out


def test_injected_names_dropped_even_from_trusted_proxies() -> None:
    out = forwarded("10.1.2.3", ("X_Forwarded_User", "admin"), ("X-Forwarded-User", "admin"))
    assert "admin" not in [v for _, v in out]


def test_underscore_names_pass_only_from_trusted_proxies() -> None:
    assert ("X_Custom", "1") in forwarded("10.1.2.3", ("X_Custom", "1"))
    assert ("X_Custom", "1") not in forwarded("192.0.2.7", ("X_Custom", "1"))


@pytest.mark.parametrize(
    "token",
    ["Content-Length", "Transfer-Encoding", "Host", "Connection", "Upgrade", "TE", "Expect"],
)
def test_connection_tokens_cannot_remove_owned_headers(token: str) -> None:
    """`Connection: Host` used to send a request without Host; the filter never copies
    owned headers, and Connection names can remove only ordinary end-to-end ones."""
    out = forwarded("192.0.2.7", ("Connection", f"{token}, X-Hop"), ("X-Hop", "1"), ("X-E2e", "2"))
    assert "x-hop" not in names(out)
    assert ("X-E2e", "2") in out
    assert ("X-Forwarded-Host", "app.test") in out
    assert "connection" not in names(out)


@pytest.mark.parametrize(
    ("peer", "xff", "client"),
    [
        ("192.0.2.7", "198.51.100.1", "192.0.2.7"),  # untrusted: its XFF is its own word
        ("10.1.2.3", "198.51.100.1", "198.51.100.1"),
        ("10.1.2.3", "203.0.113.9, 198.51.100.1, 10.7.7.7", "198.51.100.1"),
        ("10.1.2.3", "not-an-ip", "10.1.2.3"),
        ("10.1.2.3", "", "10.1.2.3"),
    ],
)
def test_client_ip(peer: str, xff: str, client: str) -> None:
    """The right-most X-Forwarded-For hop that is not a trusted proxy, behind trusted ones."""
    headers = [("X-Forwarded-For", xff)] if xff else []
    assert TRUSTED.client_ip(request(peer, *headers)) == client


def test_trust_answers_are_remembered_and_stay_right() -> None:
    """The per-peer memory gives the same answers as computing afresh, and stays bounded."""
    from sidecar.forwarding.headers import ForwardedPolicy

    policy = ForwardedPolicy(["10.0.0.0/8", "::1/128"])
    for _ in range(2):
        assert policy.trusts("10.1.2.3") and policy.trusts("::1")
        assert not policy.trusts("11.0.0.1") and not policy.trusts("not-an-address")
        assert not policy.trusts("") and not policy.trusts(None)
    for i in range(5000):
        assert policy.trusts(f"10.0.{i // 256}.{i % 256}")
    assert len(policy._known) <= 4096
