"""The dev IdP over real HTTP: discovery, code + PKCE, rotation with reuse detection,
userinfo, revocation, logout, key rotation and the outage knobs."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from sidecar.dev.idp import DevClient, DevIdP, DevUser, default_users
from tests.support.ports import free_port

REDIRECT = "http://127.0.0.1:4180/oauth2/callback"
AFTER_LOGOUT = "http://127.0.0.1:4180/"
SECRET = "app-secret"


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Env:
    idp: DevIdP
    http: TestClient[Any, Any]
    clock: FakeClock

    def path(self, endpoint: str) -> str:
        return urlsplit(self.idp.endpoint(endpoint)).path


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def basic(client_id: str = "app", secret: str = SECRET) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


@pytest.fixture
async def env(aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]]) -> Env:
    """A DevIdP under an issuer with a path, a fake clock, and a test client (with cookies)."""
    port = free_port()
    clock = FakeClock()
    clients = {
        "app": DevClient("app", SECRET, (REDIRECT,), (AFTER_LOGOUT,)),
        "spa": DevClient("spa", None, ("http://127.0.0.1:3000/cb?x=1",)),
    }
    idp = DevIdP(
        f"http://127.0.0.1:{port}/realms/dev", clients=clients, access_token_ttl=60, clock=clock
    )
    http = await aiohttp_client(idp.app(), server_kwargs={"port": port})
    return Env(idp, http, clock)


def auth_params(verifier: str, **overrides: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": "app",
        "redirect_uri": REDIRECT,
        "scope": "openid email profile offline_access",
        "state": "st-1",
        "nonce": "n-1",
        "code_challenge": s256(verifier),
        "code_challenge_method": "S256",
        "login_hint": "alice",
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


async def authorize(env: Env, verifier: str, **overrides: str | None) -> dict[str, str]:
    """GET /authorize; returns the redirect's query parameters (asserting a 302)."""
    resp = await env.http.get(
        env.path("authorize"), params=auth_params(verifier, **overrides), allow_redirects=False
    )
    assert resp.status == 302, await resp.text()
    location = resp.headers["Location"]
    redirect = overrides.get("redirect_uri") or REDIRECT
    assert location.startswith(redirect)
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def code_form(code: str, verifier: str, redirect_uri: str = REDIRECT) -> dict[str, str]:
    """The authorization_code grant's form (RFC 6749 §4.1.3, with the PKCE verifier)."""
    return {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
    }


async def token(
    env: Env, form: dict[str, str], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    resp = await env.http.post(
        env.path("token"), data=form, headers=basic() if headers is None else headers
    )
    return resp.status, await resp.json()


async def login(env: Env, user: str = "alice", **overrides: str | None) -> dict[str, Any]:
    """The whole scripted login: authorize with login_hint, then exchange the code."""
    verifier = secrets.token_urlsafe(48)
    query = await authorize(env, verifier, login_hint=user, **overrides)
    status, body = await token(
        env,
        code_form(query["code"], verifier),
    )
    assert status == 200, body
    return body


async def refresh(env: Env, refresh_token: str) -> tuple[int, dict[str, Any]]:
    return await token(env, {"grant_type": "refresh_token", "refresh_token": refresh_token})


async def userinfo(env: Env, access_token: str) -> aiohttp.ClientResponse:
    return await env.http.get(
        env.path("userinfo"), headers={"Authorization": f"Bearer {access_token}"}
    )


def verify(env_jwks: Any, token_value: str) -> jwt.Token:
    return jwt.decode(token_value, KeySet.import_key_set(env_jwks), algorithms=["RS256"])


async def fetch_jwks(env: Env) -> dict[str, Any]:
    resp = await env.http.get(env.path("jwks"))
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


class TestDiscovery:
    async def test_discovery_document(self, env: Env) -> None:
        """The metadata names every endpoint under the issuer and the strict choices."""
        resp = await env.http.get("/realms/dev/.well-known/openid-configuration")
        doc = await resp.json()
        assert doc["issuer"] == env.idp.issuer
        for name in ("authorization", "token", "userinfo", "revocation", "end_session"):
            assert doc[f"{name}_endpoint"].startswith(env.idp.issuer + "/")
        assert doc["jwks_uri"] == env.idp.issuer + "/jwks"
        assert doc["response_types_supported"] == ["code"]
        assert doc["code_challenge_methods_supported"] == ["S256"]
        assert doc["id_token_signing_alg_values_supported"] == ["RS256"]
        assert set(doc["token_endpoint_auth_methods_supported"]) == {
            "client_secret_basic",
            "client_secret_post",
            "none",
        }
        assert {"authorization_code", "refresh_token"} <= set(doc["grant_types_supported"])
        assert "openid" in doc["scopes_supported"]
        assert "groups" in doc["claims_supported"]

    async def test_jwks_has_public_keys_only(self, env: Env) -> None:
        """The JWKS carries RS256 signing keys with kids and no private members."""
        (key,) = (await fetch_jwks(env))["keys"]
        assert key["kty"] == "RSA" and key["alg"] == "RS256" and key["use"] == "sig"
        assert key["kid"] == env.idp.current_kid
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key)

    def test_bad_registrations_refused(self) -> None:
        """An issuer with a query and a redirect URI with a fragment are refused."""
        with pytest.raises(ValueError):
            DevIdP("http://127.0.0.1:1/x?y=1")
        with pytest.raises(ValueError):
            DevClient("c", None, ("http://127.0.0.1/cb#frag",))

    def test_default_users(self) -> None:
        """alice is an admin, bob staff, carol in no group."""
        users = {u.sub: u for u in default_users()}
        assert users["alice"].groups == ("admins", "staff")
        assert users["bob"].groups == ("staff",)
        assert users["carol"].groups == ()


