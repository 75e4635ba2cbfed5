"""Registered clients and users of the dev IdP: plain frozen values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from yarl import URL

__all__ = ["DevClient", "DevIdPStats", "DevUser", "default_users"]


@dataclass(frozen=True)
class DevClient:
    """A registered relying party; `client_secret=None` makes it a public client (RFC 6749
    §2.1) that authenticates with PKCE alone (`token_endpoint_auth_method=none`)."""

    client_id: str
    client_secret: str | None
    redirect_uris: tuple[str, ...]
    post_logout_redirect_uris: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # RFC 6749 §3.1.2: absolute URI, no fragment; compared by exact string match.
        for uri in (*self.redirect_uris, *self.post_logout_redirect_uris):
            url = URL(uri)
            if not url.is_absolute() or url.fragment or "#" in uri:
                raise ValueError(f"client {self.client_id!r}: bad redirect URI {uri!r}")

    def __repr__(self) -> str:
        secret = "None" if self.client_secret is None else "'***'"
        return (
            f"DevClient(client_id={self.client_id!r}, client_secret={secret}, "
            f"redirect_uris={self.redirect_uris!r})"
        )


@dataclass(frozen=True)
class DevUser:
    """A user the login page offers; `extra` claims go into ID tokens and userinfo as is."""

    sub: str
    email: str
    name: str
    groups: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)


def default_users() -> tuple[DevUser, ...]:
    """alice (admins, staff), bob (staff) and carol (no groups)."""
    return (
        DevUser("alice", "alice@example.com", "Alice Admin", ("admins", "staff")),
        DevUser("bob", "bob@example.com", "Bob Staff", ("staff",)),
        DevUser("carol", "carol@example.org", "Carol Outsider"),
    )


@dataclass
class DevIdPStats:
    """Counters tests read to see what the IdP was asked."""

    authorizations: int = 0  # authorization codes issued
    token_requests: int = 0  # every /token request, whatever its outcome
    code_exchanges: int = 0  # successful authorization_code grants
    code_replays: int = 0  # a used code presented again (RFC 6749 §4.1.2)
    refresh_grants: int = 0  # successful refresh_token grants (one per rotation)
    reuse_detected: int = 0  # a rotated refresh token presented again (RFC 9700 §4.14.2)
    revocations: int = 0  # /revoke requests that revoked a known token
    userinfo_calls: int = 0  # every /userinfo request
    logouts: int = 0  # /end_session requests that were accepted
