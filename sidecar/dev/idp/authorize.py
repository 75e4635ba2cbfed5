"""Validation of authorization requests (RFC 6749 §4.1.1, RFC 7636 §4.3, OIDC Core §3.1.2.1).

Two stages, because they fail differently (RFC 6749 §4.1.2.1): a wrong client or
redirect_uri gives an error page; everything after that is reported to the client by redirect.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sidecar.dev.idp.errors import (
    BadAuthorizationTarget,
    InvalidRequest,
    InvalidScope,
    UnsupportedResponseType,
)
from sidecar.dev.idp.models import DevClient

__all__ = ["SCOPES_SUPPORTED", "AuthorizationRequest", "validate_request", "validate_target"]

Params = Mapping[str, Sequence[str]]

SCOPES_SUPPORTED = ("openid", "profile", "email", "groups", "offline_access")
PROMPTS = frozenset({"none", "login", "consent", "select_account"})
# RFC 7636 §4.2: BASE64URL(SHA256(verifier)) is exactly 43 characters.
_S256_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
_MAX_PARAM = 2048  # longer values are refused rather than echoed into pages and codes


@dataclass(frozen=True)
class AuthorizationRequest:
    """A validated request, ready to be approved for some user."""

    client_id: str
    redirect_uri: str
    scope: str
    state: str | None
    nonce: str | None
    code_challenge: str
    prompt: frozenset[str]
    login_hint: str | None
    access_type: str | None = None  # Google's offline access (the google client shape)


def _single(params: Params, name: str) -> str | None:
    values = params.get(name, ())
    if len(values) > 1:
        # RFC 6749 §3.1: parameters MUST NOT be included more than once.
        raise InvalidRequest(f"parameter {name} given more than once")
    if values and len(values[0]) > _MAX_PARAM:
        raise InvalidRequest(f"parameter {name} is too long")
    return values[0] if values else None


def validate_target(params: Params, clients: Mapping[str, DevClient]) -> tuple[DevClient, str]:
    """RFC 6749 §3.1.2.4 and §4.1.2.1: the client exists and redirect_uri is registered
    exactly (OIDC Core §3.1.2.1 makes redirect_uri required)."""
    client_ids = params.get("client_id", ())
    if len(client_ids) != 1 or client_ids[0] not in clients:
        raise BadAuthorizationTarget("unknown or missing client_id")
    client = clients[client_ids[0]]
    redirect_uris = params.get("redirect_uri", ())
    if len(redirect_uris) != 1 or redirect_uris[0] not in client.redirect_uris:
        raise BadAuthorizationTarget("redirect_uri is missing or not registered for this client")
    return client, redirect_uris[0]


def validate_request(params: Params, client: DevClient, redirect_uri: str) -> AuthorizationRequest:
    """Everything after the target: response_type, scope, PKCE S256, prompt."""
    state = _single(params, "state")
    response_type = _single(params, "response_type")
    if response_type is None:
        raise InvalidRequest("response_type is required")
    if response_type != "code":
        raise UnsupportedResponseType("only response_type=code is supported")
    response_mode = _single(params, "response_mode")
    if response_mode not in (None, "query"):
        raise InvalidRequest("only response_mode=query is supported")
    if _single(params, "request") is not None or _single(params, "request_uri") is not None:
        raise InvalidRequest("request objects are not supported")
    scope = _single(params, "scope") or ""
    scopes = scope.split()
    if "openid" not in scopes:
        raise InvalidScope("scope must include openid")
    unknown = sorted(set(scopes) - set(SCOPES_SUPPORTED))
    if unknown:
        raise InvalidScope(f"unsupported scope: {' '.join(unknown)}")
    challenge = _single(params, "code_challenge")
    method = _single(params, "code_challenge_method")
    if challenge is None:
        raise InvalidRequest("code_challenge is required (PKCE, RFC 7636)")
    if method != "S256":
        raise InvalidRequest("code_challenge_method must be S256")
    if not _S256_CHALLENGE.fullmatch(challenge):
        raise InvalidRequest("code_challenge is not a base64url SHA-256 value")
    prompt = frozenset((_single(params, "prompt") or "").split())
    if not prompt <= PROMPTS or ("none" in prompt and len(prompt) > 1):
        raise InvalidRequest("invalid prompt")
    access_type = _single(params, "access_type")
    if access_type not in (None, "online", "offline"):
        raise InvalidRequest("access_type must be online or offline")
    return AuthorizationRequest(
        client_id=client.client_id,
        redirect_uri=redirect_uri,
        scope=" ".join(dict.fromkeys(scopes)),
        state=state,
        nonce=_single(params, "nonce"),
        code_challenge=challenge,
        prompt=prompt,
        login_hint=_single(params, "login_hint"),
        access_type=access_type,
    )
