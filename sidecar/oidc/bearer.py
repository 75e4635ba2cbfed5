"""Bearer tokens of machine clients (RFC 6750): whose they are, and whether they are valid.

A JWT access token (RFC 9068) is checked locally against the published keys of its issuer:
the provider's (`bearer.accept_provider_tokens`) or one of `bearer.issuers`, whose discovery
document and keys are fetched on first use. Any other token is asked about at the
introspection endpoint (RFC 7662), when one is configured. A validated identity is kept by
the token's SHA-256 until the token expires, so a repeated token costs a hash and a lookup.

`aiohttp.ClientError` never leaves this module. A token is refused (`InvalidBearerToken`,
401) only when it is certainly bad; when its issuer or the introspection endpoint cannot be
asked, the answer is `IdPUnavailable` (503). No message ever contains the token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    InvalidKeyIdError,
    JoseError,
    KeyParameterError,
    MissingKeyError,
    UnsupportedAlgorithmError,
)
from joserfc.jwk import KeySet
from yarl import URL

from sidecar.config import BearerConfig, BearerIssuer, IntrospectionConfig
from sidecar.config.types import ASYMMETRIC_ALGORITHMS
from sidecar.errors import IdPUnavailable, InvalidBearerToken, reason
from sidecar.oidc.client import OIDCClient, client_auth, json_object, read_capped
from sidecar.oidc.id_token import LEEWAY
from sidecar.oidc.jwks import JWKSCache

__all__ = ["MAX_TOKEN_LENGTH", "BearerIdentity", "BearerVerifier"]

log = logging.getLogger("sidecar.oidc")

MAX_TOKEN_LENGTH: Final = 16 * 1024  # characters; anything longer is refused unread
_TIMEOUT: Final = 5.0  # seconds for one discovery, JWKS or introspection request
_LOAD_RETRY: Final = 5.0  # seconds an issuer whose keys failed to load is not asked again

# RFC 6750 §2.1 b64token: what may follow `Bearer `; nothing else is sent anywhere.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# RFC 7515 §7.1 compact serialization; an empty signature is refused for its `alg`.
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# RFC 9068 §2.1 asks for `at+jwt`; plain `JWT` and no `typ` are what most issuers send.
_ACCEPTED_TYP: Final = frozenset({"at+jwt", "application/at+jwt", "jwt"})
# RFC 7662 §2.2 `token_type`: a DPoP-bound token (RFC 9449 §7.1) is no bearer token.
_BEARER_TOKEN_TYPES: Final = frozenset(
    {"bearer", "access_token", "urn:ietf:params:oauth:token-type:access_token"}
)
# joserfc errors that mean "not signed by an acceptable key", as opposed to garbage.
_SIGNATURE_ERRORS: Final = (
    BadSignatureError,
    KeyParameterError,
    MissingKeyError,
    UnsupportedAlgorithmError,
)
_LOOPBACK: Final = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True, slots=True)
class BearerIdentity:
    """Who a valid bearer token speaks for. Shared by every request with the same token:
    never mutate `claims`."""

    issuer: str
    subject: str
    claims: dict[str, Any]  # the JWT payload, or the introspection answer
    scopes: frozenset[str]
    expires_at: float  # Unix time
    key: str  # base64url SHA-256 of the token: a cache key, never the token


class BearerVerifier:
    """Verifies bearer tokens and remembers the valid ones (see the module docstring)."""

    def __init__(
        self,
        config: BearerConfig,
        provider: OIDCClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._provider = provider
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._provider_keys = (
            _ProviderKeys(provider, config.audiences or [provider.config.client_id])
            if config.accept_provider_tokens
            else None
        )
        self._issuers: dict[str, _RemoteKeys] = {}
        for entry in config.issuers:
            keys = _RemoteKeys(entry, self._get_json)
            # The configured issuer lost any trailing slash (BaseUrl): both spellings are it.
            self._issuers.setdefault(entry.issuer, keys)
            self._issuers.setdefault(entry.issuer + "/", keys)
        # sha256(token) -> (identity, valid until); insertion order is age.
        self._cache: dict[bytes, tuple[BearerIdentity, float]] = {}
        # One verification per token at a time: a burst of requests with a new token waits
        # for the first one's answer instead of asking the issuer again.
        self._pending: dict[bytes, asyncio.Task[BearerIdentity]] = {}

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=_TIMEOUT),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        pending = list(self._pending.values())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def enabled(self) -> bool:
        return self._config.enabled

    async def verify(self, token: str) -> BearerIdentity:
        """The identity of a valid token; `InvalidBearerToken` saying which check failed, or
        `IdPUnavailable` when the token cannot be judged now."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidBearerToken("token too long")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        hit = self._cache.get(digest)
        if hit is not None:
            if self._clock() < hit[1]:
                return hit[0]
            self._cache.pop(digest, None)
        task = self._pending.get(digest)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._verify_new(token, digest))
            self._pending[digest] = task
            task.add_done_callback(functools.partial(self._settled, digest))
        # Shielded: a caller that gives up must not cancel the others' answer.
        return await asyncio.shield(task)

    def _settled(self, digest: bytes, task: asyncio.Task[BearerIdentity]) -> None:
        if self._pending.get(digest) is task:
            del self._pending[digest]
        if not task.cancelled():
            task.exception()  # retrieved, even when every waiter has gone

    async def _verify_new(self, token: str, digest: bytes) -> BearerIdentity:
        if not _B64TOKEN.fullmatch(token):
            raise InvalidBearerToken("malformed token")
        key = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
        parts = _jwt_parts(token)
        if parts is not None:
            identity, valid_until = await self._verify_jwt(token, key, *parts)
        elif self._config.introspection is not None:
            identity, valid_until = await self._introspect(token, key, self._config.introspection)
        else:
            raise InvalidBearerToken("not a JWT")
        if valid_until > self._clock():
            self._remember(digest, identity, valid_until)
        return identity

    def _remember(self, digest: bytes, identity: BearerIdentity, valid_until: float) -> None:
        cache = self._cache
        cache.pop(digest, None)
        while len(cache) >= self._config.cache_max_entries:
            del cache[next(iter(cache))]
        cache[digest] = (identity, valid_until)

    # --- JWT access tokens (RFC 9068) ------------------------------------------------------

    async def _verify_jwt(
        self, token: str, key: str, header: dict[str, Any], payload: Any
    ) -> tuple[BearerIdentity, float]:
        """The identity of a valid JWT access token, valid until its `exp`."""
        if not isinstance(payload, dict):
            raise InvalidBearerToken("malformed token")
        issuer = payload.get("iss")
        source = self._source(issuer)
        if source is None:
            if self._config.introspection is not None:  # its issuer may know it
                return await self._introspect(token, key, self._config.introspection)
            raise InvalidBearerToken("unknown issuer")
        assert isinstance(issuer, str)  # a source was found by it

        _check_header(header, source.algorithms)
        claims = await _signed_claims(token, source)
        if claims.get("iss") != issuer:
            raise InvalidBearerToken("wrong issuer")
        _check_audience(claims, source.audiences)
        now = self._clock()
        exp = _check_times(claims, now)
        if exp is None:
            raise InvalidBearerToken("token has no expiry")
        _check_access_token(claims)
        identity = BearerIdentity(
            issuer=issuer,
            subject=_subject(claims),
            claims=claims,
            scopes=_scopes(claims),
            expires_at=exp,
            key=key,
        )
        return identity, exp

    def _source(self, issuer: object) -> _KeySource | None:
        """Who vouches for tokens of `issuer`: the provider, a configured issuer, or nobody."""
        if not isinstance(issuer, str):
            return None
        if self._provider_keys is not None:
            try:
                if issuer == self._provider.metadata.issuer:
                    return self._provider_keys
            except IdPUnavailable:
                configured = self._provider.config.issuer
                if issuer in (configured, configured + "/"):
                    raise  # the provider's own token, before its metadata loaded: ask later
        return self._issuers.get(issuer)

    # --- introspection (RFC 7662) ----------------------------------------------------------

    async def _introspect(
        self, token: str, key: str, config: IntrospectionConfig
    ) -> tuple[BearerIdentity, float]:
        """The identity of an active token and until when the answer may be reused."""
        # §2.1: the token, a hint, and the client's authentication (RFC 6749 §2.3.1).
        form, headers = client_auth(
            {"token": token, "token_type_hint": "access_token"},
            config.client_id,
            config.client_secret,
        )
        answer = await self._request_json("POST", config.endpoint, form, headers)
        active = answer.get("active")  # §2.2: REQUIRED boolean
        if active is False:
            raise InvalidBearerToken("token is not active")
        if active is not True:
            raise IdPUnavailable("introspection answer without a boolean active")

        token_type = answer.get("token_type")
        if token_type is not None and (
            not isinstance(token_type, str) or token_type.lower() not in _BEARER_TOKEN_TYPES
        ):
            raise InvalidBearerToken("wrong token type")
        _check_access_token(answer)
        issuer = answer.get("iss", self._provider_issuer())
        if not isinstance(issuer, str) or not issuer:
            raise InvalidBearerToken("wrong issuer")
        if "aud" in answer and self._config.audiences:
            _check_audience(answer, self._config.audiences)
        now = self._clock()
        exp = _check_times(answer, now)
        reuse_until = now + config.cache_ttl
        identity = BearerIdentity(
            issuer=issuer,
            subject=_subject(answer),
            claims=answer,
            scopes=_scopes(answer),
            expires_at=reuse_until if exp is None else exp,
            key=key,
        )
        return identity, reuse_until if exp is None else min(exp, reuse_until)

    def _provider_issuer(self) -> str:
        try:
            return self._provider.metadata.issuer
        except IdPUnavailable:
            return self._provider.config.issuer

    # --- HTTP ------------------------------------------------------------------------------

    async def _get_json(self, url: str) -> dict[str, Any]:
        return await self._request_json("GET", url)

    async def _request_json(
        self,
        method: str,
        url: str,
        form: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """A JSON object from `url`, or `IdPUnavailable`. Redirects are never followed:
        introspection requests carry credentials."""
        if self._session is None:
            raise RuntimeError("bearer verifier used before start() or after close()")
        where = str(URL(url).with_query(None))
        try:
            async with self._session.request(
                method,
                url,
                data=form,
                headers={"Accept": "application/json", **(headers or {})},
                allow_redirects=False,
            ) as resp:
                body = await read_capped(resp)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise IdPUnavailable(f"{where}: {reason(exc)}") from exc
        if status != 200:
            raise IdPUnavailable(f"{where} answered HTTP {status}")
        payload = json_object(body) if body is not None else None
        if payload is None:
            raise IdPUnavailable(f"{where} did not answer a JSON object")
        return payload


# --- key sources ---------------------------------------------------------------------------


class _KeySource:
    """Keys, audiences and algorithms of one issuer's tokens."""

    audiences: frozenset[str]
    algorithms: list[str]

    async def keys(self) -> KeySet:
        raise NotImplementedError

    async def newer_keys(self) -> KeySet | None:
        """After an unknown `kid`: a newer key set, or None if there is none (the kid is
        certainly unknown). `IdPUnavailable` when the issuer could not be asked."""
        raise NotImplementedError


class _ProviderKeys(_KeySource):
    """The provider's keys, which `OIDCClient` loads and refetches."""

    def __init__(self, provider: OIDCClient, audiences: Collection[str]) -> None:
        self._provider = provider
        self.audiences = frozenset(audiences)
        self.algorithms = sorted(ASYMMETRIC_ALGORITHMS)

    async def keys(self) -> KeySet:
        keys = self._provider.jwks.keys
        if keys is None:
            raise IdPUnavailable("provider signing keys not loaded yet")
        return keys

    async def newer_keys(self) -> KeySet | None:
        return self._provider.jwks.keys if await self._provider.jwks.refetch() else None


class _RemoteKeys(_KeySource):
    """Keys of a configured issuer: from `jwks_url`, or the `jwks_uri` of its discovery
    document (OpenID Connect Discovery 1.0 §4), fetched on first use and then kept."""

    def __init__(
        self,
        entry: BearerIssuer,
        get_json: Callable[[str], Awaitable[dict[str, Any]]],
    ) -> None:
        self.issuer = entry.issuer
        self.audiences = frozenset(entry.audiences)
        self.algorithms = list(entry.algorithms)
        self._jwks_url = entry.jwks_url
        self._get_json = get_json
        self._jwks = JWKSCache(self._fetch)
        self._lock = asyncio.Lock()
        self._retry_at = float("-inf")
        self._reachable = True  # did the last fetch yield a key set?

    async def keys(self) -> KeySet:
        keys = self._jwks.keys
        if keys is not None:
            return keys
        async with self._lock:
            if self._jwks.keys is not None:
                return self._jwks.keys
            if time.monotonic() < self._retry_at:
                raise IdPUnavailable(f"keys of {self.issuer} are unavailable")
            try:
                keys = await self._jwks.load()
            except (IdPUnavailable, ValueError, JoseError) as exc:
                self._retry_at = time.monotonic() + _LOAD_RETRY
                detail = f"keys of {self.issuer}: {reason(exc)}"
                log.warning("bearer issuer keys failed to load", extra={"error": detail})
                raise IdPUnavailable(detail) from exc
            self._reachable = True
            return keys

    async def newer_keys(self) -> KeySet | None:
        if await self._jwks.refetch():
            self._reachable = True
            return self._jwks.keys
        if not self._reachable:
            raise IdPUnavailable(f"keys of {self.issuer} could not be refetched")
        return None

    async def _fetch(self) -> Any:
        self._reachable = False  # until the caller sees a new key set
        if self._jwks_url is None:
            document = await self._get_json(self.issuer + "/.well-known/openid-configuration")
            self._jwks_url = _jwks_uri(document, self.issuer)
        return await self._get_json(self._jwks_url)


# --- checks --------------------------------------------------------------------------------


def _jwt_parts(token: str) -> tuple[dict[str, Any], Any] | None:
    """The unverified header and payload of a compact JWS; None if it is not one (three
    base64url segments with a JSON object as header)."""
    if not _COMPACT.fullmatch(token):
        return None
    head, body, _ = token.split(".")
    header = _b64_json(head)
    if not isinstance(header, dict):
        return None
    payload = _b64_json(body)
    if payload is None:
        raise InvalidBearerToken("malformed token")
    return header, payload


def _b64_json(segment: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        return None


def _check_header(header: Mapping[str, Any], algorithms: Collection[str]) -> None:
    """Algorithm (never `none` or HMAC), explicit type (RFC 9068 §4), no critical extensions
    (RFC 7515 §4.1.11: we understand none)."""
    alg = header.get("alg")
    if alg not in ASYMMETRIC_ALGORITHMS or alg not in algorithms:
        raise InvalidBearerToken("algorithm not accepted")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYP):
        raise InvalidBearerToken("wrong token type")
    if "crit" in header:
        raise InvalidBearerToken("critical header extensions")
    if "kid" in header and not isinstance(header["kid"], str):
        raise InvalidBearerToken("malformed token")


async def _signed_claims(token: str, source: _KeySource) -> dict[str, Any]:
    """The claims, once the signature checks out against the issuer's keys; on an unknown
    `kid` (the issuer may have rotated), against a newer key set once."""
    algorithms = [a for a in source.algorithms if a in ASYMMETRIC_ALGORITHMS]
    keys = await source.keys()
    for attempt in range(2):
        try:
            return dict(jwt.decode(token, keys, algorithms=algorithms).claims)
        except InvalidKeyIdError:
            newer = None if attempt else await source.newer_keys()
            if newer is None:
                raise InvalidBearerToken("unknown signing key") from None
            keys = newer
        except _SIGNATURE_ERRORS:
            raise InvalidBearerToken("bad signature") from None
        except (JoseError, ValueError, RecursionError):
            raise InvalidBearerToken("malformed token") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _check_audience(claims: Mapping[str, Any], audiences: Collection[str]) -> None:
    """RFC 9068 §4: `aud` (a string or a list) names this resource server."""
    aud = claims.get("aud")
    values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not any(isinstance(a, str) and a in audiences for a in values):
        raise InvalidBearerToken("wrong audience")


def _check_times(claims: Mapping[str, Any], now: float) -> float | None:
    """`exp`, `nbf` and `iat` with `LEEWAY` of clock skew (RFC 7519 §4.1.4-6); the `exp`."""
    exp = _number(claims, "exp")
    if exp is not None and now > exp + LEEWAY:
        raise InvalidBearerToken("token expired")
    nbf = _number(claims, "nbf")
    if nbf is not None and now < nbf - LEEWAY:
        raise InvalidBearerToken("token not yet valid")
    iat = _number(claims, "iat")
    if iat is not None and iat > now + LEEWAY:
        raise InvalidBearerToken("token issued in the future")
    return exp


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim as a finite float, or None if absent; JSON `true`, NaN or a huge
    integer is refused."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidBearerToken(f"{name} is not a number")
    try:
        number = float(value)
    except OverflowError:
        raise InvalidBearerToken(f"{name} is out of range") from None
    if not math.isfinite(number):
        raise InvalidBearerToken(f"{name} is out of range")
    return number


def _check_access_token(claims: Mapping[str, Any]) -> None:
    """Refuse what is certainly another kind of token of the same issuer: an ID token
    (`at_hash`, OIDC Core §3.1.3.6) or a security event such as a logout token (`events`,
    RFC 8417 §2.2)."""
    if "at_hash" in claims or "events" in claims:
        raise InvalidBearerToken("not an access token")


def _subject(claims: Mapping[str, Any]) -> str:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise InvalidBearerToken("token has no subject")
    return sub


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """`scope` (a space-separated string, RFC 9068 §2.2.3, RFC 7662 §2.2) and `scp` (a list or
    a string, as some issuers send it)."""
    scopes: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            scopes.update(value.split())
        elif isinstance(value, list):
            scopes.update(s for s in value if isinstance(s, str) and s)
    return frozenset(scopes)


def _jwks_uri(document: Any, issuer: str) -> str:
    """`jwks_uri` of a discovery document of `issuer` (Discovery §4.3: the issuer must match),
    https (http only on loopback)."""
    if not isinstance(document, dict):
        raise IdPUnavailable(f"discovery of {issuer} is not a JSON object")
    if document.get("issuer") not in (issuer, issuer + "/"):
        raise IdPUnavailable(f"discovery of {issuer} names another issuer")
    value = document.get("jwks_uri")
    url = URL(value) if isinstance(value, str) else None
    if url is None or not url.host:
        raise IdPUnavailable(f"discovery of {issuer} has no usable jwks_uri")
    if url.scheme != "https" and not (url.scheme == "http" and url.host in _LOOPBACK):
        raise IdPUnavailable(f"discovery of {issuer}: jwks_uri must be https")
    return str(value)
