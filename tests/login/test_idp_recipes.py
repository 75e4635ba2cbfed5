"""The provider recipes of docs/identity-providers.md, each run as written against the dev IdP
issuing that provider's token shapes (`DevClient.shape`), and the claims view they rely on
(sidecar/oidc/tokens.py): ID token over userinfo over the provider's own JWT access token.

Each recipe is read from the document itself; only the issuer, the secret, the upstream URL
and the `<…>` placeholders are filled in. Refresh timing and token lifetimes are test knobs.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey
from yarl import URL

from sidecar.config import Config
from sidecar.dev.idp import DevClient, DevUser
from sidecar.dev.idp.models import ClientShape
from sidecar.dev.idp.tokens import KEYCLOAK_DEFAULT_ROLE, group_object_id
from sidecar.oidc.tokens import (
    UnknownAccessTokenKey,
    UnusableAccessToken,
    refreshed_claims,
    session_claims,
    verify_access_token,
)
from sidecar.session import SessionRecord
from sidecar.web.keys import OIDC, SESSIONS
from tests.support.configs import config_dict
from tests.support.idp import CLIENT_SECRET, ThreadedIdP, idp_stats
from tests.support.login import browser, get_json, login, session_cookie
from tests.support.ports import free_port
from tests.support.repo import REPO_ROOT
from tests.support.sidecars import Sidecar, StartSidecar, ready
from tests.support.upstreams import Serve, echo_app, header, jwt_claims

DOC = REPO_ROOT / "docs" / "identity-providers.md"
# Test timing, not part of any recipe: a 2 s access token is due for refresh within a second.
SHORT_TTL = 2.0
REFRESH = {"before_expiry": "2s", "idp_timeout": "2s", "lock_ttl": "6s", "wait_timeout": "4s"}

# alice: realm role / group admins and the app role `reporting`; dave: too many groups for an
# Entra token (overage) but the app role; bob: staff only; carol: nothing, another domain.
USERS = (
    DevUser("alice", "alice@example.com", "Alice Admin", ("admins", "staff"), roles=("reporting",)),
    DevUser("bob", "bob@example.com", "Bob Staff", ("staff",)),
    DevUser("carol", "carol@example.org", "Carol Outsider"),
    DevUser(
        "dave",
        "dave@example.com",
        "Dave Many",
        ("admins", "staff", "dev", "ops", "sales"),
        roles=("reporting",),
    ),
)


# --- recipes as the document has them ---------------------------------------------------------


def recipe(provider: str) -> dict[str, Any]:
    """The first YAML block under the `## …` heading naming `provider` in
    docs/identity-providers.md, with the
    placeholders that name dev-IdP things filled in."""
    text = DOC.read_text()
    sections = re.split(r"^## ", text, flags=re.MULTILINE)
    section = next(s for s in sections[1:] if provider in s.partition("\n")[0])
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert block is not None, f"no YAML recipe under ## {provider}"
    filled = block.group(1).replace("<admins-group-object-id>", group_object_id("admins"))
    assert not re.search(r"<[a-z-]+-object-id>", filled), filled
    data = yaml.safe_load(filled)
    assert isinstance(data, dict)
    return data


@pytest.fixture
def start_idp() -> Iterator[Callable[..., ThreadedIdP]]:
    """`start_idp(**DevIdP options)`: a dev IdP of the test's own with `USERS`."""
    started: list[ThreadedIdP] = []

    def start(access_token_ttl: float = 300.0, **options: Any) -> ThreadedIdP:
        options.setdefault("users", USERS)
        idp = ThreadedIdP(free_port(), access_token_ttl=access_token_ttl, **options)
        started.append(idp)
        return idp

    yield start
    for idp in started:
        idp.stop()


async def recipe_sidecar(
    start_sidecar: StartSidecar,
    upstream_app: Serve,
    idp: ThreadedIdP,
    shape: ClientShape,
    settings: dict[str, Any],
    **sections: Any,
) -> Sidecar:
    """A sidecar configured with a recipe's settings, its client registered at `idp` with
    `shape`; `sections` (refresh timing) come on top."""
    base = await upstream_app(echo_app())
    data = config_dict(base, idp=idp, public_paths=[], **sections)
    public_url = data["server"]["public_url"]
    oidc = {
        **settings["oidc"],
        "issuer": idp.issuer,
        "client_secret": CLIENT_SECRET,
        "post_logout_redirect_url": public_url + "/",
    }
    client = DevClient(
        oidc["client_id"],
        CLIENT_SECRET,
        (public_url + "/oauth2/callback",),
        (public_url + "/",),
        shape=shape,
    )
    idp.call(idp.idp.register_client, client)
    data["oidc"] = oidc
    for name in ("access", "inject"):
        if name in settings:
            data[name] = settings[name]
    if "upstreams" in settings:
        data["upstreams"] = [{**u, "url": base} for u in settings["upstreams"]]
    sc = await start_sidecar(Config.model_validate(data))
    await ready(sc)
    return sc


