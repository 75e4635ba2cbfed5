"""Client authentication at the token and revocation endpoints (RFC 6749 §2.3)."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping, Sequence
from urllib.parse import unquote_plus

from sidecar.dev.idp.errors import InvalidClient, InvalidRequest
from sidecar.dev.idp.models import DevClient

__all__ = ["AUTH_METHODS", "BASIC_CHALLENGE", "authenticate_client"]

AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")
BASIC_CHALLENGE = 'Basic realm="devidp"'


def _basic_credentials(header: str) -> tuple[str, str]:
    """RFC 6749 §2.3.1: id and secret are form-urlencoded, then HTTP Basic (RFC 7617)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise InvalidClient("unsupported Authorization scheme")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidClient("malformed Basic credentials") from exc
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise InvalidClient("malformed Basic credentials")
    return unquote_plus(client_id), unquote_plus(secret)


def _one(form: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = form.get(name, ())
    if len(values) > 1:
        raise InvalidRequest(f"parameter {name} given more than once")
    return values[0] if values else None


def authenticate_client(
    authorization: str | None,
    form: Mapping[str, Sequence[str]],
    clients: Mapping[str, DevClient],
) -> DevClient:
    """Return the authenticated client or raise InvalidClient (401).

    Exactly one method per request (RFC 6749 §2.3): client_secret_basic, client_secret_post,
    or none for a public client, which then must send only its client_id.
    """
    body_id = _one(form, "client_id")
    body_secret = _one(form, "client_secret")
    if authorization is not None:
        if body_secret is not None:
            raise InvalidRequest("more than one client authentication method used")
        client_id, secret = _basic_credentials(authorization)
        if body_id is not None and body_id != client_id:
            raise InvalidClient("client_id does not match the Basic credentials")
        given: str | None = secret
    elif body_id is not None:
        client_id, given = body_id, body_secret
    else:
        raise InvalidClient("client authentication required")
    client = clients.get(client_id)
    if client is None:
        raise InvalidClient("client authentication failed")
    if client.client_secret is None:
        if given is not None:
            raise InvalidClient("client authentication failed")
        return client
    if given is None or not hmac.compare_digest(given.encode(), client.client_secret.encode()):
        raise InvalidClient("client authentication failed")
    return client
