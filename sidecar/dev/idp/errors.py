"""OAuth 2.0 error kinds of the dev IdP, each carrying its wire code and HTTP status.

OAuthError                     RFC 6749 §5.2 / §4.1.2.1 error response
├── InvalidRequest               400 invalid_request
├── InvalidClient                401 invalid_client
├── InvalidGrant                 400 invalid_grant
│   ├── CodeReplayed               a used authorization code came back (RFC 6749 §4.1.2)
│   └── RefreshTokenReused         a rotated refresh token came back (RFC 9700 §4.14.2)
├── UnauthorizedClient           400 unauthorized_client
├── UnsupportedGrantType         400 unsupported_grant_type
├── UnsupportedResponseType      302 unsupported_response_type
├── InvalidScope                 400 invalid_scope
├── AccessDenied                 302 access_denied
├── LoginRequired                302 login_required (OIDC Core §3.1.2.6)
├── InvalidToken                 401 invalid_token (RFC 6750 §3.1)
├── InsufficientScope            403 insufficient_scope (RFC 6750 §3.1)
└── TemporarilyUnavailable       503 temporarily_unavailable
BadAuthorizationTarget         unknown client or redirect_uri: an error page, never a redirect
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AccessDenied",
    "BadAuthorizationTarget",
    "CodeReplayed",
    "InsufficientScope",
    "InvalidClient",
    "InvalidGrant",
    "InvalidRequest",
    "InvalidScope",
    "InvalidToken",
    "LoginRequired",
    "OAuthError",
    "RefreshTokenReused",
    "TemporarilyUnavailable",
    "UnauthorizedClient",
    "UnsupportedGrantType",
    "UnsupportedResponseType",
]


class OAuthError(Exception):
    """An error response with an `error` code and a human `error_description`."""

    error: ClassVar[str] = "server_error"
    status: ClassVar[int] = 400

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description

    def as_dict(self) -> dict[str, str]:
        """The JSON body of RFC 6749 §5.2."""
        return {"error": self.error, "error_description": self.description}


class InvalidRequest(OAuthError):
    error = "invalid_request"


class InvalidClient(OAuthError):
    error = "invalid_client"
    status = 401


class InvalidGrant(OAuthError):
    error = "invalid_grant"


class CodeReplayed(InvalidGrant):
    """RFC 6749 §4.1.2: a code used twice; tokens issued from it are revoked."""


class RefreshTokenReused(InvalidGrant):
    """RFC 9700 §4.14.2: an already rotated refresh token; its whole family is revoked."""


class UnauthorizedClient(OAuthError):
    error = "unauthorized_client"


class UnsupportedGrantType(OAuthError):
    error = "unsupported_grant_type"


class UnsupportedResponseType(OAuthError):
    error = "unsupported_response_type"


class InvalidScope(OAuthError):
    error = "invalid_scope"


class AccessDenied(OAuthError):
    error = "access_denied"


class LoginRequired(OAuthError):
    error = "login_required"


class InvalidToken(OAuthError):
    error = "invalid_token"
    status = 401


class InsufficientScope(OAuthError):
    error = "insufficient_scope"
    status = 403


class TemporarilyUnavailable(OAuthError):
    error = "temporarily_unavailable"
    status = 503


class BadAuthorizationTarget(Exception):
    """RFC 6749 §4.1.2.1: the client or redirect_uri is wrong, so the user agent is not sent
    anywhere; the user sees an error page instead."""