async def status_of(sc: Sidecar, cookie: str, path: str) -> int:
    """GET `path` as an API client with the session cookie: the answer's status."""
    async with browser() as s:
        status, _ = await get_json(s, sc.url(path), headers={"Cookie": f"sidecar={cookie}"})
    return status


async def echoed(sc: Sidecar, cookie: str, path: str = "/app/x") -> dict[str, Any]:
    async with browser() as s:
        status, body = await get_json(s, sc.url(path), headers={"Cookie": f"sidecar={cookie}"})
    assert status == 200, (status, body)
    assert isinstance(body, dict)
    return body


async def log_in(sc: Sidecar, user: str) -> str:
    """A browser's whole login as `user`: the session cookie (the user may be refused later)."""
    async with browser() as s:
        await login(s, sc, "/app/page", user)
        return session_cookie(s)


async def stored(sc: Sidecar, cookie: str) -> SessionRecord:
    session = await sc.app[SESSIONS].load(cookie)
    assert session is not None
    return session.record


async def session_info(sc: Sidecar, cookie: str) -> dict[str, Any]:
    async with browser() as s:
        status, body = await get_json(
            s, sc.url("/oauth2/userinfo"), headers={"Cookie": f"sidecar={cookie}"}
        )
    assert status == 200, status
    assert isinstance(body, dict)
    return body


async def past_expiry(sc: Sidecar, cookie: str) -> None:
    """Sleep until the session's access token has expired (a refresh is due)."""
    record = await stored(sc, cookie)
    await asyncio.sleep(max(0.0, record.access_expires_at - time.time()) + 0.05)


def set_user(idp: ThreadedIdP, user: DevUser) -> None:
    """Change a user at the IdP (new groups, roles): tokens issued from now on show it."""
    idp.call(idp.idp.users.__setitem__, user.sub, user)


def set_access_ttl(idp: ThreadedIdP, seconds: float) -> None:
    idp.call(setattr, idp.idp, "access_token_ttl", seconds)


# --- Keycloak ---------------------------------------------------------------------------------


async def test_keycloak_roles_come_from_the_access_token(
    start_sidecar: StartSidecar, upstream_app: Serve, start_idp: Callable[..., ThreadedIdP]
) -> None:
    """Realm roles (`realm_access.roles`, the recipe's groups claim) and client roles
    (`resource_access.app.roles`) are only in Keycloak's access token: rules on them work."""
    idp = start_idp()
    settings = recipe("Keycloak")
    sc = await recipe_sidecar(start_sidecar, upstream_app, idp, "keycloak", settings)
    alice, bob = await log_in(sc, "alice"), await log_in(sc, "bob")

    record = await stored(sc, alice)
    assert record.id_token is not None
    id_claims = jwt_claims(record.id_token)
    assert "realm_access" not in id_claims and "groups" not in id_claims  # ID token: no roles
    access = jwt_claims(record.access_token)
    assert access["aud"] == "account" and access["realm_access"]["roles"][:2] == [
        "admins",
        "staff",
    ]
    assert record.claims["realm_access"] == access["realm_access"]
    assert record.claims["resource_access"]["app"] == {"roles": ["reporting"]}
    # Token claims of the access token stay out; identity claims are the ID token's.
    for name in ("aud", "typ", "azp", "exp", "iat", "jti"):
        assert name not in record.claims
    assert record.claims["sid"] == record.idp_session_id == id_claims["sid"]
    assert record.claims["sub"] == "alice"

    assert await status_of(sc, alice, "/admin/panel") == 200
    assert await status_of(sc, bob, "/admin/panel") == 403
    assert await status_of(sc, alice, "/reports/q1") == 200
    assert await status_of(sc, bob, "/reports/q1") == 403
    assert await status_of(sc, bob, "/app/x") == 200

    body = await echoed(sc, alice)
    assert header(body, "X-Forwarded-User") == ["alice"]  # preferred_username
    assert header(body, "X-Forwarded-Groups") == [f"admins,staff,{KEYCLOAK_DEFAULT_ROLE}"]


