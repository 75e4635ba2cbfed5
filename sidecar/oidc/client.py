"""The one thin HTTP client of the IdP: discovery, keys, token, revocation, logout URL.

`aiohttp.ClientError` never leaves this module: failures become `IdPUnavailable`
(maybe reached the IdP, maybe not) or `TokenRequestError` (the IdP said no).
Redirects are never followed: token requests carry credentials.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import quote

import aiohttp
from joserfc.jwk import KeySet
from pydantic import SecretStr
from yarl import URL

from sidecar.config import OIDCConfig
from sidecar.errors import IdPUnavailable, TokenRequestError, reason
from sidecar.health import Readiness
from sidecar.oidc.discovery import ProviderMetadata, parse_metadata
from sidecar.oidc.id_token import UnknownKeyId, validate_id_token
from sidecar.oidc.jwks import JWKSCache
from sidecar.oidc.logout_token import LogoutClaims, UnknownLogoutKey, validate_logout_token
from sidecar.oidc.tokens import UnknownAccessTokenKey, UnusableAccessToken, verify_access_token
from sidecar.telemetry import Tracing

__all__ = ["OIDCClient", "TokenResponse", "client_auth", "json_object", "read_capped"]

log = logging.getLogger("sidecar.oidc")

T = TypeVar("T")

_MAX_RESPONSE_BYTES: Final = 1 << 20  # an IdP answer larger than 1 MiB is garbage
_REVOKE_TIMEOUT: Final = 3.0  # logout never waits long on revocation (best effort)
_RETRY_MIN, _RETRY_MAX = 1.0, 30.0  # discovery retry backoff while the IdP is down at boot
# An RFC 6749 §5.2 error code as a span attribute; anything else the IdP says is "error".
_ERROR_CODE: Final = re.compile(r"[a-z_]{1,64}")


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """A successful token endpoint answer (RFC 6749 §5.1)."""

    access_token: str
    expires_in: float | None
    refresh_token: str | None
    refresh_expires_in: float | None
    id_token: str | None
    scope: str | None


class OIDCClient:
    """Talks to one OpenID provider; reports `idp` readiness once metadata and keys load."""

    def __init__(
        self,
        config: OIDCConfig,
        redirect_uri: str,
        timeout: float,
        readiness: Readiness,
        clock: Callable[[], float] = time.time,
        *,
        answer_within: float | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """`answer_within` (refresh.late_answer_timeout): how long a refresh grant's answer is
        waited for, past the IdP timeout its callers wait (docs/refresh.md step 5).
        `tracing`: each token request is an `idp.token` client span."""
        self.config = config
        self.redirect_uri = redirect_uri
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._readiness = readiness
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._metadata: ProviderMetadata | None = None
        self._answer_within = answer_within
        self._tracing = tracing
        self.jwks = JWKSCache(self._fetch_jwks)
        readiness.register("idp")

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar()
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def metadata(self) -> ProviderMetadata:
        if self._metadata is None:
            raise IdPUnavailable("provider metadata not loaded yet")
        return self._metadata

    async def discover_forever(self) -> None:
        """Load metadata and keys, retrying with backoff until both succeed (docs/operations.md)."""
        delay = _RETRY_MIN
        while True:
            try:
                document = await self._get_json(
                    self.config.issuer + "/.well-known/openid-configuration"
                )
                self._metadata = parse_metadata(document, self.config.issuer)
                await self.jwks.load()
            except Exception as exc:  # whatever went wrong, boot must keep retrying
                detail = f"discovery of {self.config.issuer} failed: {reason(exc)}"
                self._readiness.report("idp", False, detail)
                log.warning("IdP discovery failed; retrying", extra={"error": detail})
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                continue
            self._readiness.report("idp", True, "metadata and keys loaded")
            log.info("IdP metadata loaded", extra={"issuer": self.config.issuer})
            return

    def authorization_url(self, *, state: str, nonce: str, code_challenge: str) -> str:
        """The authorization request (OIDC Core §3.1.2.1) with PKCE S256."""
        params = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": " ".join(self.config.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
            **self.config.extra_auth_params,
        }
        return str(URL(self.metadata.authorization_endpoint).update_query(params))

    async def exchange_code(self, code: str, code_verifier: str) -> TokenResponse:
        """Authorization code grant (RFC 6749 §4.1.3, RFC 7636 §4.5)."""
        return await self._token_request(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.redirect_uri,
                "code_verifier": code_verifier,
            }
        )

    async def refresh(self, refresh_token: str) -> TokenResponse:
        """Refresh grant (RFC 6749 §6), sent once: with rotation it is not idempotent.

        Only a request that certainly never left is tried a second time (docs/refresh.md step 5).
        `answer_within` bounds the answer (default: the IdP timeout); connecting stays
        bounded by the IdP timeout, so an unreachable IdP is still told apart (never sent).
        """
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        limit = None
        if self._answer_within is not None:
            limit = aiohttp.ClientTimeout(total=self._answer_within, connect=self._timeout.total)
        try:
            return await self._token_request(form, limit)
        except IdPUnavailable as exc:
            if exc.maybe_sent:
                raise
            return await self._token_request(form, limit)

    async def validate_id_token(
        self,
        token: str,
        *,
        nonce: str | None = None,
        access_token: str | None = None,
        expect_subject: str | None = None,
    ) -> dict[str, Any]:
        """Validate against the cached keys; on an unknown `kid`, refetch once and retry."""
        return await self._with_keys(
            lambda keys: validate_id_token(
                token,
                keys,
                issuer=self.metadata.issuer,
                client_id=self.config.client_id,
                now=self._clock(),
                algorithms=self.metadata.id_token_signing_alg_values_supported,
                nonce=nonce,
                access_token=access_token,
                expect_subject=expect_subject,
            ),
            UnknownKeyId,
        )

    async def validate_logout_token(self, token: str) -> LogoutClaims:
        """Validate a back-channel logout token (Back-Channel Logout 1.0 §2.6) against the
        cached keys; on an unknown `kid`, refetch once and retry, as for ID tokens."""
        return await self._with_keys(
            lambda keys: validate_logout_token(
                token,
                keys,
                issuer=self.metadata.issuer,
                client_id=self.config.client_id,
                now=self._clock(),
                algorithms=self.metadata.id_token_signing_alg_values_supported,
            ),
            UnknownLogoutKey,
        )

    async def access_token_claims(
        self, token: str, *, stored: bool = False
    ) -> dict[str, Any] | None:
        """The claims of an access token that is the provider's own JWT: signed with its keys
        (an unknown `kid` refetches them once, as for ID tokens), `iss` its issuer, not
        expired. None for anything else (opaque, another issuer, bad signature, no keys):
        such a token simply adds no claims, it is never an error. No audience check
        (`verify_access_token`).

        `stored`: a token a session already holds, verified when it came: its expiry is not
        checked and the key set is not refetched for it.
        """
        try:
            issuer = self.metadata.issuer
            if stored:
                keys = self.jwks.keys
                if keys is None:
                    return None
                return verify_access_token(
                    token, keys, issuer=issuer, now=self._clock(), check_expiry=False
                )
            return await self._with_keys(
                lambda keys: verify_access_token(token, keys, issuer=issuer, now=self._clock()),
                UnknownAccessTokenKey,
            )
        except (UnusableAccessToken, IdPUnavailable):
            return None

    async def _with_keys(self, check: Callable[[KeySet], T], unknown: type[Exception]) -> T:
        """`check` against the cached signing keys; when it raises `unknown` (a `kid` not in
        the set: the IdP may have rotated), fetch the JWKS once more and try again."""
        for attempt in range(2):
            keys = self.jwks.keys
            if keys is None:
                raise IdPUnavailable("IdP signing keys not loaded yet")
            try:
                return check(keys)
            except unknown:
                if attempt or not await self.jwks.refetch():
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def userinfo(self, access_token: str) -> dict[str, Any] | None:
        """Claims from the UserInfo endpoint (OIDC Core §5.3), or None if it has none or fails.

        IdPs may put scope claims (email, profile) only here and not in the ID token (§5.4).
        """
        endpoint = self._metadata.userinfo_endpoint if self._metadata else None
        if endpoint is None:
            return None
        try:
            async with self.session.get(
                endpoint,
                headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
                allow_redirects=False,
            ) as resp:
                body = await read_capped(resp)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            log.warning("userinfo request failed")
            return None
        claims = json_object(body) if status == 200 and body is not None else None
        if claims is None:
            log.warning("userinfo answered unusably", extra={"status": status})
        return claims

    async def revoke(self, token: str, hint: str = "refresh_token") -> bool:
        """RFC 7009 revocation; best effort with a short timeout. True if the IdP said 200."""
        endpoint = self._metadata.revocation_endpoint if self._metadata else None
        if endpoint is None:
            return False
        data, auth_headers = self._client_auth({"token": token, "token_type_hint": hint})
        try:
            async with self.session.post(
                endpoint,
                data=data,
                headers=auth_headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=_REVOKE_TIMEOUT),
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            log.warning("token revocation failed")
            return False

    def end_session_url(self, id_token_hint: str | None) -> str | None:
        """RP-Initiated Logout 1.0 §2, or None if the IdP has no end_session_endpoint."""
        endpoint = self._metadata.end_session_endpoint if self._metadata else None
        if endpoint is None:
            return None
        params = {"client_id": self.config.client_id}
        if id_token_hint:
            params["id_token_hint"] = id_token_hint
        if self.config.post_logout_redirect_url:
            params["post_logout_redirect_uri"] = self.config.post_logout_redirect_url
        return str(URL(endpoint).update_query(params))

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("OIDC client used before start() or after close()")
        return self._session

    def _client_auth(self, form: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        return client_auth(
            form,
            self.config.client_id,
            self.config.client_secret,
            post=self.config.token_endpoint_auth_method == "client_secret_post",  # noqa: S105
        )

    async def _token_request(
        self, form: dict[str, str], limit: aiohttp.ClientTimeout | None = None
    ) -> TokenResponse:
        if self._tracing is None:
            return await self._post_token(form, limit)
        endpoint = URL(self.metadata.token_endpoint)
        attributes: dict[str, str | int] = {
            "http.request.method": "POST",
            "server.address": endpoint.raw_host or "",
            "server.port": endpoint.port or 443,
            "url.path": endpoint.path,
            "sidecar.grant_type": form["grant_type"],
        }
        with self._tracing.span("idp.token", kind="client", attributes=attributes) as span:
            try:
                tokens = await self._post_token(form, limit)
            except TokenRequestError as exc:
                code = exc.error if _ERROR_CODE.fullmatch(exc.error) else "error"
                span.set("sidecar.idp.outcome", code)
                raise
            except IdPUnavailable as exc:
                span.set("sidecar.idp.outcome", "unavailable")
                span.set("sidecar.idp.maybe_sent", exc.maybe_sent)
                raise
            span.set("sidecar.idp.outcome", "ok")
            return tokens

    async def _post_token(
        self, form: dict[str, str], limit: aiohttp.ClientTimeout | None
    ) -> TokenResponse:
        data, auth_headers = self._client_auth(form)
        try:
            async with self.session.post(
                self.metadata.token_endpoint,
                data=data,
                headers={"Accept": "application/json", **auth_headers},
                allow_redirects=False,
                timeout=limit or self._timeout,
            ) as resp:
                body = await read_capped(resp)
                status = resp.status
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # Refused, DNS, TLS or connect timeout: nothing reached the token endpoint.
            raise IdPUnavailable(f"token endpoint: {type(exc).__name__}", maybe_sent=False) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise IdPUnavailable(f"token endpoint: {type(exc).__name__}") from exc
        payload = json_object(body) if body is not None else None
        if status == 200 and payload is not None:
            return _token_response(payload)
        if 400 <= status < 500 and payload is not None and isinstance(payload.get("error"), str):
            raise TokenRequestError(payload["error"], str(payload.get("error_description", "")))
        raise IdPUnavailable(f"token endpoint answered HTTP {status}")

    async def _get_json(self, url: str) -> Any:
        try:
            async with self.session.get(url, allow_redirects=False) as resp:
                body = await read_capped(resp)
                if resp.status != 200:
                    raise IdPUnavailable(f"{url} answered HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise IdPUnavailable(f"{url}: {reason(exc)}") from exc
        payload = json_object(body) if body is not None else None
        if payload is None:
            raise IdPUnavailable(f"{url} did not answer a JSON object")
        return payload

    async def _fetch_jwks(self) -> Any:
        return await self._get_json(self.metadata.jwks_uri)


def client_auth(
    form: dict[str, str], client_id: str, secret: SecretStr | None, *, post: bool = False
) -> tuple[dict[str, str], dict[str, str]]:
    """The form and headers of a client's request to the IdP: client_secret_basic (or, with
    `post`, client_secret_post) with a secret, else the client_id in the form."""
    if secret is None:
        return {**form, "client_id": client_id}, {}
    if post:
        return {**form, "client_id": client_id, "client_secret": secret.get_secret_value()}, {}
    # RFC 6749 §2.3.1: form-urlencode id and secret before Basic encoding.
    pair = f"{quote(client_id, safe='')}:{quote(secret.get_secret_value(), safe='')}"
    return form, {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


async def read_capped(resp: aiohttp.ClientResponse) -> bytes | None:
    """The whole body, or None past `_MAX_RESPONSE_BYTES` (an answer that large is garbage).
    `read(n)` alone returns what has arrived so far, which may be a part."""
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > _MAX_RESPONSE_BYTES:
            return None
    return bytes(body)


def json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _token_response(payload: Mapping[str, Any]) -> TokenResponse:
    access_token = payload.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise IdPUnavailable("token response without access_token")

    def number(name: str) -> float | None:
        value = payload.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            return None
        try:
            return float(value)
        except ValueError:
            return None

    def text(name: str) -> str | None:
        value = payload.get(name)
        return value if isinstance(value, str) and value else None

    return TokenResponse(
        access_token=access_token,
        expires_in=number("expires_in"),
        refresh_token=text("refresh_token"),
        refresh_expires_in=number("refresh_expires_in"),
        id_token=text("id_token"),
        scope=text("scope"),
    )
