"""The dev IdP (sidecar.dev.idp) served from a thread, and what tests read from it or set on it.

One shared IdP serves every sidecar `configs.config_dict` builds; tests that turn its knobs
(token lifetime, failures, delays) or count its grants start one of their own, so that
another test's logins never show in their counters.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sidecar.dev.idp import DevClient, DevIdP, default_users
from sidecar.dev.idp.provider import GarbageKind
from tests.support.ports import free_port
from tests.support.threads import AppThread

__all__ = [
    "CLIENT_ID",
    "CLIENT_SECRET",
    "ThreadedIdP",
    "idp_stats",
    "latest_access_exp",
    "set_delay",
    "set_garbage",
    "set_token_failures",
    "shared_idp",
    "used_refresh_tokens_by_sub",
]

CLIENT_ID = "app"
CLIENT_SECRET = "test-client-secret"


class ThreadedIdP:
    """A `DevIdP` on 127.0.0.1 in its own event loop and thread, so subprocesses reach it too."""

    def __init__(self, port: int, access_token_ttl: float = 300.0, **options: Any) -> None:
        """`options` go to `DevIdP` (users, refresh_token_ttl, revocation …)."""
        self.issuer = f"http://127.0.0.1:{port}"
        options.setdefault("users", default_users())
        self.idp = DevIdP(self.issuer, access_token_ttl=access_token_ttl, **options)
        self._server = AppThread(self.idp.app(), port, "dev-idp")

    def register(self, public_url: str) -> None:
        """Let a sidecar at `public_url` log in and out as client `app`."""
        existing = self.idp.clients.get(CLIENT_ID)
        redirects = (existing.redirect_uris if existing else ()) + (
            public_url + "/oauth2/callback",
        )
        afters = (existing.post_logout_redirect_uris if existing else ()) + (public_url + "/",)
        self.call(
            self.idp.register_client,
            DevClient(CLIENT_ID, CLIENT_SECRET, redirects, afters),
        )

    def oidc_section(self, public_url: str) -> dict[str, Any]:
        """The `oidc` config section of a sidecar at `public_url`, registered here first."""
        self.register(public_url)
        return {
            "issuer": self.issuer,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "post_logout_redirect_url": public_url + "/",
        }

    def stop(self) -> None:
        self._server.stop()

    def call(self, fn: Any, *args: Any) -> Any:
        """Run `fn` on the IdP's loop thread (its state is not thread-safe)."""
        return self._server.call(fn, *args)


_shared: ThreadedIdP | None = None


def shared_idp() -> ThreadedIdP:
    """The IdP of every test that only needs some IdP: started on first use, never stopped."""
    global _shared
    if _shared is None:
        _shared = ThreadedIdP(free_port())
    return _shared


def idp_stats(idp: ThreadedIdP) -> dict[str, int]:
    """A copy of the IdP's counters (`DevIdPStats`), taken on its own thread."""
    return dict(idp.call(lambda: dict(vars(idp.idp.stats))))


def used_refresh_tokens_by_sub(idp: ThreadedIdP) -> Counter[str]:
    """Refresh grants per user so far: the spent refresh tokens of each user's grants."""

    def count() -> Counter[str]:
        grants = idp.idp._grants
        families = grants._families
        return Counter(families[r.family_id].sub for r in grants._refresh.values() if r.used)

    result: Counter[str] = idp.call(count)
    return result


def latest_access_exp(idp: ThreadedIdP, user: str) -> float:
    """The `exp` (Unix time) of the newest access token the IdP issued to `user`."""

    def newest() -> float:
        grants = idp.idp._grants
        families = grants._families
        return max(
            a.expires_at for a in grants._access.values() if families[a.family_id].sub == user
        )

    exp: float = idp.call(newest)
    return exp


def set_token_failures(idp: ThreadedIdP, n: int) -> None:
    """The next `n` /token requests fail (503) without processing the grant."""
    idp.call(setattr, idp.idp, "token_endpoint_failures", n)


def set_delay(idp: ThreadedIdP, seconds: float) -> None:
    """The /token endpoint answers `seconds` late (after the grant took effect)."""
    idp.call(setattr, idp.idp, "token_endpoint_delay", seconds)


def set_garbage(idp: ThreadedIdP, n: int, kind: GarbageKind = "html") -> None:
    """The next `n` /token answers are unparsable 200s of `kind` (see `DevIdP`)."""
    idp.call(setattr, idp.idp, "token_endpoint_garbage_kind", kind)
    idp.call(setattr, idp.idp, "token_endpoint_garbage", n)