class TestAuthorize:
    async def test_code_flow_with_login_hint(self, env: Env) -> None:
        """login_hint approves at once; the code comes back with state and iss (RFC 9207)."""
        verifier = secrets.token_urlsafe(48)
        query = await authorize(env, verifier)
        assert query["state"] == "st-1"
        assert query["iss"] == env.idp.issuer
        status, body = await token(
            env,
            code_form(query["code"], verifier),
        )
        assert status == 200
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == 60
        assert body["refresh_expires_in"] == 3600
        assert body["refresh_token"] and body["id_token"]
        claims = verify(await fetch_jwks(env), body["access_token"]).claims
        assert claims["iss"] == env.idp.issuer
        assert claims["sub"] == "alice" and claims["aud"] == "app" and claims["client_id"] == "app"
        assert claims["exp"] == claims["iat"] + 60 == int(env.clock.now) + 60
        assert "offline_access" in claims["scope"] and claims["jti"]
        assert env.idp.stats.authorizations == 1
        assert env.idp.stats.code_exchanges == 1

    async def test_id_token_verifies_and_has_at_hash(self, env: Env) -> None:
        """The ID token verifies against the JWKS and its at_hash matches the access token."""
        body = await login(env)
        decoded = verify(await fetch_jwks(env), body["id_token"])
        assert decoded.header["kid"] == env.idp.current_kid
        claims = decoded.claims
        jwt.JWTClaimsRegistry(
            now=int(env.clock.now),
            iss={"essential": True, "value": env.idp.issuer},
            aud={"essential": True, "value": "app"},
            exp={"essential": True},
        ).validate(claims)
        digest = hashlib.sha256(body["access_token"].encode()).digest()
        assert claims["at_hash"] == base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()
        assert claims["nonce"] == "n-1"
        assert claims["auth_time"] == int(env.clock.now)
        assert claims["sid"]
        assert claims["email"] == "alice@example.com" and claims["name"] == "Alice Admin"
        assert claims["groups"] == ["admins", "staff"]

    async def test_login_page_then_form_post(self, env: Env) -> None:
        """Without a hint the user picker is shown; POSTing a user back yields a code."""
        verifier = secrets.token_urlsafe(48)
        params = auth_params(verifier, login_hint=None)
        resp = await env.http.get(env.path("authorize"), params=params, allow_redirects=False)
        assert resp.status == 200
        page = await resp.text()
        assert 'value="bob"' in page and "for development and tests only" in page
        resp = await env.http.post(
            env.path("authorize"), data={**params, "user": "bob"}, allow_redirects=False
        )
        assert resp.status == 302
        query = parse_qs(urlsplit(resp.headers["Location"]).query)
        assert query["state"] == ["st-1"] and query["code"]

    async def test_deny_redirects_access_denied(self, env: Env) -> None:
        """The picker's deny button answers access_denied to the client."""
        params = auth_params(secrets.token_urlsafe(48), login_hint=None)
        resp = await env.http.post(
            env.path("authorize"), data={**params, "deny": "1"}, allow_redirects=False
        )
        query = parse_qs(urlsplit(resp.headers["Location"]).query)
        assert query["error"] == ["access_denied"] and query["state"] == ["st-1"]

    @pytest.mark.parametrize(
        "override",
        [
            {"redirect_uri": "http://127.0.0.1:4180/oauth2/callback/evil"},
            {"redirect_uri": None},
            {"client_id": "nobody"},
        ],
    )
    async def test_bad_client_or_redirect_uri_never_redirects(
        self, env: Env, override: dict[str, str | None]
    ) -> None:
        """An unknown client or unregistered redirect_uri gives an error page, not a redirect."""
        params = auth_params(secrets.token_urlsafe(48), **override)
        resp = await env.http.get(env.path("authorize"), params=params, allow_redirects=False)
        assert resp.status == 400
        assert "Location" not in resp.headers
        assert resp.content_type == "text/html"

    @pytest.mark.parametrize(
        ("override", "error"),
        [
            ({"code_challenge": None}, "invalid_request"),
            ({"code_challenge_method": "plain"}, "invalid_request"),
            ({"code_challenge_method": None}, "invalid_request"),
            ({"response_type": "token"}, "unsupported_response_type"),
            ({"scope": "email"}, "invalid_scope"),
            ({"login_hint": "mallory"}, "access_denied"),
        ],
    )
    async def test_other_errors_redirect_with_state(
        self, env: Env, override: dict[str, str | None], error: str
    ) -> None:
        """Errors after the redirect target is trusted go back to the client (RFC 6749 §4.1.2.1)."""
        query = await authorize(env, secrets.token_urlsafe(48), **override)
        assert query["error"] == error
        assert query["state"] == "st-1"
        assert "code" not in query

    async def test_prompt_none_and_single_sign_on(self, env: Env) -> None:
        """prompt=none without an IdP session is login_required; with one it approves silently."""
        query = await authorize(env, secrets.token_urlsafe(48), login_hint=None, prompt="none")
        assert query["error"] == "login_required"
        await login(env, "bob")  # leaves an IdP session cookie in the client's jar
        query = await authorize(env, secrets.token_urlsafe(48), login_hint=None, prompt="none")
        assert "code" in query

    async def test_public_client_keeps_redirect_query(self, env: Env) -> None:
        """A public client authenticates with PKCE alone; its redirect URI's query is kept."""
        verifier = secrets.token_urlsafe(48)
        redirect = "http://127.0.0.1:3000/cb?x=1"
        query = await authorize(env, verifier, client_id="spa", redirect_uri=redirect)
        assert query["x"] == "1"
        status, body = await token(
            env,
            {**code_form(query["code"], verifier, redirect), "client_id": "spa"},
            headers={},
        )
        assert status == 200, body


