"""Path confusion through the sidecar, end to end (issue 12, hole 2).

The issue's set-up: `/public` is public, `/` and `/admin` go to the same upstream, `/admin`
only for the `admins` group (dev IdP: alice is in admins, bob is not). Requests go over raw
sockets (an HTTP client would normalise the paths first); the strict recording upstream
shows the exact target the sidecar forwarded. Every path either reaches the upstream as
its canonical form, decided on that same form, or is refused with nothing sent upstream.

The second half puts a real nginx behind the sidecar: nginx decodes and normalises paths
itself, so any path the sidecar judged differently from nginx would show up as an
"ADMIN" page for someone outside `admins`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import Config
from tests.support.configs import config_dict
from tests.support.front_proxies import run_nginx
from tests.support.login import browser, login, session_cookie
from tests.support.ports import free_port
from tests.support.probe import IssueSite, issue_config, request
from tests.support.raw_http import RawMessage, raw_exchange
from tests.support.recording_upstream import RecordingUpstream
from tests.support.sidecars import StartSidecar, ready

LOGIN = 401  # anonymous, not public: 401 for a non-navigation request (Accept: JSON)
FORBIDDEN = 403  # logged in, outside `admins`
BAD = 400  # a path with no single meaning
# A status (or one of several) with nothing upstream, or the target the upstream must get.
Expected = int | tuple[int, ...] | str

ANONYMOUS: list[tuple[str, Expected]] = [
    ("/public/x", "/public/x"),
    ("/public/./x", "/public/x"),
    ("/public//x", "/public/x"),
    ("/public/y/../x", "/public/x"),
    ("/public/%78", "/public/x"),
    ("/public/%7Euser", "/public/~user"),
    ("/public/%c3%a9", "/public/%C3%A9"),
    ("/public/x?q=/../admin&r=%2F", "/public/x?q=/../admin&r=%2F"),
    ("/public/../admin/x", LOGIN),
    ("/public/%2e%2e/admin/x", LOGIN),
    ("/public/%2E%2E/admin/x", LOGIN),
    ("/public/.%2e/admin/x", LOGIN),
    ("/public/x/../../admin/x", LOGIN),
    ("/public/../../admin/x", LOGIN),
    ("/public/./../admin/x", LOGIN),
    ("/public%2F..%2Fadmin/x", BAD),
    ("/public%2f..%2fadmin/x", BAD),
    ("/public/..%2Fadmin/x", BAD),
    ("/public/..%5Cadmin/x", BAD),
    ("/public\\..\\admin/x", BAD),
    ("/public/..;/admin/x", BAD),
    ("/public;x/../admin/x", (BAD, LOGIN)),  # `;x` goes with its segment: safe either way
    ("/public/%00/../../admin/x", BAD),
    ("/public/%zz", BAD),
    ("/public/%", BAD),
    ("/publicity", LOGIN),
    ("/public-x/y", LOGIN),
    ("/PUBLIC/x", LOGIN),
    ("/admin/x", LOGIN),
    # Only the path decides: a query that looks public changes nothing (CVE-2025-54576).
    ("/admin/x?/public/x", LOGIN),
    ("/admin/x?rd=/public&/public/", LOGIN),
    ("/x?/public", LOGIN),
    ("http://evil.example/public/../admin/x", BAD),
]
BOB: list[tuple[str, Expected]] = [
    ("/admin/x", FORBIDDEN),
    ("/admin", FORBIDDEN),
    ("/admin/", FORBIDDEN),
    ("//admin/x", FORBIDDEN),
    ("///admin//x", FORBIDDEN),
    ("/./admin/x", FORBIDDEN),
    ("/x/../admin/x", FORBIDDEN),
    ("/%2e/admin/x", FORBIDDEN),
    ("/%2e%2e/admin/x", FORBIDDEN),
    ("/%61dmin/x", FORBIDDEN),
    ("/%61%64%6d%69%6e/x", FORBIDDEN),
    ("/admin/x/..", FORBIDDEN),
    ("/public/../admin/x", FORBIDDEN),
    ("/admin;x/y", BAD),
    ("/admin;/x", BAD),
    ("/admin/..;/admin/x", BAD),
    ("/admin\\x", BAD),
    ("/admin%00/x", BAD),
    ("/admin%2Fx", BAD),
    ("/admin%2fx", BAD),
    ("/admin%5Cx", BAD),
    ("/administrator", "/administrator"),
    ("/admin-x/y", "/admin-x/y"),
    ("/Admin/x", "/Admin/x"),
    ("/admin/../x", "/x"),
    ("/admin/%2e%2e/x", "/x"),
    ("/x/y", "/x/y"),
]
ALICE: list[tuple[str, Expected]] = [
    ("/admin/x", "/admin/x"),
    ("//admin/x", "/admin/x"),
    ("/./admin/x", "/admin/x"),
    ("/%61dmin/x", "/admin/x"),
    ("/admin/x?y=%2F..", "/admin/x?y=%2F.."),
]


def get(target: str, cookie: str | None) -> bytes:
    lines = ["Accept: application/json", "Connection: close"]
    if cookie is not None:
        lines.append(f"Cookie: sidecar={cookie}")
    return request("GET", target, *lines)


async def logged_in(sidecar: Any, user: str) -> str:
    """The session cookie of `user`, logged in through the dev IdP."""
    async with browser() as s:
        await login(s, sidecar, "/app/page", user)
        return session_cookie(s)


async def matrix_failures(
    sidecar: Any, upstream: RecordingUpstream, cookie: str | None, cases: list[tuple[str, Expected]]
) -> list[str]:
    """Each case sent once; a line per case whose outcome differs from the expected one."""
    failures = []
    for target, expected in cases:
        before = len(upstream.requests)
        response = await raw_exchange(sidecar.url("/"), get(target, cookie))
        await asyncio.sleep(0.01)
        sent = [r.target for r in upstream.requests[before:]]
        if isinstance(expected, str):
            ok = response.status == 200 and sent == [expected]
        else:
            statuses = expected if isinstance(expected, tuple) else (expected,)
            ok = response.status in statuses and sent == []
        if not ok:
            failures.append(
                f"{target!r}: expected {expected!r}, got {response.status} "
                f"with upstream targets {sent!r}"
            )
    return failures


async def test_anonymous_path_matrix(issue_site: IssueSite) -> None:
    """Anonymous requests: only canonical `/public/...` paths are public and forwarded.

    Breaks when `public_paths` matches the raw or decoded path before dot segments,
    encoded slashes or backslashes are resolved (`/public/%2e%2e/admin/x`).
    """
    failures = await matrix_failures(issue_site.sidecar, issue_site.upstream, None, ANONYMOUS)
    assert not failures, "\n".join(failures) + "\n" + issue_site.upstream.describe()


@pytest.mark.parametrize(
    "probe",
    [
        ("User-Agent", "kube-probe/1.29"),
        ("User-Agent", "GoogleHC/1.0"),
        ("User-Agent", "ELB-HealthChecker/2.0"),
        ("X-Forwarded-Uri", "/public/x"),
        ("X-Original-URL", "/public/x"),
    ],
)
async def test_no_header_makes_a_path_public(issue_site: IssueSite, probe: tuple[str, str]) -> None:
    """Only the canonical path decides what is public: a health-checker's User-Agent
    (GHSA-5hvv-m4w4-gf6v) or a rewrite header naming a public path (GHSA-7x63-xv5r-3p2x)
    leaves `/admin/x` behind login, and nothing reaches the upstream."""
    before = len(issue_site.upstream.requests)
    message = request(
        "GET", "/admin/x", "Accept: application/json", "Connection: close", ": ".join(probe)
    )
    response = await raw_exchange(issue_site.sidecar.url("/"), message)
    await asyncio.sleep(0.01)
    assert response.status == LOGIN
    assert issue_site.upstream.requests[before:] == []


async def test_non_admin_path_matrix(issue_site: IssueSite) -> None:
    """bob (not in admins) never reaches `/admin` by another spelling of it.

    Breaks when the per-upstream rule is decided on a path that is not the one forwarded
    (`//admin/x`, `/x/../admin/x`, `/admin;x/y`, `/%61dmin/x`) or prefixes match
    partial segments (`/administrator`).
    """
    cookie = await logged_in(issue_site.sidecar, "bob")
    failures = await matrix_failures(issue_site.sidecar, issue_site.upstream, cookie, BOB)
    assert not failures, "\n".join(failures) + "\n" + issue_site.upstream.describe()


async def test_admin_path_matrix(issue_site: IssueSite) -> None:
    """alice (admins) reaches `/admin` under its canonical path, whatever spelling she used.

    Breaks when canonicalisation refuses or mangles legitimate spellings.
    """
    cookie = await logged_in(issue_site.sidecar, "alice")
    failures = await matrix_failures(issue_site.sidecar, issue_site.upstream, cookie, ALICE)
    assert not failures, "\n".join(failures) + "\n" + issue_site.upstream.describe()


async def test_opt_ins_forward_params_and_encoded_slashes(start_sidecar: StartSidecar) -> None:
    """`allow_path_params` / `allow_encoded_slashes` let exactly their upstream get those forms.

    Breaks when the opt-ins are ignored (refused anyway) or leak to other upstreams.
    """
    upstream = RecordingUpstream()
    try:
        url = await upstream.start()
        upstreams = [
            {"path": "/", "url": url},
            {"path": "/params", "url": url, "allow_path_params": True},
            {"path": "/files", "url": url, "allow_encoded_slashes": True},
        ]
        sidecar = await start_sidecar(
            Config.model_validate(config_dict(url, upstreams=upstreams, public_paths=["/"]))
        )
        cases: list[tuple[str, Expected]] = [
            ("/params/x;a=b", "/params/x;a=b"),
            ("/params/x;a=b?q=1", "/params/x;a=b?q=1"),
            ("/files/a%2fb", "/files/a%2Fb"),
            ("/files/a%2Fb", "/files/a%2Fb"),
            ("/x;a=b", BAD),
            ("/x%2Fy", BAD),
            ("/files/a;b", BAD),
            ("/params/a%2Fb", BAD),
        ]
        failures = await matrix_failures(sidecar, upstream, None, cases)
        assert not failures, "\n".join(failures) + "\n" + upstream.describe()

        root = RecordingUpstream()
        try:
            root_url = await root.start()
            only = [{"path": "/", "url": root_url, "allow_path_params": True}]
            opted = await start_sidecar(
                Config.model_validate(config_dict(root_url, upstreams=only, public_paths=["/"]))
            )
            failures = await matrix_failures(opted, root, None, [("/x;a=b", "/x;a=b")])
            assert not failures, "\n".join(failures) + "\n" + root.describe()
        finally:
            await root.close()
    finally:
        await upstream.close()


# --- a real nginx behind the sidecar -----------------------------------------------------


NGINX_SERVER = """\
    server {{
        listen 127.0.0.1:{port};
        server_name _;
        location /admin/ {{ return 200 "ADMIN $uri\\n"; }}
        location / {{ return 200 "OTHER $uri\\n"; }}
    }}