async def test_keycloak_refresh_expires_in_bounds_the_session(
    start_sidecar: StartSidecar, upstream_app: Serve, start_idp: Callable[..., ThreadedIdP]
) -> None:
    """`refresh_expires_in` (SSO Session Idle) ends the session long before `session.lifetime`."""
    idp = start_idp(refresh_token_ttl=600.0)
    sc = await recipe_sidecar(start_sidecar, upstream_app, idp, "keycloak", recipe("Keycloak"))
    before = time.time()
    cookie = await log_in(sc, "alice")
    info = await session_info(sc, cookie)
    assert before + 600 - 2 <= info["session_expires_at"] <= time.time() + 600
    assert (await stored(sc, cookie)).refresh_expires_at is not None


async def test_keycloak_sessions_in_use_live_on_up_to_the_lifetime(
    start_sidecar: StartSidecar, upstream_app: Serve, start_idp: Callable[..., ThreadedIdP]
) -> None:
    """Keycloak renews `refresh_expires_in` (SSO Session Idle) with each refresh: a session in
    use lives on, and its end moves with it, never past `session.lifetime`; the user index
    follows the new end (central logout must still find the session)."""
    idp = start_idp(access_token_ttl=SHORT_TTL, refresh_token_ttl=600.0)
    sc = await recipe_sidecar(
        start_sidecar, upstream_app, idp, "keycloak", recipe("Keycloak"), refresh=REFRESH
    )
    cookie = await log_in(sc, "alice")
    first = (await session_info(sc, cookie))["session_expires_at"]
    await asyncio.sleep(SHORT_TTL + 1.5)
    assert await status_of(sc, cookie, "/app/x") == 200  # refreshed on the way
    later = (await session_info(sc, cookie))["session_expires_at"]
    assert later >= first + SHORT_TTL
    record = await stored(sc, cookie)
    assert record.lifetime_ends_at is not None and later <= record.lifetime_ends_at
    listed = await sc.app[SESSIONS].sessions_of_user(idp.issuer, record.subject)
    assert [info.expires_at for info in listed] == [record.expires_at]


async def test_keycloak_roles_follow_the_idp_after_a_refresh(
    start_sidecar: StartSidecar, upstream_app: Serve, start_idp: Callable[..., ThreadedIdP]
) -> None:
    """A role given or taken away at Keycloak counts from the next refresh on: the new access
    token's roles replace the old one's; the ID-token claims stay."""
    idp = start_idp(access_token_ttl=SHORT_TTL)
    settings = recipe("Keycloak")
    sc = await recipe_sidecar(
        start_sidecar, upstream_app, idp, "keycloak", settings, refresh=REFRESH
    )
    alice, bob = await log_in(sc, "alice"), await log_in(sc, "bob")
    assert await status_of(sc, alice, "/admin/panel") == 200
    assert await status_of(sc, bob, "/admin/panel") == 403
    email_before = (await stored(sc, alice)).claims["email"]

    set_user(idp, DevUser("alice", "alice@example.com", "Alice Admin", ("staff",)))
    set_user(idp, DevUser("bob", "bob@example.com", "Bob Staff", ("staff", "admins")))
    await past_expiry(sc, alice)
    await past_expiry(sc, bob)
    refreshes = idp_stats(idp)["refresh_grants"]

    assert await status_of(sc, alice, "/admin/panel") == 403
    assert await status_of(sc, bob, "/admin/panel") == 200
    assert idp_stats(idp)["refresh_grants"] >= refreshes + 2
    record = await stored(sc, alice)
    assert record.version > 1
    assert record.claims["realm_access"]["roles"] == ["staff", KEYCLOAK_DEFAULT_ROLE]
    assert "app" not in record.claims["resource_access"]  # the client role went too
    assert record.claims["email"] == email_before and record.claims["sub"] == "alice"
    assert await status_of(sc, alice, "/reports/q1") == 403


# --- Okta -------------------------------------------------------------------------------------