class TestCodeExchange:
    async def test_wrong_verifier_rejected(self, env: Env) -> None:
        """A code_verifier that does not hash to the challenge is invalid_grant."""
        query = await authorize(env, secrets.token_urlsafe(48))
        status, body = await token(
            env,
            code_form(query["code"], secrets.token_urlsafe(48)),
        )
        assert (status, body["error"]) == (400, "invalid_grant")
        assert env.idp.stats.code_exchanges == 0

    async def test_redirect_uri_must_match(self, env: Env) -> None:
        """The token request must repeat the authorization request's redirect_uri."""
        verifier = secrets.token_urlsafe(48)
        query = await authorize(env, verifier)
        status, body = await token(
            env,
            code_form(query["code"], verifier, REDIRECT + "x"),
        )
        assert (status, body["error"]) == (400, "invalid_grant")

    async def test_code_replay_rejected_and_revokes_tokens(self, env: Env) -> None:
        """A code used twice is refused and the tokens from its first use are revoked."""
        verifier = secrets.token_urlsafe(48)
        query = await authorize(env, verifier)
        form = code_form(query["code"], verifier)
        status, first = await token(env, form)
        assert status == 200
        status, body = await token(env, form)
        assert (status, body["error"]) == (400, "invalid_grant")
        assert env.idp.stats.code_replays == 1
        status, body = await refresh(env, first["refresh_token"])
        assert (status, body["error"]) == (400, "invalid_grant")
        assert (await userinfo(env, first["access_token"])).status == 401

    async def test_code_expires_after_60_seconds(self, env: Env) -> None:
        """A code older than its 60 s lifetime is invalid_grant."""
        verifier = secrets.token_urlsafe(48)
        query = await authorize(env, verifier)
        env.clock.advance(61)
        status, body = await token(
            env,
            code_form(query["code"], verifier),
        )
        assert (status, body["error"]) == (400, "invalid_grant")

    async def test_unsupported_grant_type(self, env: Env) -> None:
        """Grants other than code and refresh_token are unsupported_grant_type."""
        status, body = await token(env, {"grant_type": "password"})
        assert (status, body["error"]) == (400, "unsupported_grant_type")