"""


@pytest.fixture
async def nginx(tmp_path: Path) -> AsyncIterator[str]:
    """nginx (merge_slashes on, its default) answering `ADMIN $uri` below /admin/; its URL."""
    port = free_port()
    async with run_nginx(tmp_path / "nginx", port, NGINX_SERVER.format(port=port)) as front:
        yield front.url


def attack_paths() -> list[str]:
    return list(dict.fromkeys([t for t, _ in ANONYMOUS] + [t for t, _ in BOB]))


async def nginx_answers(sidecar: Any, cookie: str | None) -> list[tuple[str, RawMessage]]:
    out = []
    for target in attack_paths():
        out.append((target, await raw_exchange(sidecar.url("/"), get(target, cookie))))
    return out


async def test_no_admin_page_through_normalising_nginx(
    nginx: str, start_sidecar: StartSidecar
) -> None:
    """Behind the sidecar, nginx never serves its /admin/ page to anonymous users or bob.

    Breaks when the sidecar lets through any spelling that nginx's own decoding and
    normalisation turns into /admin/... (the Pomerium CVE-2023-33189 class).
    """
    sidecar = await start_sidecar(issue_config(nginx))
    await ready(sidecar)
    leaks = []
    for who, cookie in (("anonymous", None), ("bob", await logged_in(sidecar, "bob"))):
        for target, response in await nginx_answers(sidecar, cookie):
            if b"ADMIN" in response.body:
                leaks.append(f"{who} {target!r}: {response.status} {response.body!r}")
    assert not leaks, "\n".join(leaks)

    alice = await logged_in(sidecar, "alice")
    for target in ("/admin/x", "//admin/x", "/%61dmin/x"):
        response = await raw_exchange(sidecar.url("/"), get(target, alice))
        assert (response.status, response.body) == (200, b"ADMIN /admin/x\n"), target
    control = await raw_exchange(sidecar.url("/"), get("/public/x", None))
    assert (control.status, control.body) == (200, b"OTHER /public/x\n")
