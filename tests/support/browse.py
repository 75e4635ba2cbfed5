"""A browser for the e2e tests: follows every redirect by hand and fills a provider's login form.

The dev IdP logs users in by `login_hint` (tests/support/login.py); a real provider such as
`oidc-provider` shows a login form, which `browse` submits as the named user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp

__all__ = ["HTML", "MAX_HOPS", "Hop", "browse", "path_of"]

HTML = {"Accept": "text/html,application/xhtml+xml"}
MAX_HOPS = 20


@dataclass
class Hop:
    """One request of a walk: what was asked, and the answer's status and Location."""

    method: str
    url: str
    status: int
    location: str | None


def path_of(hop: Hop) -> str:
    return urlsplit(hop.url).path


async def browse(
    s: aiohttp.ClientSession, url: str, *, login: str | None = "alice", stop_at: str | None = None
) -> tuple[list[Hop], int, str]:
    """Navigate to `url` like a browser: follow each Location by hand, fill the login form.

    Returns the hops taken and the final status and body; with `stop_at`, a redirect to a URL
    starting with it ends the walk (status 0, the URL as the body) without being requested.
    """
    hops: list[Hop] = []
    method, form = "GET", None
    for _ in range(MAX_HOPS):
        if stop_at is not None and url.startswith(stop_at):
            return hops, 0, url
        async with s.request(method, url, headers=HTML, data=form, allow_redirects=False) as r:
            body = await r.text()
            location = r.headers.get("Location")
            hops.append(Hop(method, url, r.status, location))
            if r.status in (301, 302, 303, 307, 308):
                assert location, f"redirect without Location from {url}"
                url, method, form = urljoin(url, location), "GET", None
                continue
            path = urlsplit(url).path
            if r.status == 200 and method == "GET" and re.fullmatch(r"/interaction/[\w-]+", path):
                assert login is not None, "the provider asked for a login"
                action = re.search(r'<form method="post" action="([^"]+)"', body)
                assert action, body
                url, method, form = urljoin(url, action.group(1)), "POST", {"login": login}
                continue
            return hops, r.status, body
    raise AssertionError(f"more than {MAX_HOPS} redirects: {hops}")