async def test_okta_groups_and_offline_access_refresh(
    start_sidecar: StartSidecar, upstream_app: Serve, start_idp: Callable[..., ThreadedIdP]
) -> None:
    """The `groups` claim admits staff only; with `offline_access` the session refreshes, and
    Okta's access-token `sub` (the login name) never replaces the ID token's."""
    idp = start_idp(access_token_ttl=SHORT_TTL)
    settings = recipe("Okta")
    assert "offline_access" in settings["oidc"]["scopes"]
    sc = await recipe_sidecar(start_sidecar, upstream_app, idp, "okta", settings, refresh=REFRESH)
    bob, carol = await log_in(sc, "bob"), await log_in(sc, "carol")
    assert await status_of(sc, bob, "/app/x") == 200
    assert await status_of(sc, carol, "/app/x") == 403

    record = await stored(sc, bob)
    assert record.refresh_token is not None and record.refresh_expires_at is None
    assert jwt_claims(record.access_token)["sub"] == "bob@example.com"
    assert record.claims["sub"] == "bob" and record.subject == "bob"
    assert record.claims["scp"] == settings["oidc"]["scopes"]
    assert "cid" not in record.claims
    info = await session_info(sc, bob)
    assert info["sub"] == "bob" and info["groups"] == ["staff"]
    assert info["session_expires_at"] > time.time() + 3600  # no refresh_expires_in from Okta

    for _ in range(2):
        await past_expiry(sc, bob)
        assert await status_of(sc, bob, "/app/x") == 200
    assert idp_stats(idp)["refresh_grants"] >= 2
    assert (await stored(sc, bob)).claims["sub"] == "bob"


async def test_okta_without_offline_access_ends_with_the_access_token(
    start_sidecar: StartSidecar, upstream_app: Serve, start_idp: Callable[..., ThreadedIdP]
) -> None:
    """Without `offline_access` Okta issues no refresh token: the session lasts as long as its
    first access token."""
    idp = start_idp(access_token_ttl=SHORT_TTL)
    settings = recipe("Okta")
    scopes = [s for s in settings["oidc"]["scopes"] if s != "offline_access"]
    settings = {**settings, "oidc": {**settings["oidc"], "scopes": scopes}}
    sc = await recipe_sidecar(start_sidecar, upstream_app, idp, "okta", settings, refresh=REFRESH)
    cookie = await log_in(sc, "bob")
    record = await stored(sc, cookie)
    assert record.refresh_token is None
    info = await session_info(sc, cookie)
    assert info["session_expires_at"] == info["access_token_expires_at"]
    assert await status_of(sc, cookie, "/app/x") == 200

    await past_expiry(sc, cookie)
    assert await status_of(sc, cookie, "/app/x") == 401
    assert idp_stats(idp)["refresh_grants"] == 0


# --- Google -----------------------------------------------------------------------------------


async def test_google_domain_rule_and_refresh_without_rotation(
    start_sidecar: StartSidecar, upstream_app: Serve, start_idp: Callable[..., ThreadedIdP]
) -> None:
    """`access_type: offline` gets a refresh token; Google's refreshes return none and keep the
    old one valid, refresh after refresh; the domain rule admits example.com only."""
    idp = start_idp(access_token_ttl=SHORT_TTL)
    sc = await recipe_sidecar(
        start_sidecar, upstream_app, idp, "google", recipe("Google"), refresh=REFRESH
    )
    alice, carol = await log_in(sc, "alice"), await log_in(sc, "carol")
    assert await status_of(sc, carol, "/app/x") == 403
    assert await status_of(sc, alice, "/app/x") == 200

    first = await stored(sc, alice)
    assert first.refresh_token is not None
    assert first.access_token.count(".") < 2  # opaque: no claims from it
    assert "groups" not in first.claims and first.claims["email_verified"] is True
    for round_ in range(1, 4):
        await past_expiry(sc, alice)
        body = await echoed(sc, alice)
        record = await stored(sc, alice)
        assert record.version > first.version + round_ - 1
        assert record.refresh_token == first.refresh_token
        assert header(body, "Authorization") == [f"Bearer {record.access_token}"]
    assert record.access_token != first.access_token
    assert idp_stats(idp)["refresh_grants"] >= 3
    assert idp_stats(idp)["reuse_detected"] == 0