class TestRefresh:
    async def test_refresh_rotates(self, env: Env) -> None:
        """Each refresh returns a new refresh token and an ID token with the same sub and sid."""
        first = await login(env)
        env.clock.advance(30)
        status, second = await refresh(env, first["refresh_token"])
        assert status == 200
        assert second["refresh_token"] != first["refresh_token"]
        assert second["access_token"] != first["access_token"]
        jwks = await fetch_jwks(env)
        old, new = verify(jwks, first["id_token"]).claims, verify(jwks, second["id_token"]).claims
        assert (new["sub"], new["sid"], new["aud"]) == (old["sub"], old["sid"], old["aud"])
        assert new["auth_time"] == old["auth_time"] and new["iat"] == old["iat"] + 30
        assert "nonce" not in new
        assert env.idp.stats.refresh_grants == 1
        status, _ = await refresh(env, second["refresh_token"])
        assert status == 200 and env.idp.stats.refresh_grants == 2

    async def test_reuse_revokes_whole_family(self, env: Env) -> None:
        """Presenting a rotated refresh token is invalid_grant and kills the newest one too."""
        first = await login(env)
        _, second = await refresh(env, first["refresh_token"])
        status, body = await refresh(env, first["refresh_token"])
        assert (status, body["error"]) == (400, "invalid_grant")
        assert env.idp.stats.reuse_detected == 1
        status, body = await refresh(env, second["refresh_token"])
        assert (status, body["error"]) == (400, "invalid_grant")
        assert (await userinfo(env, second["access_token"])).status == 401

    async def test_other_families_survive_reuse(self, env: Env) -> None:
        """Reuse in one login's family leaves another login of the same user alone."""
        one, two = await login(env), await login(env)
        await refresh(env, one["refresh_token"])
        await refresh(env, one["refresh_token"])
        status, _ = await refresh(env, two["refresh_token"])
        assert status == 200

    async def test_refresh_token_bound_to_client(self, env: Env) -> None:
        """Another client cannot use the refresh token (RFC 6749 §6)."""
        first = await login(env)
        status, body = await token(
            env,
            {
                "grant_type": "refresh_token",
                "refresh_token": first["refresh_token"],
                "client_id": "spa",
            },
            headers={},
        )
        assert (status, body["error"]) == (400, "invalid_grant")
        assert (await refresh(env, first["refresh_token"]))[0] == 200

    async def test_refresh_token_expires(self, env: Env) -> None:
        """A refresh token older than refresh_token_ttl is invalid_grant."""
        first = await login(env)
        env.clock.advance(3601)
        status, body = await refresh(env, first["refresh_token"])
        assert (status, body["error"]) == (400, "invalid_grant")

    async def test_scope_can_only_narrow(self, env: Env) -> None:
        """A refresh may narrow the scope but not widen it."""
        first = await login(env, scope="openid email")
        status, body = await token(
            env,
            {
                "grant_type": "refresh_token",
                "refresh_token": first["refresh_token"],
                "scope": "openid profile",
            },
        )
        assert (status, body["error"]) == (400, "invalid_scope")
        status, body = await token(
            env,
            {
                "grant_type": "refresh_token",
                "refresh_token": first["refresh_token"],
                "scope": "openid",
            },
        )
        assert status == 200 and body["scope"] == "openid"


