"""OpenID Connect relying-party parts, shaped after the specs they implement."""

from sidecar.oidc.bearer import BearerIdentity, BearerVerifier
from sidecar.oidc.client import OIDCClient, TokenResponse
from sidecar.oidc.discovery import ProviderMetadata, parse_metadata
from sidecar.oidc.id_token import ALLOWED_ALGORITHMS, UnknownKeyId, validate_id_token
from sidecar.oidc.logout_token import LogoutClaims, UnknownLogoutKey, validate_logout_token
from sidecar.oidc.pkce import challenge_s256, new_verifier

__all__ = [
    "ALLOWED_ALGORITHMS",
    "BearerIdentity",
    "BearerVerifier",
    "LogoutClaims",
    "OIDCClient",
    "ProviderMetadata",
    "TokenResponse",
    "UnknownKeyId",
    "UnknownLogoutKey",
    "challenge_s256",
    "new_verifier",
    "parse_metadata",
    "validate_id_token",
    "validate_logout_token",
]
