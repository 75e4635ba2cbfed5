"""OIDC building blocks: PKCE vectors, discovery validation, the JWKS cache, key rotation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from joserfc.jwk import RSAKey

from sidecar.errors import IdPUnavailable
from sidecar.oidc import challenge_s256, parse_metadata
from sidecar.oidc.jwks import JWKSCache
from tests.support.idp import shared_idp
from tests.support.login import browser, get_json, login, setup


def test_pkce_rfc7636_appendix_b() -> None:
    """The S256 challenge matches RFC 7636 Appendix B's worked example."""
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert challenge_s256(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def _metadata(**changes: Any) -> dict[str, Any]:
    doc = {
        "issuer": "https://idp.example.com",
        "authorization_endpoint": "https://idp.example.com/auth",
        "token_endpoint": "https://idp.example.com/token",
        "jwks_uri": "https://idp.example.com/jwks",
    }
    doc.update(changes)
    return doc


def test_discovery_requires_matching_issuer() -> None:
    """A document naming another issuer is refused (Discovery §4.3, mix-up defence)."""
    with pytest.raises(ValueError, match="issuer"):
        parse_metadata(_metadata(issuer="https://evil.example.com"), "https://idp.example.com")


@pytest.mark.parametrize("endpoint", ["http://idp.example.com/token", "not a url", 42])
def test_discovery_requires_https_endpoints(endpoint: Any) -> None:
    """Endpoints must be https (plain http only on loopback)."""
    with pytest.raises(ValueError, match="token_endpoint"):
        parse_metadata(_metadata(token_endpoint=endpoint), "https://idp.example.com")


def test_discovery_allows_loopback_http() -> None:
    """A dev IdP on 127.0.0.1 may use plain http."""
    doc = _metadata(issuer="http://127.0.0.1:5556", token_endpoint="http://127.0.0.1:5556/t")
    assert parse_metadata(doc, "http://127.0.0.1:5556").token_endpoint.endswith("/t")


def _jwks(*kids: str) -> dict[str, Any]:
    keys = [RSAKey.generate_key(2048, parameters={"kid": k}).as_dict(private=False) for k in kids]
    return {"keys": keys}


class TestJWKSCache:
    async def test_refetch_is_rate_limited(self) -> None:
        """A second unknown kid within the interval does not trigger another fetch."""
        now = [1000.0]
        calls: list[int] = []
        sets = [_jwks("a"), _jwks("b"), _jwks("c")]

        async def fetch() -> Any:
            calls.append(1)
            return sets[len(calls) - 1]

        cache = JWKSCache(fetch, clock=lambda: now[0])
        await cache.load()
        assert await cache.refetch()  # the start-up load does not count
        assert not await cache.refetch()
        now[0] += 11
        assert await cache.refetch()
        assert len(calls) == 3

    async def test_failed_fetch_keeps_old_keys(self) -> None:
        """When the IdP's JWKS endpoint fails, the cached keys stay in use."""
        results: list[Any] = [_jwks("a"), IdPUnavailable("down")]

        async def fetch() -> Any:
            value = results.pop(0)
            if isinstance(value, Exception):
                raise value
            return value

        cache = JWKSCache(fetch)
        keys = await cache.load()
        assert not await cache.refetch()
        assert cache.keys is keys and keys.get_by_kid("a")

    async def test_concurrent_refetches_share_one_fetch(self) -> None:
        """Many validations hitting one new kid cause one fetch, and all see the new set."""
        calls: list[int] = []

        async def fetch() -> Any:
            calls.append(1)
            await asyncio.sleep(0.05)
            return _jwks("a", "b") if len(calls) > 1 else _jwks("a")

        cache = JWKSCache(fetch)
        await cache.load()
        results = await asyncio.gather(*(cache.refetch() for _ in range(10)))
        assert all(results) and len(calls) == 2


async def test_signing_key_rotation_is_picked_up_without_restart(
    start_sidecar: Any, upstream_app: Any
) -> None:
    """After the IdP rotates its signing key, new logins validate against the refetched JWKS."""
    sc = await setup(start_sidecar, upstream_app)
    idp = shared_idp()
    async with browser() as s:
        await login(s, sc)  # keys cached at start-up
    idp.call(idp.idp.rotate_signing_key)
    async with browser() as s:
        await login(s, sc)
        status, _ = await get_json(s, sc.url("/api/x"))
    assert status == 200