class TestUserinfo:
    async def test_valid_token(self, env: Env) -> None:
        """A fresh access token gets the user's claims, per scope."""
        body = await login(env, "bob")
        resp = await userinfo(env, body["access_token"])
        assert resp.status == 200
        claims = await resp.json()
        assert claims["sub"] == "bob" and claims["email"] == "bob@example.com"
        assert claims["groups"] == ["staff"]
        assert env.idp.stats.userinfo_calls == 1

    async def test_expired_token(self, env: Env) -> None:
        """Once the clock passes exp the token is refused with a Bearer challenge."""
        body = await login(env)
        env.clock.advance(60)
        resp = await userinfo(env, body["access_token"])
        assert resp.status == 401
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]

    async def test_revoked_token(self, env: Env) -> None:
        """An access token whose grant was revoked is refused."""
        body = await login(env)
        env.idp.revoke_user_grants("alice")
        assert (await userinfo(env, body["access_token"])).status == 401

    async def test_missing_and_forged_tokens(self, env: Env) -> None:
        """No token is a bare challenge; a token signed elsewhere is invalid_token."""
        resp = await env.http.get(env.path("userinfo"))
        assert resp.status == 401 and resp.headers["WWW-Authenticate"] == 'Bearer realm="devidp"'
        stranger = RSAKey.generate_key(2048, auto_kid=True)
        claims = {
            "iss": env.idp.issuer,
            "sub": "alice",
            "jti": "x",
            "exp": 2**31,
            "scope": "openid",
        }
        fake = jwt.encode({"alg": "RS256", "typ": "at+jwt"}, claims, stranger)
        resp = await userinfo(env, fake)
        assert resp.status == 401 and "invalid_token" in resp.headers["WWW-Authenticate"]


class TestRevocation:
    async def test_revoking_refresh_token_revokes_grant(self, env: Env) -> None:
        """RFC 7009: the refresh token and its access tokens stop working."""
        body = await login(env)
        resp = await env.http.post(
            env.path("revoke"),
            data={"token": body["refresh_token"], "token_type_hint": "refresh_token"},
            headers=basic(),
        )
        assert resp.status == 200
        assert env.idp.stats.revocations == 1
        status, err = await refresh(env, body["refresh_token"])
        assert (status, err["error"]) == (400, "invalid_grant")
        assert (await userinfo(env, body["access_token"])).status == 401

    async def test_revoking_access_token(self, env: Env) -> None:
        """Revoking an access token stops it at userinfo; the refresh token still works."""
        body = await login(env)
        resp = await env.http.post(
            env.path("revoke"), data={"token": body["access_token"]}, headers=basic()
        )
        assert resp.status == 200
        assert (await userinfo(env, body["access_token"])).status == 401
        assert (await refresh(env, body["refresh_token"]))[0] == 200

    async def test_unknown_token_is_200_and_auth_required(self, env: Env) -> None:
        """Unknown tokens are answered 200; a request without client auth is 401."""
        resp = await env.http.post(env.path("revoke"), data={"token": "nope"}, headers=basic())
        assert resp.status == 200 and env.idp.stats.revocations == 0
        resp = await env.http.post(env.path("revoke"), data={"token": "nope"})
        assert resp.status == 401 and (await resp.json())["error"] == "invalid_client"

    async def test_admin_revocation(self, env: Env) -> None:
        """revoke_user_grants ends every refresh token of that user only."""
        alice, bob = await login(env, "alice"), await login(env, "bob")
        env.idp.revoke_user_grants("alice")
        assert (await refresh(env, alice["refresh_token"]))[0] == 400
        assert (await refresh(env, bob["refresh_token"]))[0] == 200


