"""The one exception tree of the sidecar.

    SidecarError
    ├── ConfigError            bad configuration: names the key; exit 1, no traceback
    ├── UpstreamError          the upstream could not be reached or answered too slowly
    │   ├── UpstreamUnavailable   connection refused, reset, DNS failure   → 502
    │   ├── UpstreamTimeout       connect or read timeout                   → 504
    │   └── UpstreamBusy          no pool slot within `pool_timeout`        → 503 + Retry-After
    ├── RequestBodyTimeout     the client stopped sending its body          → 408, closed
    ├── StoreUnavailable       Redis cannot be reached                      → 503
    ├── IdPError               the identity provider failed us
    │   ├── IdPUnavailable        unreachable, timed out, 5xx, garbage       → 503
    │   ├── TokenRequestError     the token endpoint said no (wire `error` code)
    │   ├── InvalidIDToken        signature, issuer, audience, nonce … wrong
    │   └── InvalidLogoutToken    a back-channel logout token failed §2.6   → 400
    ├── InvalidBearerToken     a machine client's bearer token is not valid → 401
    ├── SessionEnded           refresh said invalid_grant; session deleted  → 302 / 401
    └── RefreshUnavailable     no valid token and no refresh possible now   → 503 + Retry-After

One middleware (`middleware.map_errors`) maps every kind to its HTTP answer.
"""

from __future__ import annotations

import os

__all__ = [
    "ConfigError",
    "IdPError",
    "IdPUnavailable",
    "InvalidBearerToken",
    "InvalidIDToken",
    "InvalidLogoutToken",
    "RefreshUnavailable",
    "RequestBodyTimeout",
    "SessionEnded",
    "SidecarError",
    "StoreUnavailable",
    "TokenRequestError",
    "UpstreamBusy",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "reason",
]


class SidecarError(Exception):
    """Root of every error the sidecar raises on purpose."""


class ConfigError(SidecarError):
    """The configuration cannot be used; the message names each offending key."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        head = f"invalid configuration{f' in {source}' if source else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in problems))


class UpstreamError(SidecarError):
    """Forwarding to the upstream failed before a response could start."""

    status = 502
    code = "upstream_unavailable"
    retry_after: int | None = None  # seconds, sent as Retry-After when set


class UpstreamUnavailable(UpstreamError):
    """The upstream refused, reset or could not be resolved."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The upstream did not connect or answer in time."""

    status = 504
    code = "upstream_timeout"


class UpstreamBusy(UpstreamError):
    """Every pooled connection to the upstream stayed in use for `pool_timeout`.

    Answering 503 at once beats queueing without bound: the client learns when to come back,
    and a flood of slow requests cannot pile up waiters in the sidecar's memory.
    """

    status = 503
    code = "upstream_busy"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, round(retry_after))


class RequestBodyTimeout(SidecarError):
    """The client announced a body and then sent nothing for `server.body_timeout`.

    Not an upstream failure: the client's own, answered 408 (RFC 9110 §15.5.9) and the
    connection closed, so a stalled client cannot hold a connection or an upstream slot.
    """

    status = 408
    code = "request_timeout"


class StoreUnavailable(SidecarError):
    """The session store did not answer; no session can be read or written."""

    status = 503
    code = "store_unavailable"


class IdPError(SidecarError):
    """Something went wrong talking to the identity provider."""

    status = 503
    code = "idp_error"


class IdPUnavailable(IdPError):
    """The IdP could not be reached, timed out, or answered with something unusable.

    `maybe_sent` is False only when the request certainly never left (connection refused,
    DNS failure, connect timeout): only then may a refresh grant be retried (docs/refresh.md,
    step 5).
    """

    code = "idp_unavailable"

    def __init__(self, message: str, *, maybe_sent: bool = True) -> None:
        super().__init__(message)
        self.maybe_sent = maybe_sent


class TokenRequestError(IdPError):
    """The token endpoint refused the request; `error` is its RFC 6749 §5.2 code."""

    code = "token_request_failed"

    def __init__(self, error: str, description: str = "") -> None:
        self.error = error
        self.description = description
        super().__init__(f"token endpoint answered {error}")


class InvalidIDToken(IdPError):
    """An ID token failed validation (OIDC Core §3.1.3.7); the message says which check."""

    code = "invalid_id_token"


class InvalidLogoutToken(IdPError):
    """A back-channel logout token failed validation (OpenID Connect Back-Channel Logout 1.0
    §2.6). `reason` is a short metrics label (signature, issuer, audience, iat, exp, events,
    subject, nonce, jti, replay, typ, malformed); the message says what failed, without any
    part of the token."""

    status = 400
    code = "invalid_request"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidBearerToken(SidecarError):
    """A bearer token (`Authorization: Bearer`) that is not a valid token of an accepted
    issuer: answered 401 with `WWW-Authenticate: Bearer error="invalid_token"` (RFC 6750 §3).
    The message says what failed and never contains the token."""

    status = 401
    code = "invalid_token"


class SessionEnded(SidecarError):
    """The session is over (refresh refused, or nothing left to refresh with): log in again."""

    status = 401
    code = "session_ended"

    def __init__(self, message: str, *, reason: str = "ended") -> None:
        super().__init__(message)
        self.reason = reason  # metrics label: ended, invalid_grant_revoked, …_lost_rotation


class RefreshUnavailable(SidecarError):
    """The access token has expired and cannot be refreshed right now; the session is kept."""

    status = 503
    code = "refresh_unavailable"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, round(retry_after))


def reason(exc: BaseException) -> str:
    """Why a dependency call failed, for operators (logs, /readyz): the exception's class and
    message, and the system's words for an OS error behind it, e.g. "ConnectionError: Error
    111 connecting to 127.0.0.1:6379. (Connection refused)". Redis and aiohttp put the
    address in their messages, never a password."""
    message = " ".join(str(exc).split())[:200]
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    cause: BaseException | None = exc
    for _ in range(5):  # the OS error a library wrapped, if any
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.errno:
            words = os.strerror(cause.errno)
            return text if words in text else f"{text} ({words})"
        cause = cause.__cause__ or cause.__context__
    return text