async def test_google_gives_a_second_login_no_refresh_token_without_consent(
    start_sidecar: StartSidecar, upstream_app: Serve, start_idp: Callable[..., ThreadedIdP]
) -> None:
    """Why the recipe has `prompt: consent`: without it a repeated login gets no refresh token
    (and without `access_type: offline`, none ever)."""
    idp = start_idp()
    settings = recipe("Google")
    assert settings["oidc"]["extra_auth_params"] == {"access_type": "offline", "prompt": "consent"}
    offline_only = {
        **settings,
        "oidc": {**settings["oidc"], "extra_auth_params": {"access_type": "offline"}},
    }
    sc = await recipe_sidecar(start_sidecar, upstream_app, idp, "google", offline_only)
    assert (await stored(sc, await log_in(sc, "alice"))).refresh_token is not None
    assert (await stored(sc, await log_in(sc, "alice"))).refresh_token is None

    sc = await recipe_sidecar(start_sidecar, upstream_app, idp, "google", settings)
    for _ in range(2):
        assert (await stored(sc, await log_in(sc, "alice"))).refresh_token is not None

    online = {**settings, "oidc": {**settings["oidc"], "extra_auth_params": {}}}
    sc = await recipe_sidecar(start_sidecar, upstream_app, idp, "google", online)
    assert (await stored(sc, await log_in(sc, "bob"))).refresh_token is None


# --- Entra ID ---------------------------------------------------------------------------------


async def test_entra_groups_overage_and_app_roles(
    start_sidecar: StartSidecar, upstream_app: Serve, start_idp: Callable[..., ThreadedIdP]
) -> None:
    """Group object ids admit a member; a user past the overage limit has no `groups` claim
    (the sidecar does not follow `_claim_sources`) and is refused, but an app role admits them."""
    idp = start_idp(revocation=False)
    sc = await recipe_sidecar(start_sidecar, upstream_app, idp, "entra", recipe("Entra"))
    alice, bob, dave = [await log_in(sc, user) for user in ("alice", "bob", "dave")]

    assert await status_of(sc, alice, "/admin/panel") == 200
    assert await status_of(sc, bob, "/admin/panel") == 403
    assert await status_of(sc, dave, "/admin/panel") == 403  # overage: no groups claim

    record = await stored(sc, dave)
    assert "groups" not in record.claims
    assert record.claims["_claim_names"] == {"groups": "src1"}
    assert "endpoint" in record.claims["_claim_sources"]["src1"]
    assert (await stored(sc, alice)).claims["groups"] == [
        group_object_id("admins"),
        group_object_id("staff"),
    ]

    assert await status_of(sc, dave, "/reports/q1") == 200  # the app role
    assert await status_of(sc, alice, "/reports/q1") == 200
    assert await status_of(sc, bob, "/reports/q1") == 403

    # Entra's access token is Graph's (another issuer): it adds nothing.
    assert jwt_claims(record.access_token)["iss"] != idp.issuer
    assert "upn" not in record.claims and "scp" not in record.claims
    assert "email_verified" not in record.claims


async def test_entra_sign_out_without_a_revocation_endpoint(
    start_sidecar: StartSidecar, upstream_app: Serve, start_idp: Callable[..., ThreadedIdP]
) -> None:
    """No revocation endpoint in discovery: sign-out still ends the session and goes to the
    IdP's logout."""
    idp = start_idp(revocation=False)
    sc = await recipe_sidecar(start_sidecar, upstream_app, idp, "entra", recipe("Entra"))
    assert sc.app[OIDC].metadata.revocation_endpoint is None
    async with browser() as s:
        await login(s, sc, "/app/page", "alice")
        cookie = session_cookie(s)
        assert (await stored(sc, cookie)).refresh_token is not None
        async with s.post(
            sc.url("/oauth2/sign_out"), headers={"Origin": sc.url("")}, allow_redirects=False
        ) as r:
            assert r.status == 303
            target = URL(r.headers["Location"])
        assert str(target).startswith(idp.issuer + "/end_session")
        assert (await get_json(s, sc.url("/app/x")))[0] == 401
    assert await sc.app[SESSIONS].load(cookie) is None
    assert idp_stats(idp)["revocations"] == 0


# --- the claims view, unit by unit ------------------------------------------------------------

ISS = "https://idp.test"
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})
FORGED = RSAKey.generate_key(2048, parameters={"kid": "k1"})
OTHER_KID = RSAKey.generate_key(2048, parameters={"kid": "k2"})
KEYS = KeySet([KEY])
SHARED = OctKey.import_key(b"a shared secret, 32 bytes long!!")  # HMAC: never accepted


def _token(claims: dict[str, Any], key: RSAKey = KEY, **header: Any) -> str:
    return jwt.encode({"alg": "RS256", "kid": key.kid, **header}, claims, key)


def _access(now: float, **extra: Any) -> dict[str, Any]:
    return {"iss": ISS, "sub": "alice", "aud": "account", "exp": int(now) + 60, **extra}