class TestEndSession:
    async def test_redirects_and_ends_session(self, env: Env) -> None:
        """Logout redirects with state, ends single sign-on and the grants of that session."""
        body = await login(env)
        resp = await env.http.get(
            env.path("end_session"),
            params={
                "id_token_hint": body["id_token"],
                "post_logout_redirect_uri": AFTER_LOGOUT,
                "state": "bye",
            },
            allow_redirects=False,
        )
        assert resp.status == 302
        assert resp.headers["Location"] == AFTER_LOGOUT + "?state=bye"
        assert env.idp.stats.logouts == 1
        query = await authorize(env, secrets.token_urlsafe(48), login_hint=None, prompt="none")
        assert query["error"] == "login_required"
        assert (await refresh(env, body["refresh_token"]))[0] == 400

    async def test_without_redirect_shows_page(self, env: Env) -> None:
        """Without post_logout_redirect_uri the IdP shows its own signed-out page."""
        resp = await env.http.get(env.path("end_session"), params={"client_id": "app"})
        assert resp.status == 200 and "signed out" in (await resp.text()).lower()

    @pytest.mark.parametrize(
        "params",
        [
            {"client_id": "app", "post_logout_redirect_uri": "https://evil.example/"},
            {"post_logout_redirect_uri": AFTER_LOGOUT},
            {"client_id": "spa", "post_logout_redirect_uri": AFTER_LOGOUT},
            {"id_token_hint": "not-a-jwt", "post_logout_redirect_uri": AFTER_LOGOUT},
        ],
    )
    async def test_unregistered_redirect_refused(self, env: Env, params: dict[str, str]) -> None:
        """A post_logout_redirect_uri not registered for an identified client is never used."""
        resp = await env.http.get(env.path("end_session"), params=params, allow_redirects=False)
        assert resp.status == 400 and "Location" not in resp.headers
        assert env.idp.stats.logouts == 0


class TestKeys:
    async def test_key_rotation(self, env: Env) -> None:
        """A rotated key signs new tokens; the old kid stays published and still verifies."""
        old_kid = env.idp.current_kid
        before = await login(env)
        new_kid = env.idp.rotate_signing_key()
        assert new_kid != old_kid
        jwks = await fetch_jwks(env)
        assert {k["kid"] for k in jwks["keys"]} == {old_kid, new_kid}
        after = await login(env)
        assert verify(jwks, after["id_token"]).header["kid"] == new_kid
        assert verify(jwks, before["id_token"]).header["kid"] == old_kid
        assert (await userinfo(env, before["access_token"])).status == 200
        env.idp.retire_signing_key(old_kid)
        assert (await userinfo(env, before["access_token"])).status == 401
        with pytest.raises(ValueError):
            env.idp.retire_signing_key(new_kid)

    async def test_backchannel_logout_token(self, env: Env) -> None:
        """A logout token is signed, typed logout+jwt, and carries the event and sid."""
        decoded = verify(await fetch_jwks(env), env.idp.backchannel_logout_token("app", sid="s1"))
        assert decoded.header["typ"] == "logout+jwt"
        assert decoded.claims["sid"] == "s1" and "nonce" not in decoded.claims
        assert "http://schemas.openid.net/event/backchannel-logout" in decoded.claims["events"]


class TestTokenEndpointKnobs:
    async def test_failures_answer_503(self, env: Env) -> None:
        """token_endpoint_failures makes the next N calls 503 and touches no grant."""
        first = await login(env)
        env.idp.token_endpoint_failures = 2
        for _ in range(2):
            status, body = await refresh(env, first["refresh_token"])
            assert (status, body["error"]) == (503, "temporarily_unavailable")
        assert env.idp.token_endpoint_failures == 0
        assert (await refresh(env, first["refresh_token"]))[0] == 200

    async def test_delay(self, env: Env) -> None:
        """token_endpoint_delay holds the answer back."""
        first = await login(env)
        env.idp.token_endpoint_delay = 0.2
        started = time.monotonic()
        status, _ = await refresh(env, first["refresh_token"])
        assert status == 200 and time.monotonic() - started >= 0.2

    async def test_garbage_html_intercepts_the_request(self, env: Env) -> None:
        """token_endpoint_garbage "html": a 200 page instead of the answer; no grant is used."""
        first = await login(env)
        env.idp.token_endpoint_garbage = 1
        resp = await env.http.post(
            env.path("token"),
            data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]},
            headers=basic(),
        )
        assert (resp.status, resp.content_type) == (200, "text/html")
        assert env.idp.token_endpoint_garbage == 0
        assert env.idp.stats.refresh_grants == 0
        assert (await refresh(env, first["refresh_token"]))[0] == 200  # nothing was spent

    async def test_garbage_truncated_json_after_the_grant(self, env: Env) -> None:
        """token_endpoint_garbage "truncated_json": the answer is cut, but the token rotated."""
        first = await login(env)
        env.idp.token_endpoint_garbage = 1
        env.idp.token_endpoint_garbage_kind = "truncated_json"
        resp = await env.http.post(
            env.path("token"),
            data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]},
            headers=basic(),
        )
        assert (resp.status, resp.content_type) == (200, "application/json")
        with pytest.raises(ValueError):
            json.loads(await resp.read())
        assert env.idp.token_endpoint_garbage == 0
        assert env.idp.stats.refresh_grants == 1
        status, body = await refresh(env, first["refresh_token"])
        assert (status, body["error"]) == (400, "invalid_grant")
        assert env.idp.stats.reuse_detected == 1


