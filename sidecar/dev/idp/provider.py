"""The dev OpenID provider: state on a `DevIdP` instance, endpoints in one aiohttp app.

Endpoints (under the issuer URL, which may carry a path):

    /.well-known/openid-configuration   OIDC Discovery 1.0 §4
    /jwks                                RFC 7517 §5
    /authorize                           RFC 6749 §4.1.1, RFC 7636, OIDC Core §3.1.2, RFC 9207
    /token                               RFC 6749 §4.1.3 and §6, RFC 9700 §4.14.2
    /userinfo                            OIDC Core §5.3, RFC 6750
    /revoke                              RFC 7009
    /end_session                         OIDC RP-Initiated Logout 1.0

Not for production: it keeps everything in memory and logs a warning saying so.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal
from urllib.parse import urlencode

from aiohttp import web
from joserfc.errors import JoseError
from joserfc.jwt import JWTClaimsRegistry
from yarl import URL

from sidecar.dev.idp.authorize import (
    SCOPES_SUPPORTED,
    AuthorizationRequest,
    validate_request,
    validate_target,
)
from sidecar.dev.idp.clientauth import AUTH_METHODS, BASIC_CHALLENGE, authenticate_client
from sidecar.dev.idp.errors import (
    AccessDenied,
    BadAuthorizationTarget,
    CodeReplayed,
    InsufficientScope,
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidToken,
    LoginRequired,
    OAuthError,
    RefreshTokenReused,
    TemporarilyUnavailable,
    UnsupportedGrantType,
)
from sidecar.dev.idp.grants import GrantFamily, GrantStore, IdPSession, opaque_key
from sidecar.dev.idp.keys import ALGORITHM, SigningKeys
from sidecar.dev.idp.models import DevClient, DevIdPStats, DevUser, default_users
from sidecar.dev.idp.pages import error_page, logged_out_page, login_page
from sidecar.dev.idp.tokens import (
    ACCESS_TOKEN_TYP,
    LOGOUT_TOKEN_TYP,
    entra_graph_issuer,
    id_token_claims,
    logout_token_claims,
    shaped_access_token_claims,
    userinfo_claims,
)

__all__ = ["DevIdP", "GarbageKind"]

log = logging.getLogger(__name__)

SESSION_COOKIE: Final = "devidp_session"
FORM: Final = "application/x-www-form-urlencoded"
# RFC 7636 §4.1: 43-128 characters of the unreserved set.
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1
_CLAIMS_SUPPORTED = (
    *("sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "sid", "at_hash", "azp"),
    *("email", "email_verified", "name", "preferred_username", "groups"),
)

Params = dict[str, list[str]]
GarbageKind = Literal["html", "truncated_json"]


class _MissingToken(InvalidToken):
    """RFC 6750 §3.1: no credentials at all, answered without an error code."""


class DevIdP:
    """An in-memory OpenID provider that behaves like a strict production one.

    Refresh tokens are issued on every code exchange, whether or not `offline_access` was
    requested (as Keycloak does); each refresh rotates them (RFC 9700 §4.14.2) with no grace
    period, so presenting a used one revokes the whole grant. A client's `shape` changes
    that, and the tokens' layout, to another provider's (models.py). `revocation=False`
    leaves the revocation endpoint out of discovery and answers 404 there (Entra ID has none).
    """

    def __init__(
        self,
        issuer: str,
        *,
        clients: Mapping[str, DevClient] | None = None,
        users: Sequence[DevUser] | None = None,
        access_token_ttl: float = 60.0,
        refresh_token_ttl: float = 3600.0,
        clock: Callable[[], float] = time.time,
        revocation: bool = True,
    ) -> None:
        url = URL(issuer)
        # OIDC Discovery §3: https (http for loopback dev use), no query, no fragment.
        if url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
            raise ValueError(f"issuer must be an http(s) URL without query or fragment: {issuer}")
        self.issuer = issuer
        self._base = issuer.rstrip("/")
        self._path = url.path.rstrip("/")
        self._secure_cookie = url.scheme == "https"
        self._clients: dict[str, DevClient] = {}
        for client_id, client in (clients or {}).items():
            if client_id != client.client_id:
                raise ValueError(f"clients[{client_id!r}] has client_id {client.client_id!r}")
            self.register_client(client)
        self.users: dict[str, DevUser] = {
            u.sub: u for u in (default_users() if users is None else users)
        }
        self.access_token_ttl = access_token_ttl
        self.refresh_token_ttl = refresh_token_ttl
        self.revocation = revocation
        self.token_endpoint_delay = 0.0
        self.token_endpoint_failures = 0
        # The next N answers are unparsable 200s: "html", a proxy's page in place of the
        # request (no grant), or "truncated_json", the real answer cut (the grant took
        # effect). The client cannot tell which, so it must not retry either.
        self.token_endpoint_garbage = 0
        self.token_endpoint_garbage_kind: GarbageKind = "html"  # noqa: S105 - a body kind
        self.stats = DevIdPStats()
        self._clock = clock
        self._keys = SigningKeys()
        self._grants = GrantStore(clock)
        log.warning("dev IdP: for development and tests only", extra={"issuer": issuer})

    # --- administration -----------------------------------------------------------------

    def register_client(self, client: DevClient) -> None:
        """Add or replace a client registration."""
        self._clients[client.client_id] = client

    @property
    def clients(self) -> Mapping[str, DevClient]:
        """The registered clients (read-only view)."""
        return dict(self._clients)

    @property
    def current_kid(self) -> str:
        """The kid that signs new tokens."""
        return self._keys.current_kid

    def rotate_signing_key(self) -> str:
        """A new RSA key becomes the signer; old kids stay in the JWKS. Returns the new kid."""
        kid = self._keys.rotate()
        log.info("dev IdP signing key rotated", extra={"kid": kid})
        return kid

    def retire_signing_key(self, kid: str) -> None:
        """Remove an old key from the JWKS; tokens it signed no longer verify."""
        self._keys.retire(kid)

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set, as /jwks serves it."""
        return self._keys.jwks()

    def revoke_user_grants(self, sub: str) -> None:
        """Admin revocation: every grant of `sub` (refresh and access tokens) and every IdP
        session of `sub` end, so the next login shows the user picker again."""
        self._grants.end_sessions_of(sub)
        log.info("dev IdP revoked all grants of a user", extra={"sub": sub})

    def backchannel_logout_token(
        self, client_id: str, *, sub: str | None = None, sid: str | None = None
    ) -> str:
        """A signed Back-Channel Logout 1.0 §2.4 logout token; the caller delivers it."""
        claims = logout_token_claims(
            issuer=self.issuer,
            client_id=client_id,
            sub=sub,
            sid=sid,
            jti=secrets.token_urlsafe(16),
            now=int(self._clock()),
        )
        return self._keys.sign(claims, typ=LOGOUT_TOKEN_TYP)

    def endpoint(self, name: str) -> str:
        """The absolute URL of an endpoint, e.g. `endpoint("token")`."""
        return f"{self._base}/{name}"

    # --- the application ----------------------------------------------------------------

    def app(self) -> web.Application:
        """An aiohttp application serving every endpoint under the issuer's path."""
        app = web.Application()
        p = self._path
        app.router.add_get(p + "/.well-known/openid-configuration", self._discovery)
        app.router.add_get(p + "/jwks", self._jwks)
        app.router.add_route("GET", p + "/authorize", self._authorize)
        app.router.add_route("POST", p + "/authorize", self._authorize)
        app.router.add_post(p + "/token", self._token)
        app.router.add_route("GET", p + "/userinfo", self._userinfo)
        app.router.add_route("POST", p + "/userinfo", self._userinfo)
        app.router.add_post(p + "/revoke", self._revoke)
        app.router.add_route("GET", p + "/end_session", self._end_session)
        app.router.add_route("POST", p + "/end_session", self._end_session)
        return app

    async def _discovery(self, request: web.Request) -> web.Response:
        """OIDC Discovery 1.0 §3 metadata."""
        revocation: dict[str, Any] = {}
        if self.revocation:
            revocation = {
                "revocation_endpoint": self.endpoint("revoke"),
                "revocation_endpoint_auth_methods_supported": list(AUTH_METHODS),
            }
        return web.json_response(
            {
                "issuer": self.issuer,
                "authorization_endpoint": self.endpoint("authorize"),
                "token_endpoint": self.endpoint("token"),
                "userinfo_endpoint": self.endpoint("userinfo"),
                "jwks_uri": self.endpoint("jwks"),
                **revocation,
                "end_session_endpoint": self.endpoint("end_session"),
                "response_types_supported": ["code"],
                "response_modes_supported": ["query"],
                "grant_types_supported": ["authorization_code", "refresh_token"],
                "subject_types_supported": ["public"],
                "code_challenge_methods_supported": ["S256"],
                "id_token_signing_alg_values_supported": [ALGORITHM],
                "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
                "scopes_supported": list(SCOPES_SUPPORTED),
                "claims_supported": list(_CLAIMS_SUPPORTED),
                "prompt_values_supported": ["none", "login", "consent", "select_account"],
                "authorization_response_iss_parameter_supported": True,  # RFC 9207 §3
                "frontchannel_logout_supported": False,
                "backchannel_logout_supported": False,
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        """RFC 7517 §5: every key that still verifies."""
        return web.json_response(self._keys.jwks())

    # --- /authorize ---------------------------------------------------------------------

    async def _authorize(self, request: web.Request) -> web.Response:
        """RFC 6749 §4.1.1/§4.1.2; OIDC Core §3.1.2.1 allows both GET and form POST."""
        try:
            params = await _params(request)
            client, redirect_uri = validate_target(params, self._clients)
        except (BadAuthorizationTarget, InvalidRequest) as exc:
            return _html(error_page(str(exc)), status=400)
        states = params.get("state", [])
        state = states[0] if len(states) == 1 else None
        try:
            auth = validate_request(params, client, redirect_uri)
            if request.method == "POST" and "deny" in params:
                raise AccessDenied("the user denied access")
            session, cookie = self._authenticate(request, params, auth)
        except OAuthError as exc:
            log.info(
                "authorization refused", extra={"error": exc.error, "client": client.client_id}
            )
            return self._redirect(redirect_uri, {**exc.as_dict(), "state": state})
        if session is None:
            page = login_page(
                self.endpoint("authorize"), params, list(self.users.values()), client.client_id
            )
            return _html(page)
        code = self._grants.issue_code(
            client_id=client.client_id,
            redirect_uri=redirect_uri,
            code_challenge=auth.code_challenge,
            scope=auth.scope,
            nonce=auth.nonce,
            session=session,
            offline=self._offline(client, auth, session.sub),
        )
        self.stats.authorizations += 1
        log.info(
            "authorization code issued", extra={"client": client.client_id, "sub": session.sub}
        )
        response = self._redirect(redirect_uri, {"code": code, "state": state})
        if cookie is not None:
            response.set_cookie(
                SESSION_COOKIE,
                cookie,
                path=self._path or "/",
                httponly=True,
                samesite="Lax",
                secure=self._secure_cookie,
            )
        return response

    def _offline(self, client: DevClient, auth: AuthorizationRequest, sub: str) -> bool:
        """Whether the grant gets refresh tokens, as the client's shape's provider decides."""
        if client.shape in ("okta", "entra"):
            return "offline_access" in auth.scope.split()
        if client.shape == "google":
            # Offline access when asked for; on a later login only with a new consent.
            if auth.access_type != "offline":
                return False
            consents = self._grants.offline_consents
            key = (client.client_id, sub)
            if key in consents and "consent" not in auth.prompt:
                return False
            consents.add(key)
        return True

    def _authenticate(
        self, request: web.Request, params: Params, auth: AuthorizationRequest
    ) -> tuple[IdPSession | None, str | None]:
        """Who approves: the POSTed `user`, a `login_hint`, or the browser's IdP session
        (single sign-on, unless prompt=login/select_account). (None, None) = show the picker."""
        chosen = params.get("user", []) if request.method == "POST" else []
        existing = self._grants.session_for_cookie(request.cookies.get(SESSION_COOKIE))
        fresh_login = bool(auth.prompt & {"login", "select_account"})
        if chosen or auth.login_hint is not None:
            sub = chosen[0] if chosen else auth.login_hint
            if len(chosen) > 1 or sub not in self.users:
                raise AccessDenied("unknown user")
            if existing is not None and existing.sub == sub and not fresh_login:
                return existing, None
            return self._grants.start_session(sub)
        if existing is not None and not fresh_login:
            return existing, None
        if "none" in auth.prompt:
            raise LoginRequired("no session at the IdP")  # OIDC Core §3.1.2.6
        return None, None

    def _redirect(self, uri: str, params: Mapping[str, str | None]) -> web.Response:
        """302 to a registered URI, keeping its query (RFC 6749 §3.1.2), adding iss (RFC 9207)."""
        query = {k: v for k, v in params.items() if v is not None}
        query["iss"] = self.issuer
        location = uri + ("&" if "?" in uri else "?") + urlencode(query)
        return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})

    # --- /token -------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        """RFC 6749 §3.2; the answer is delayed by `token_endpoint_delay` after the grant took
        effect, so a client that gives up meanwhile loses a rotation, as with a real IdP."""
        self.stats.token_requests += 1
        if self.token_endpoint_failures > 0:
            self.token_endpoint_failures -= 1
            await self._delay()
            error = TemporarilyUnavailable("simulated outage")
            return web.json_response(
                error.as_dict(), status=503, headers={**_NO_STORE, "Retry-After": "1"}
            )
        intercepted = self.token_endpoint_garbage_kind == "html"  # noqa: S105 - a body kind
        if self.token_endpoint_garbage > 0 and intercepted:
            self.token_endpoint_garbage -= 1
            await self._delay()
            return _html("<html><body><h1>Service temporarily rerouted</h1></body></html>")
        try:
            form = await _form(request)
            client = authenticate_client(request.headers.get("Authorization"), form, self._clients)
            grant_type = _one(form, "grant_type")
            if grant_type == "authorization_code":
                body = self._code_grant(form, client)
            elif grant_type == "refresh_token":
                body = self._refresh_grant(form, client)
            elif grant_type is None:
                raise InvalidRequest("grant_type is required")
            else:
                raise UnsupportedGrantType(f"grant_type {grant_type} is not supported")
            response = web.json_response(body, headers=_NO_STORE)
        except OAuthError as exc:
            log.info("token request refused", extra={"error": exc.error})
            response = _error_json(exc, basic="Authorization" in request.headers)
        await self._delay()
        if self.token_endpoint_garbage > 0:
            self.token_endpoint_garbage -= 1
            return _truncated(response)
        return response

    async def _delay(self) -> None:
        if self.token_endpoint_delay > 0:
            await asyncio.sleep(self.token_endpoint_delay)

    def _code_grant(self, form: Params, client: DevClient) -> dict[str, Any]:
        """RFC 6749 §4.1.3 with RFC 7636 §4.6 (S256 only)."""
        code = _required(form, "code")
        redirect_uri = _required(form, "redirect_uri")
        verifier = _required(form, "code_verifier")
        if not _VERIFIER.fullmatch(verifier):
            raise InvalidRequest("malformed code_verifier")
        try:
            record = self._grants.redeem_code(code, client.client_id)
        except CodeReplayed:
            self.stats.code_replays += 1
            log.warning("authorization code replayed; its grant is revoked")
            raise
        if record.redirect_uri != redirect_uri:
            raise InvalidGrant("redirect_uri does not match the authorization request")
        if not hmac.compare_digest(_s256(verifier), record.code_challenge):
            raise InvalidGrant("PKCE verification failed")
        family = self._grants.start_family(record)
        self.stats.code_exchanges += 1
        return self._issue(client, family, family.scope, nonce=record.nonce)

    def _refresh_grant(self, form: Params, client: DevClient) -> dict[str, Any]:
        """RFC 6749 §6 with rotation and reuse detection (RFC 9700 §4.14.2)."""
        token = _required(form, "refresh_token")
        requested = _one(form, "scope")
        known = self._grants.family_of_refresh_token(token)
        scope = known.scope if known else ""
        if known is not None and requested is not None:
            if not set(requested.split()) <= set(known.scope.split()):
                raise InvalidScope("a refresh may only narrow the original scope")  # RFC 6749 §6
            scope = requested
        # Google and Entra ID keep a refresh token valid after use; the others rotate.
        rotate = client.shape not in ("google", "entra")
        try:
            family = self._grants.use_refresh_token(token, client.client_id, rotate=rotate)
        except RefreshTokenReused:
            self.stats.reuse_detected += 1
            log.warning(
                "refresh token reuse detected; grant revoked",
                extra={"grant": known.id if known else None},
            )
            raise
        self.stats.refresh_grants += 1
        return self._issue(client, family, scope, nonce=None, refresh=True)

    def _issue(
        self,
        client: DevClient,
        family: GrantFamily,
        scope: str,
        *,
        nonce: str | None,
        refresh: bool = False,
    ) -> dict[str, Any]:
        """RFC 6749 §5.1 response with an access token (RFC 9068, or opaque for the google
        shape) and an OIDC ID token; the refresh token and its lifetime as the shape has it."""
        user = self.users.get(family.sub)
        if user is None:
            raise InvalidGrant("the user no longer exists")
        shape = client.shape
        now = int(self._clock())
        ttl = max(1, int(self.access_token_ttl))
        if shape == "google":
            access_token = self._grants.issue_opaque_access_token(family, now + ttl, scope)
        else:
            jti = secrets.token_urlsafe(16)
            access_token = self._keys.sign(
                shaped_access_token_claims(
                    shape=shape,
                    issuer=self.issuer,
                    user=user,
                    client_id=family.client_id,
                    scope=scope,
                    sid=family.sid,
                    jti=jti,
                    now=now,
                    ttl=ttl,
                    auth_time=family.auth_time,
                ),
                typ=ACCESS_TOKEN_TYP,
            )
            self._grants.record_access_token(
                jti, family, now + ttl, None if shape == "default" else scope
            )
        id_token = self._keys.sign(
            id_token_claims(
                issuer=self.issuer,
                user=user,
                client_id=family.client_id,
                scopes=frozenset(scope.split()),
                sid=family.sid,
                auth_time=family.auth_time,
                nonce=nonce,
                access_token=access_token,
                now=now,
                ttl=ttl,
                shape=shape,
                group_overage=client.group_overage,
            )
        )
        body: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": ttl,
            "id_token": id_token,
            "scope": scope,
        }
        # Google answers a refresh without a refresh token: the one presented stays valid.
        if family.offline and not (refresh and shape == "google"):
            body["refresh_token"] = self._grants.issue_refresh_token(family, self.refresh_token_ttl)
            if shape in ("default", "keycloak"):
                body["refresh_expires_in"] = int(self.refresh_token_ttl)
        return body

    # --- /userinfo ----------------------------------------------------------------------

    async def _userinfo(self, request: web.Request) -> web.Response:
        """OIDC Core §5.3 behind an RFC 6750 bearer token."""
        self.stats.userinfo_calls += 1
        try:
            token = await _bearer_token(request)
            key = opaque_key(token)
            scope = self._grants.access_token_scope(key)
            if scope is None:  # not an opaque token of ours: a JWT, checked first
                claims = self._check_access_token(token)
                key = str(claims.get("jti"))
                scope = self._grants.access_token_scope(key) or str(claims.get("scope", ""))
            family = self._grants.access_token_family(key)
            if family is None:
                raise InvalidToken("access token revoked or expired")
            scopes = frozenset(scope.split())
            if "openid" not in scopes:
                raise InsufficientScope("the openid scope is required")
            user = self.users.get(family.sub)
            if user is None:
                raise InvalidToken("the user no longer exists")
            client = self._clients.get(family.client_id)
            shape = "default" if client is None else client.shape
        except OAuthError as exc:
            challenge = 'Bearer realm="devidp"'
            if not isinstance(exc, _MissingToken):
                description = exc.description.replace('"', "'")
                challenge += f', error="{exc.error}", error_description="{description}"'
            body = {} if isinstance(exc, _MissingToken) else exc.as_dict()
            return web.json_response(
                body, status=exc.status, headers={**_NO_STORE, "WWW-Authenticate": challenge}
            )
        return web.json_response(userinfo_claims(user, scopes, shape), headers=_NO_STORE)

    def _check_access_token(self, token: str) -> dict[str, Any]:
        """Signature against the JWKS, RFC 9068 typ, issuer and expiry from the clock."""
        try:
            decoded = self._keys.verify(token)
        except (JoseError, ValueError) as exc:
            raise InvalidToken("access token is not valid") from exc
        if decoded.header.get("typ") != ACCESS_TOKEN_TYP:
            raise InvalidToken("not an access token")
        registry = JWTClaimsRegistry(
            now=lambda: int(self._clock()),
            # The entra shape's tokens are Graph's, of another issuer (signed here all the same).
            iss={"essential": True, "values": [self.issuer, entra_graph_issuer()]},
            exp={"essential": True},
            jti={"essential": True},
        )
        try:
            registry.validate(decoded.claims)
        except JoseError as exc:
            raise InvalidToken("access token expired or not valid") from exc
        if self._clock() >= decoded.claims["exp"]:
            raise InvalidToken("access token expired")
        return decoded.claims

    # --- /revoke ------------------------------------------------------------------------

    async def _revoke(self, request: web.Request) -> web.Response:
        """RFC 7009 §2: a refresh token takes its whole grant with it; unknown tokens, and
        tokens of other clients, are answered 200 and left alone (§2.2)."""
        if not self.revocation:
            raise web.HTTPNotFound()
        try:
            form = await _form(request)
            client = authenticate_client(request.headers.get("Authorization"), form, self._clients)
            token = _required(form, "token")
        except OAuthError as exc:
            return _error_json(exc, basic="Authorization" in request.headers)
        # token_type_hint is only a hint (§2.1): both kinds are looked up either way.
        if self._revoke_token(token, client):
            self.stats.revocations += 1
            log.info("token revoked", extra={"client": client.client_id})
        return web.Response(status=200, headers=_NO_STORE)

    def _revoke_token(self, token: str, client: DevClient) -> bool:
        family = self._grants.family_of_refresh_token(token)
        if family is not None:
            if family.client_id != client.client_id:
                return False
            self._grants.revoke_family(family)
            return True
        if self._grants.access_token_scope(opaque_key(token)) is not None:
            return self._grants.revoke_access_token(opaque_key(token), client.client_id)
        try:
            decoded = self._keys.verify(token)
        except (JoseError, ValueError):
            return False
        return self._grants.revoke_access_token(str(decoded.claims.get("jti")), client.client_id)

    # --- /end_session -------------------------------------------------------------------

    async def _end_session(self, request: web.Request) -> web.Response:
        """OIDC RP-Initiated Logout 1.0 §2-§3: end the IdP session (and the grants made in it),
        then redirect to a registered post_logout_redirect_uri or show a page. No
        confirmation prompt is shown."""
        try:
            params = await _params(request)
            hint = _one(params, "id_token_hint")
            client_id = _one(params, "client_id")
            target = _one(params, "post_logout_redirect_uri")
            state = _one(params, "state")
            client, sid = self._logout_client(hint, client_id)
        except (OAuthError, BadAuthorizationTarget) as exc:
            return _html(error_page(str(exc)), status=400)
        if target is not None and (
            client is None or target not in client.post_logout_redirect_uris
        ):
            return _html(error_page("post_logout_redirect_uri is not registered"), status=400)
        browser = self._grants.session_for_cookie(request.cookies.get(SESSION_COOKIE))
        for ended in {s for s in (sid, browser.sid if browser else None) if s is not None}:
            self._grants.end_session(ended)
        self.stats.logouts += 1
        log.info("dev IdP session ended")
        if target is not None:
            query = urlencode({"state": state} if state is not None else {})
            location = target + (("&" if "?" in target else "?") + query if query else "")
            response = web.Response(status=302, headers={"Location": location})
        else:
            response = _html(logged_out_page())
        response.del_cookie(SESSION_COOKIE, path=self._path or "/")
        return response

    def _logout_client(
        self, hint: str | None, client_id: str | None
    ) -> tuple[DevClient | None, str | None]:
        """RP-Initiated Logout §2: the client named by client_id and/or the id_token_hint's
        aud (which must agree), and the sid the hint carries. An expired hint is fine."""
        client = None
        if client_id is not None:
            client = self._clients.get(client_id)
            if client is None:
                raise BadAuthorizationTarget("unknown client_id")
        if hint is None:
            return client, None
        try:
            claims = self._keys.verify(hint).claims
        except (JoseError, ValueError) as exc:
            raise BadAuthorizationTarget("id_token_hint is not a valid ID token") from exc
        if claims.get("iss") != self.issuer:
            raise BadAuthorizationTarget("id_token_hint was not issued here")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else list(aud or [])
        if client is None and len(audiences) == 1:
            client = self._clients.get(audiences[0])
        elif client is not None and client.client_id not in audiences:
            raise BadAuthorizationTarget("client_id does not match the id_token_hint")
        sid = claims.get("sid")
        return client, sid if isinstance(sid, str) else None


# --- request helpers --------------------------------------------------------------------


async def _params(request: web.Request) -> Params:
    """Query parameters of a GET, form fields of a POST, as lists per name."""
    if request.method == "POST":
        return await _form(request)
    params: Params = {}
    for key, value in request.query.items():
        params.setdefault(key, []).append(value)
    return params


async def _form(request: web.Request) -> Params:
    """RFC 6749 §3.2: parameters in an application/x-www-form-urlencoded body."""
    if request.content_type != FORM:
        raise InvalidRequest(f"expected {FORM}")
    params: Params = {}
    for key, value in (await request.post()).items():
        if isinstance(value, str):
            params.setdefault(key, []).append(value)
    return params


def _one(params: Params, name: str) -> str | None:
    values = params.get(name, [])
    if len(values) > 1:
        raise InvalidRequest(f"parameter {name} given more than once")  # RFC 6749 §3.2
    return values[0] if values else None


def _required(params: Params, name: str) -> str:
    value = _one(params, name)
    if not value:
        raise InvalidRequest(f"{name} is required")
    return value


async def _bearer_token(request: web.Request) -> str:
    """RFC 6750 §2.1 header or §2.2 form body, never both."""
    header = request.headers.get("Authorization")
    body = None
    if request.method == "POST" and request.content_type == FORM:
        body = _one(await _form(request), "access_token")
    if header is not None and body is not None:
        raise InvalidRequest("more than one way of sending the token")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidToken("malformed Authorization header")
        return token.strip()
    if body:
        return body
    raise _MissingToken("no access token")


def _s256(verifier: str) -> str:
    """RFC 7636 §4.2: BASE64URL(SHA256(ASCII(code_verifier)))."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _error_json(exc: OAuthError, *, basic: bool) -> web.Response:
    """RFC 6749 §5.2; a failed Basic authentication also gets its challenge back."""
    headers = dict(_NO_STORE)
    if isinstance(exc, InvalidClient) and basic:
        headers["WWW-Authenticate"] = BASIC_CHALLENGE
    return web.json_response(exc.as_dict(), status=exc.status, headers=headers)


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(
        text=text,
        status=status,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY"},
    )


def _truncated(response: web.Response) -> web.Response:
    """The real answer cut in half, still labelled JSON: a connection cut by a middlebox."""
    body = response.body if isinstance(response.body, bytes) else b"{}"
    return web.Response(
        body=body[: len(body) // 2], content_type="application/json", headers=_NO_STORE
    )
