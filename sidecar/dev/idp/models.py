"""Registered clients and users of the dev IdP: plain frozen values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

from yarl import URL

__all__ = ["SHAPES", "ClientShape", "DevClient", "DevIdPStats", "DevUser", "default_users"]

# Whose tokens a client gets (docs/identity-providers.md has the sidecar's recipe for each):
#
# - default: groups in the ID token and userinfo, a refresh token on every code exchange,
#   rotated on each refresh with reuse detection, `refresh_expires_in` in token answers.
# - keycloak: as default, but the user's groups are realm roles in the access token only
#   (`realm_access.roles`), their roles client roles (`resource_access.<client_id>.roles`);
#   the access token's `aud` is "account".
# - okta: a refresh token only with the `offline_access` scope; the access token carries
#   `scp` (a list) and `sub` = the login name; no `refresh_expires_in`.
# - google: an opaque access token; a refresh token only for `access_type=offline`, and on a
#   repeated login only with `prompt=consent`; refreshes do not rotate (no new refresh token,
#   the old one stays valid); no groups; no `refresh_expires_in`.
# - entra: `groups` as object ids in the ID token, or, past `group_overage` groups, only the
#   `_claim_names`/`_claim_sources` pointer to Graph ("group overage"); app roles in `roles`;
#   no `email_verified`; an access token for another resource (Graph, another issuer); a
#   refresh token only with `offline_access`, a new one on each refresh, the old one kept
#   valid; no `refresh_expires_in`.
ClientShape = Literal["default", "keycloak", "okta", "google", "entra"]
SHAPES: Final = frozenset(get_args(ClientShape))


@dataclass(frozen=True)
class DevClient:
    """A registered relying party; `client_secret=None` makes it a public client (RFC 6749
    §2.1) that authenticates with PKCE alone (`token_endpoint_auth_method=none`)."""

    client_id: str
    client_secret: str | None
    redirect_uris: tuple[str, ...]
    post_logout_redirect_uris: tuple[str, ...] = ()
    shape: ClientShape = "default"
    group_overage: int = 3  # entra: more groups than this leave only the Graph pointer

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"client {self.client_id!r}: unknown shape {self.shape!r}")
        # RFC 6749 §3.1.2: absolute URI, no fragment; compared by exact string match.
        for uri in (*self.redirect_uris, *self.post_logout_redirect_uris):
            url = URL(uri)
            if not url.is_absolute() or url.fragment or "#" in uri:
                raise ValueError(f"client {self.client_id!r}: bad redirect URI {uri!r}")

    def __repr__(self) -> str:
        secret = "None" if self.client_secret is None else "'***'"
        return (
            f"DevClient(client_id={self.client_id!r}, client_secret={secret}, "
            f"redirect_uris={self.redirect_uris!r}, shape={self.shape!r})"
        )


@dataclass(frozen=True)
class DevUser:
    """A user the login page offers; `extra` claims go into ID tokens and userinfo as is.

    `roles` are application roles, released by the keycloak shape as client roles and by the
    entra shape as app roles (`roles`); the default shape ignores them.
    """

    sub: str
    email: str
    name: str
    groups: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    roles: tuple[str, ...] = ()


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