class TestClientAuth:
    @pytest.mark.parametrize(
        ("headers", "extra"),
        [
            (basic(secret="wrong"), {}),
            (basic(client_id="nobody"), {}),
            ({}, {"client_id": "app", "client_secret": "wrong"}),
            ({}, {"client_id": "app"}),
            ({}, {}),
            ({}, {"client_id": "spa", "client_secret": "made-up"}),
            ({"Authorization": "Basic !!!"}, {}),
        ],
    )
    async def test_failures_are_401_invalid_client(
        self, env: Env, headers: dict[str, str], extra: dict[str, str]
    ) -> None:
        """Wrong, unknown, missing or malformed client credentials are 401 invalid_client."""
        first = await login(env)
        form = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"], **extra}
        status, body = await token(env, form, headers=headers)
        assert (status, body["error"]) == (401, "invalid_client")
        assert (await refresh(env, first["refresh_token"]))[0] == 200  # nothing was spent

    async def test_basic_failure_carries_challenge(self, env: Env) -> None:
        """A failed HTTP Basic attempt is answered with WWW-Authenticate (RFC 6749 §5.2)."""
        resp = await env.http.post(
            env.path("token"), data={"grant_type": "refresh_token"}, headers=basic(secret="x")
        )
        assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Basic")

    async def test_client_secret_post(self, env: Env) -> None:
        """client_secret_post authenticates as well as Basic."""
        first = await login(env)
        form = {
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "client_id": "app",
            "client_secret": SECRET,
        }
        assert (await token(env, form, headers={}))[0] == 200

    async def test_two_methods_refused(self, env: Env) -> None:
        """Basic and client_secret_post at once is invalid_request (RFC 6749 §2.3)."""
        status, body = await token(
            env, {"grant_type": "refresh_token", "refresh_token": "x", "client_secret": SECRET}
        )
        assert (status, body["error"]) == (400, "invalid_request")


async def test_no_token_is_logged(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Tokens, codes and secrets never reach a log record, even on reuse and revocation."""
    caplog.set_level(logging.DEBUG, logger="sidecar.dev.idp")
    verifier = secrets.token_urlsafe(48)
    query = await authorize(env, verifier)
    form = code_form(query["code"], verifier)
    _, body = await token(env, form)
    await token(env, form)
    await refresh(env, body["refresh_token"])
    await refresh(env, body["refresh_token"])
    secrets_seen = [query["code"], body["access_token"], body["refresh_token"], SECRET, verifier]
    for record in caplog.records:
        text = repr(vars(record))
        assert not any(value in text for value in secrets_seen)
    assert any("reuse" in r.getMessage() or "replayed" in r.getMessage() for r in caplog.records)


def test_warns_on_creation(caplog: pytest.LogCaptureFixture) -> None:
    """Creating a DevIdP logs that it is for development and tests only."""
    with caplog.at_level(logging.WARNING, logger="sidecar.dev.idp"):
        DevIdP("http://127.0.0.1:1", users=[DevUser("u", "u@example.com", "U")])
    assert any("for development and tests only" in r.getMessage() for r in caplog.records)