def test_access_token_verified_without_an_audience_check() -> None:
    now = time.time()
    claims = verify_access_token(_token(_access(now, aud="account")), KEYS, issuer=ISS, now=now)
    assert claims["aud"] == "account"
    assert verify_access_token(_token(_access(now), typ="JWT"), KEYS, issuer=ISS, now=now)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda now: "opaque-token", UnusableAccessToken),
        (lambda now: _token(_access(now, iss="https://other.test")), UnusableAccessToken),
        (lambda now: _token(_access(now, exp=int(now) - 120)), UnusableAccessToken),
        (
            lambda now: _token({k: v for k, v in _access(now).items() if k != "exp"}),
            UnusableAccessToken,
        ),
        (lambda now: _token(_access(now), FORGED), UnusableAccessToken),
        (lambda now: _token(_access(now), OTHER_KID), UnknownAccessTokenKey),
        (lambda now: _token(_access(now, at_hash="x")), UnusableAccessToken),  # an ID token
        (lambda now: _token(_access(now), typ="logout+jwt"), UnusableAccessToken),
        (
            lambda now: jwt.encode({"alg": "HS256"}, _access(now), SHARED),
            UnusableAccessToken,
        ),
    ],
)
def test_access_tokens_that_give_no_claims(make: Callable[[float], str], error: type) -> None:
    now = time.time()
    with pytest.raises(error):
        verify_access_token(make(now), KEYS, issuer=ISS, now=now)


def test_a_stored_access_token_is_verified_without_its_expiry() -> None:
    now = time.time()
    token = _token(_access(now, exp=int(now) - 3600))
    with pytest.raises(UnusableAccessToken):
        verify_access_token(token, KEYS, issuer=ISS, now=now)
    assert verify_access_token(token, KEYS, issuer=ISS, now=now, check_expiry=False)


def test_claims_precedence_id_token_userinfo_access_token() -> None:
    id_claims = {"iss": ISS, "sub": "alice", "email": "alice@example.com", "sid": "s1"}
    userinfo = {"sub": "alice", "email": "other@example.com", "name": "Alice", "groups": ["g"]}
    access = {
        "iss": ISS,
        "sub": "alice@login",
        "aud": "account",
        "typ": "Bearer",
        "azp": "app",
        "client_id": "app",
        "sid": "s2",
        "exp": 1,
        "jti": "j",
        "name": "Mallory",
        "groups": ["admins"],
        "scope": "openid email",
        "realm_access": {"roles": ["admins"]},
    }
    merged = session_claims(id_claims, userinfo, access)
    assert merged["sub"] == "alice" and merged["email"] == "alice@example.com"
    assert merged["name"] == "Alice" and merged["groups"] == ["g"]
    assert merged["sid"] == "s1" and merged["iss"] == ISS
    assert merged["realm_access"] == {"roles": ["admins"]} and merged["scope"] == "openid email"
    for name in ("aud", "typ", "azp", "client_id", "exp", "jti"):
        assert name not in merged
    assert session_claims(id_claims, None, None) == id_claims


def test_refreshed_claims_replace_what_the_old_access_token_gave() -> None:
    id_token = _token({"iss": ISS, "sub": "alice", "email": "alice@example.com", "aud": "app"})
    old = {"iss": ISS, "email": "alice@example.com", "roles": ["admins"], "scope": "openid"}
    claims = {
        "sub": "alice",
        "email": "alice@example.com",  # the ID token's, equal in the old access token
        "name": "Alice",  # userinfo's
        "roles": ["admins"],
        "scope": "openid",
    }
    new = {"iss": ISS, "roles": ["staff"], "email": "changed@example.com"}
    after = refreshed_claims(
        claims, id_token=id_token, previous_access=old, id_claims=None, access_claims=new
    )
    assert after == {
        "sub": "alice",
        "email": "alice@example.com",
        "name": "Alice",
        "roles": ["staff"],
    }
    # A new access token that does not verify gives nothing; the old one's claims go anyway.
    gone = refreshed_claims(
        claims, id_token=id_token, previous_access=old, id_claims=None, access_claims=None
    )
    assert gone == {"sub": "alice", "email": "alice@example.com", "name": "Alice"}
    # A new ID token wins; without access-token claims nothing else changes.
    renamed = refreshed_claims(
        claims,
        id_token=id_token,
        previous_access=None,
        id_claims={"iss": ISS, "sub": "alice", "name": "Alice B", "exp": 2},
        access_claims=None,
    )
    assert renamed == {**claims, "name": "Alice B"}
