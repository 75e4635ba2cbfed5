"""Provider metadata (OpenID Connect Discovery 1.0 §3, §4.3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from yarl import URL

__all__ = ["ProviderMetadata", "parse_metadata"]

_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    revocation_endpoint: str | None
    end_session_endpoint: str | None
    id_token_signing_alg_values_supported: tuple[str, ...]


def parse_metadata(document: Any, issuer: str) -> ProviderMetadata:
    """Validate a discovery document for `issuer`; raise ValueError naming the bad field."""
    if not isinstance(document, dict):
        raise ValueError("discovery document is not a JSON object")
    # §4.3: the issuer in the document must be identical to the one configured.
    if document.get("issuer") != issuer and document.get("issuer") != issuer + "/":
        raise ValueError(f"issuer {document.get('issuer')!r} does not match {issuer!r}")

    def endpoint(name: str, required: bool) -> str | None:
        value = document.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str):
            raise ValueError(f"{name} is missing or not a string")
        url = URL(value)
        secure = url.scheme == "https" or (url.scheme == "http" and url.host in _LOOPBACK)
        if not url.host or not secure:
            raise ValueError(f"{name} must be an https URL (http only on loopback)")
        return value

    algs = document.get("id_token_signing_alg_values_supported") or ["RS256"]
    if not isinstance(algs, list) or not all(isinstance(a, str) for a in algs):
        raise ValueError("id_token_signing_alg_values_supported is not a list of strings")
    return ProviderMetadata(
        issuer=document["issuer"],
        authorization_endpoint=endpoint("authorization_endpoint", True) or "",
        token_endpoint=endpoint("token_endpoint", True) or "",
        jwks_uri=endpoint("jwks_uri", True) or "",
        userinfo_endpoint=endpoint("userinfo_endpoint", False),
        revocation_endpoint=endpoint("revocation_endpoint", False),
        end_session_endpoint=endpoint("end_session_endpoint", False),
        id_token_signing_alg_values_supported=tuple(algs),
    )
