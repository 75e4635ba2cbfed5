"""Bearer tokens of machine clients (`BearerVerifier`): JWT access tokens of a second issuer
and of the provider (RFC 9068), each validation rule broken alone, key rotation, discovery,
RFC 7662 introspection, the identity cache, and garbage that never escapes as anything but
`InvalidBearerToken`."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, RSAKey
from yarl import URL

from sidecar.config import BearerConfig, OIDCConfig
from sidecar.errors import IdPUnavailable, InvalidBearerToken
from sidecar.health import Readiness
from sidecar.oidc import BearerIdentity, BearerVerifier, OIDCClient, challenge_s256, new_verifier
from sidecar.oidc.bearer import MAX_TOKEN_LENGTH
from sidecar.oidc.id_token import LEEWAY
from tests.support.idp import CLIENT_ID, CLIENT_SECRET, ThreadedIdP
from tests.support.jwks_server import (
    INTROSPECTION_CLIENT,
    INTROSPECTION_SECRET,
    IssuerServer,
    b64,
    sign,
)
from tests.support.login import approve, browser
from tests.support.ports import free_port

NOW = 1_700_000_000.0
AUDIENCE = "orders-api"
DROP = object()  # a claim to leave out

RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
EC = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
ROTATED = RSAKey.generate_key(2048, parameters={"kid": "rsa-2"})
IMPOSTOR = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})  # RSA's kid, another key
STRANGER = RSAKey.generate_key(2048, parameters={"kid": "unpublished"})
SHARED = OctKey.import_key(b"a-shared-secret-of-thirty-two-b!", parameters={"kid": "rsa-1"})


class Clock:
    """The verifier's wall clock, moved by the test."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sha256_key(token: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()


def unstarted_provider(issuer: str = "https://idp.example.com") -> OIDCClient:
    """A provider whose metadata never loads: enough for verifiers of other issuers."""
    config = OIDCConfig(issuer=issuer, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    return OIDCClient(config, "http://127.0.0.1:9/oauth2/callback", 5.0, Readiness())


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def issuer() -> Iterator[IssuerServer]:
    server = IssuerServer([RSA, EC])
    yield server
    server.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


MakeVerifier = Callable[..., Awaitable[BearerVerifier]]


@pytest.fixture
async def make_verifier(clock: Clock) -> AsyncIterator[MakeVerifier]:
    """`await make_verifier(bearer_section, provider=…, clock=…)`: a started verifier, closed
    after the test."""
    started: list[BearerVerifier] = []

    async def make(
        section: dict[str, Any],
        provider: OIDCClient | None = None,
        clock: Callable[[], float] = clock,
    ) -> BearerVerifier:
        verifier = BearerVerifier(
            BearerConfig.model_validate(section), provider or unstarted_provider(), clock=clock
        )
        await verifier.start()
        started.append(verifier)
        return verifier

    yield make
    for verifier in started:
        await verifier.close()


def second_issuer(
    server: IssuerServer, *, discover: bool = False, **changes: Any
) -> dict[str, Any]:
    """The `bearer` section accepting `server`'s tokens for AUDIENCE."""
    entry: dict[str, Any] = {
        "issuer": server.issuer,
        "audiences": [AUDIENCE],
        "algorithms": ["RS256", "ES256"],
    }
    if not discover:
        entry["jwks_url"] = server.jwks_url
    entry.update(changes)
    return {"issuers": [entry]}


def with_introspection(
    server: IssuerServer, secret: str | None = INTROSPECTION_SECRET, **more: Any
) -> dict[str, Any]:
    """The `introspection` section for `server`'s endpoint (secret None: a public client)."""
    return {
        "endpoint": server.introspection_url,
        "client_id": INTROSPECTION_CLIENT,
        "client_secret": secret,
        **more,
    }


def claims(server: IssuerServer, **changes: Any) -> dict[str, Any]:
    """A valid RFC 9068 claim set of `server` at NOW, `changes` applied (DROP removes one)."""
    base: dict[str, Any] = {
        "iss": server.issuer,
        "sub": "svc-billing",
        "aud": AUDIENCE,
        "client_id": "billing",
        "iat": NOW - 10,
        "exp": NOW + 290,
        "jti": "jti-0123456789",
        "scope": "orders:read orders:write",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


async def refused(verifier: BearerVerifier, token: str) -> str:
    """The description a token is refused with; it never repeats the token."""
    with pytest.raises(InvalidBearerToken) as info:
        await verifier.verify(token)
    message = str(info.value)
    assert not any(len(part) >= 8 and part in message for part in token.split("."))
    return message


# --- valid tokens of a second issuer ---------------------------------------------------------


@pytest.mark.parametrize(("key", "alg"), [(RSA, "RS256"), (EC, "ES256")], ids=["RS256", "ES256"])
async def test_valid_token_of_second_issuer(
    issuer: IssuerServer, make_verifier: MakeVerifier, key: Any, alg: str
) -> None:
    """A token signed by a published key gives its issuer, subject, scopes and expiry."""
    verifier = await make_verifier(second_issuer(issuer))
    token = sign(claims(issuer), key, alg)

    identity = await verifier.verify(token)

    assert identity == BearerIdentity(
        issuer=issuer.issuer,
        subject="svc-billing",
        claims=claims(issuer),
        scopes=frozenset({"orders:read", "orders:write"}),
        expires_at=NOW + 290,
        key=sha256_key(token),
    )
    assert verifier.enabled


@pytest.mark.parametrize(
    ("changes", "scopes"),
    [
        ({"scope": "a b  c"}, {"a", "b", "c"}),
        ({"scope": DROP, "scp": ["a", "b"]}, {"a", "b"}),
        ({"scope": DROP, "scp": "a b"}, {"a", "b"}),
        ({"scope": "a", "scp": ["b", 7, ""]}, {"a", "b"}),
        ({"scope": DROP}, set()),
        ({"scope": 42}, set()),
    ],
    ids=["scope", "scp-list", "scp-string", "both", "none", "not-text"],
)
async def test_scopes_from_scope_or_scp(
    issuer: IssuerServer, make_verifier: MakeVerifier, changes: dict[str, Any], scopes: set[str]
) -> None:
    """`scope` is space-separated (RFC 9068 §2.2.3); `scp` is a list or a string."""
    verifier = await make_verifier(second_issuer(issuer))
    identity = await verifier.verify(sign(claims(issuer, **changes), RSA))
    assert identity.scopes == scopes


@pytest.mark.parametrize(
    "changes",
    [
        {"aud": ["other", AUDIENCE]},
        {"exp": NOW - LEEWAY},  # within the leeway
        {"nbf": NOW + LEEWAY},
        {"iat": NOW + LEEWAY},
        {"exp": NOW + 5.5, "iat": DROP},
    ],
    ids=["aud-list", "exp-leeway", "nbf-leeway", "iat-leeway", "float-exp-no-iat"],
)
async def test_edges_accepted(
    issuer: IssuerServer, make_verifier: MakeVerifier, changes: dict[str, Any]
) -> None:
    verifier = await make_verifier(second_issuer(issuer))
    assert (await verifier.verify(sign(claims(issuer, **changes), RSA))).subject == "svc-billing"


@pytest.mark.parametrize("typ", [None, "at+jwt", "AT+JWT", "application/at+jwt", "JWT", "jwt"])
async def test_accepted_typ(issuer: IssuerServer, make_verifier: MakeVerifier, typ: Any) -> None:
    verifier = await make_verifier(second_issuer(issuer))
    await verifier.verify(sign(claims(issuer), RSA, typ=typ))


async def test_trailing_slash_spelling_of_issuer(
    issuer: IssuerServer, make_verifier: MakeVerifier
) -> None:
    """The configured issuer lost its trailing slash in the config model; a token spelling it
    with one is still that issuer's, and keeps its own spelling."""
    verifier = await make_verifier(second_issuer(issuer))
    identity = await verifier.verify(sign(claims(issuer, iss=issuer.issuer + "/"), RSA))
    assert identity.issuer == issuer.issuer + "/"


# --- each rule broken alone ------------------------------------------------------------------


def _none_token(server: IssuerServer) -> str:
    head = b64(json.dumps({"alg": "none", "typ": "at+jwt"}).encode())
    return f"{head}.{b64(json.dumps(claims(server)).encode())}."


BROKEN: dict[str, tuple[Callable[[IssuerServer], str], str]] = {
    "alg-none": (_none_token, "algorithm not accepted"),
    "hs256": (lambda s: sign(claims(s), SHARED, "HS256"), "algorithm not accepted"),
    "alg-not-configured": (lambda s: sign(claims(s), RSA, "PS256"), "algorithm not accepted"),
    "alg-missing": (lambda s: sign(claims(s), RSA, alg=None), "algorithm not accepted"),
    "alg-header-lies": (lambda s: sign(claims(s), RSA, alg="ES256"), "bad signature"),
    "other-key-same-kid": (lambda s: sign(claims(s), IMPOSTOR), "bad signature"),
    "ec-kid-rsa-key": (lambda s: sign(claims(s), RSA, kid="ec-1"), "bad signature"),
    "unknown-kid": (lambda s: sign(claims(s), STRANGER), "unknown signing key"),
    "wrong-iss": (lambda s: sign(claims(s, iss=s.issuer + "/other"), RSA), "unknown issuer"),
    "unknown-iss": (lambda s: sign(claims(s, iss="https://evil.example"), RSA), "unknown issuer"),
    "iss-missing": (lambda s: sign(claims(s, iss=DROP), RSA), "unknown issuer"),
    "iss-not-text": (lambda s: sign(claims(s, iss=[s.issuer]), RSA), "unknown issuer"),
    "aud-missing": (lambda s: sign(claims(s, aud=DROP), RSA), "wrong audience"),
    "aud-wrong": (lambda s: sign(claims(s, aud="other-api"), RSA), "wrong audience"),
    "aud-list-wrong": (lambda s: sign(claims(s, aud=["a", 1]), RSA), "wrong audience"),
    "exp-past": (lambda s: sign(claims(s, exp=NOW - LEEWAY - 1), RSA), "token expired"),
    "exp-missing": (lambda s: sign(claims(s, exp=DROP), RSA), "token has no expiry"),
    "exp-text": (lambda s: sign(claims(s, exp=str(NOW + 60)), RSA), "exp is not a number"),
    "exp-bool": (lambda s: sign(claims(s, exp=True), RSA), "exp is not a number"),
    "exp-huge": (lambda s: sign(claims(s, exp=10**400), RSA), "exp is out of range"),
    "nbf-future": (lambda s: sign(claims(s, nbf=NOW + LEEWAY + 1), RSA), "token not yet valid"),
    "iat-future": (
        lambda s: sign(claims(s, iat=NOW + LEEWAY + 1), RSA),
        "token issued in the future",
    ),
    "typ-logout": (lambda s: sign(claims(s), RSA, typ="logout+jwt"), "wrong token type"),
    "typ-not-text": (lambda s: sign(claims(s), RSA, typ=["at+jwt"]), "wrong token type"),
    "sub-missing": (lambda s: sign(claims(s, sub=DROP), RSA), "token has no subject"),
    "sub-empty": (lambda s: sign(claims(s, sub=""), RSA), "token has no subject"),
    "sub-number": (lambda s: sign(claims(s, sub=7), RSA), "token has no subject"),
    "id-token": (lambda s: sign(claims(s, at_hash="abc"), RSA, typ="JWT"), "not an access token"),
    "logout-token": (lambda s: sign(claims(s, events={}), RSA, typ=None), "not an access token"),
    "crit": (lambda s: sign(claims(s), RSA, crit=["exp"]), "critical header extensions"),
    "payload-not-object": (lambda s: sign(b"[1, 2]", RSA), "malformed token"),
    "payload-not-json": (lambda s: sign(b"\xff{", RSA), "malformed token"),
    "oversize": (
        lambda s: sign(claims(s, pad="x" * MAX_TOKEN_LENGTH), RSA),
        "token too long",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
async def test_each_rule_broken_alone(
    issuer: IssuerServer, make_verifier: MakeVerifier, case: str
) -> None:
    """One broken rule refuses the token with a description naming it, never the token."""
    build, expected = BROKEN[case]
    verifier = await make_verifier(second_issuer(issuer))
    await verifier.verify(sign(claims(issuer), RSA))  # keys loaded, issuer reachable
    assert await refused(verifier, build(issuer)) == expected


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("", "malformed token"),
        ("not a token", "malformed token"),
        ("tok\x00en", "malformed token"),
        ("tök", "malformed token"),
        ("\ud800", "malformed token"),
        ("opaque-token-0123", "not a JWT"),
        ("a.b.c", "not a JWT"),
        ("e30.e30.", "unknown issuer"),  # {}.{}: a JWT without iss
        ("e30.!!.x", "malformed token"),
        (b64(b'{"alg":"RS256"}') + ".Zm9v.", "malformed token"),  # payload not JSON
        ("x" * (MAX_TOKEN_LENGTH + 1), "token too long"),
    ],
)
async def test_garbage_refused(
    issuer: IssuerServer, make_verifier: MakeVerifier, token: str, expected: str
) -> None:
    """Without introspection, whatever is not a JWT of a known issuer is refused unsent."""
    verifier = await make_verifier(second_issuer(issuer))
    assert await refused(verifier, token) == expected
    assert issuer.counts() == {}


# --- keys: rotation, discovery, outages ------------------------------------------------------


async def test_rotation_new_kid_after_one_refetch(
    issuer: IssuerServer, make_verifier: MakeVerifier
) -> None:
    """A kid published after the keys were loaded is found by one refetch; another unknown
    kid right after does not fetch again (rate limit) and is refused."""
    verifier = await make_verifier(second_issuer(issuer))
    await verifier.verify(sign(claims(issuer), RSA))
    assert issuer.counts() == {"jwks": 1}

    issuer.publish(RSA, ROTATED)
    identity = await verifier.verify(sign(claims(issuer, jti="after-rotation"), ROTATED))
    assert identity.claims["jti"] == "after-rotation"
    assert issuer.counts() == {"jwks": 2}

    assert await refused(verifier, sign(claims(issuer), STRANGER)) == "unknown signing key"
    assert issuer.counts() == {"jwks": 2}


async def test_retired_key_still_cached_until_refetch(
    issuer: IssuerServer, make_verifier: MakeVerifier
) -> None:
    """Retiring a key does not reach a verifier until it refetches for some unknown kid."""
    verifier = await make_verifier(second_issuer(issuer))
    await verifier.verify(sign(claims(issuer), RSA))
    issuer.publish(ROTATED)
    await verifier.verify(sign(claims(issuer, jti="new"), ROTATED))  # refetch: RSA is gone
    assert await refused(verifier, sign(claims(issuer, jti="old"), RSA)) == "unknown signing key"


async def test_explicit_jwks_url_skips_discovery(
    issuer: IssuerServer, make_verifier: MakeVerifier
) -> None:
    verifier = await make_verifier(second_issuer(issuer))
    assert issuer.counts() == {}  # nothing fetched before the first token
    await verifier.verify(sign(claims(issuer), RSA))
    assert issuer.counts() == {"jwks": 1}


async def test_discovered_jwks_uri_fetched_once(
    issuer: IssuerServer, make_verifier: MakeVerifier
) -> None:
    """Without jwks_url the discovery document names the keys; it is read once, even when
    the keys are refetched after a rotation."""
    verifier = await make_verifier(second_issuer(issuer, discover=True))
    await verifier.verify(sign(claims(issuer), EC, "ES256"))
    assert issuer.counts() == {"discovery": 1, "jwks": 1}

    issuer.publish(RSA, EC, ROTATED)
    await verifier.verify(sign(claims(issuer), ROTATED))
    assert issuer.counts() == {"discovery": 1, "jwks": 2}


async def test_discovery_naming_another_issuer_is_unavailable(
    make_verifier: MakeVerifier,
) -> None:
    """Discovery §4.3: a document of another issuer is not used; the token cannot be judged."""
    server = IssuerServer([RSA], discovered_issuer="https://mix-up.example")
    try:
        verifier = await make_verifier(second_issuer(server, discover=True))
        for jti in ("first", "second"):
            with pytest.raises(IdPUnavailable):
                await verifier.verify(sign(claims(server, jti=jti), RSA))
        # Within the retry interval after a failed load the issuer is not asked again.
        assert server.counts() == {"discovery": 1}
    finally:
        server.stop()


async def test_unreachable_issuer_is_unavailable(make_verifier: MakeVerifier) -> None:
    """Keys that cannot be fetched make the token unjudgeable: 503, not 401."""
    server = IssuerServer([RSA])
    server.stop()
    verifier = await make_verifier(second_issuer(server))
    with pytest.raises(IdPUnavailable) as info:
        await verifier.verify(sign(claims(server), RSA))
    assert server.issuer in str(info.value)


async def test_failed_refetch_is_unavailable_not_invalid(make_verifier: MakeVerifier) -> None:
    """An unknown kid while the issuer is down may be a rotation we cannot see: 503."""
    server = IssuerServer([RSA])
    verifier = await make_verifier(second_issuer(server))
    await verifier.verify(sign(claims(server), RSA))
    server.stop()
    with pytest.raises(IdPUnavailable):
        await verifier.verify(sign(claims(server), ROTATED))
    # Cached keys still serve tokens they can judge.
    assert await refused(verifier, sign(claims(server, aud="x"), RSA)) == "wrong audience"


async def test_verify_before_start_is_a_programming_error(issuer: IssuerServer) -> None:
    config = BearerConfig.model_validate(second_issuer(issuer))
    verifier = BearerVerifier(config, unstarted_provider(), clock=Clock())
    with pytest.raises(RuntimeError):
        await verifier.verify(sign(claims(issuer), RSA))


# --- the provider's tokens -------------------------------------------------------------------


@pytest.fixture
def idp() -> Iterator[ThreadedIdP]:
    """An IdP of this test alone: rotating its keys must not disturb other tests."""
    server = ThreadedIdP(free_port())
    server.register("http://127.0.0.1:9")
    yield server
    server.stop()


@pytest.fixture
async def provider(idp: ThreadedIdP) -> AsyncIterator[OIDCClient]:
    """A client that has loaded the IdP's metadata and keys."""
    client = unstarted_provider(idp.issuer)
    await client.start()
    await asyncio.wait_for(client.discover_forever(), 10)
    yield client
    await client.close()


async def provider_access_token(client: OIDCClient, user: str = "alice") -> str:
    """An RFC 9068 access token of the provider, by a code-flow login at it."""
    verifier = new_verifier()
    url = client.authorization_url(
        state="state-0123456789", nonce="nonce-0123456789", code_challenge=challenge_s256(verifier)
    )
    async with browser() as s:
        callback = await approve(s, url, user)
    code = parse_qs(URL(callback).query_string)["code"][0]
    return (await client.exchange_code(code, verifier)).access_token


async def test_provider_token_accepted(
    provider: OIDCClient, make_verifier: MakeVerifier, idp: ThreadedIdP
) -> None:
    """`accept_provider_tokens`: the provider's keys, its issuer, audience oidc.client_id."""
    verifier = await make_verifier(
        {"accept_provider_tokens": True}, provider=provider, clock=time.time
    )
    token = await provider_access_token(provider)

    identity = await verifier.verify(token)

    assert (identity.issuer, identity.subject) == (idp.issuer, "alice")
    assert {"openid", "email", "profile"} <= identity.scopes
    assert identity.key == sha256_key(token)


async def test_provider_token_audiences(provider: OIDCClient, make_verifier: MakeVerifier) -> None:
    """`bearer.audiences` replaces oidc.client_id as the audience of provider tokens."""
    verifier = await make_verifier(
        {"accept_provider_tokens": True, "audiences": ["orders-api"]},
        provider=provider,
        clock=time.time,
    )
    assert await refused(verifier, await provider_access_token(provider)) == "wrong audience"


async def test_provider_token_refused_unless_accepted(
    provider: OIDCClient, make_verifier: MakeVerifier, issuer: IssuerServer
) -> None:
    verifier = await make_verifier(second_issuer(issuer), provider=provider, clock=time.time)
    assert await refused(verifier, await provider_access_token(provider)) == "unknown issuer"


async def test_provider_rotation_refetches_its_keys(
    provider: OIDCClient, make_verifier: MakeVerifier, idp: ThreadedIdP
) -> None:
    """A token signed with a key the provider published after start-up: one refetch of the
    provider's JWKS, then it validates."""
    verifier = await make_verifier(
        {"accept_provider_tokens": True}, provider=provider, clock=time.time
    )
    cached = provider.jwks.keys
    kid = idp.call(idp.idp.rotate_signing_key)
    token = await provider_access_token(provider, "bob")
    assert json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"] == kid

    assert (await verifier.verify(token)).subject == "bob"
    assert provider.jwks.keys is not cached


async def test_provider_token_before_discovery_is_unavailable(
    idp: ThreadedIdP, make_verifier: MakeVerifier, provider: OIDCClient
) -> None:
    """Until the provider's metadata loaded, its tokens cannot be judged: 503, not 401."""
    token = await provider_access_token(provider)
    verifier = await make_verifier(
        {"accept_provider_tokens": True}, provider=unstarted_provider(idp.issuer), clock=time.time
    )
    with pytest.raises(IdPUnavailable):
        await verifier.verify(token)


async def test_provider_token_other_key_refused(
    provider: OIDCClient, make_verifier: MakeVerifier, idp: ThreadedIdP
) -> None:
    """A token claiming the provider as issuer but signed elsewhere is refused."""
    verifier = await make_verifier(
        {"accept_provider_tokens": True}, provider=provider, clock=time.time
    )
    now = time.time()
    forged = {"iss": idp.issuer, "sub": "alice", "aud": CLIENT_ID, "iat": now, "exp": now + 60}
    assert await refused(verifier, sign(forged, STRANGER)) == "unknown signing key"
    forged_kid = provider.jwks.keys.keys[0].kid  # type: ignore[union-attr]
    assert await refused(verifier, sign(forged, IMPOSTOR, kid=forged_kid)) == "bad signature"


# --- introspection (RFC 7662) ----------------------------------------------------------------


ACTIVE = {
    "active": True,
    "sub": "svc-reports",
    "client_id": "reports",
    "scope": "reports:read reports:export",
    "exp": NOW + 600,
    "token_type": "Bearer",
}


@pytest.mark.parametrize("secret", [INTROSPECTION_SECRET, None], ids=["basic", "client-id-in-form"])
async def test_introspection_active_token(
    issuer: IssuerServer, make_verifier: MakeVerifier, secret: str | None
) -> None:
    """An active answer gives the identity; the request carries the hint and authenticates
    the sidecar (Basic with a secret, else client_id in the form)."""
    server = issuer if secret else IssuerServer([RSA], secret=None)
    try:
        server.introspect("opaque-0123456789", ACTIVE)
        verifier = await make_verifier({"introspection": with_introspection(server, secret=secret)})
        identity = await verifier.verify("opaque-0123456789")
        form = server.last_introspection_form()
    finally:
        if server is not issuer:
            server.stop()

    assert identity.subject == "svc-reports"
    assert identity.scopes == {"reports:read", "reports:export"}
    assert identity.expires_at == NOW + 600
    assert identity.claims == ACTIVE
    provider_issuer = "https://idp.example.com"  # no iss in the answer: the provider's
    assert identity.issuer == provider_issuer
    assert form["token_type_hint"] == "access_token"
    assert ("client_id" in form) is (secret is None)


async def test_introspection_inactive_token(
    issuer: IssuerServer, make_verifier: MakeVerifier
) -> None:
    verifier = await make_verifier({"introspection": with_introspection(issuer)})
    assert await refused(verifier, "revoked-0123456789") == "token is not active"
    assert await refused(verifier, "revoked-0123456789") == "token is not active"
    assert issuer.counts() == {"introspection": 2}  # failures are not cached


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"sub": None}, "token has no subject"),
        ({"exp": NOW - LEEWAY - 1}, "token expired"),
        ({"nbf": NOW + LEEWAY + 1}, "token not yet valid"),
        ({"token_type": "DPoP"}, "wrong token type"),
        ({"token_type": "refresh_token"}, "wrong token type"),
        ({"aud": "other-api"}, "wrong audience"),
        ({"iss": 7}, "wrong issuer"),
    ],
)
async def test_introspection_answer_checks(
    issuer: IssuerServer, make_verifier: MakeVerifier, changes: dict[str, Any], expected: str
) -> None:
    answer = {k: v for k, v in {**ACTIVE, **changes}.items() if v is not None}
    issuer.introspect("opaque-0123456789", answer)
    verifier = await make_verifier(
        {"introspection": with_introspection(issuer), "audiences": [AUDIENCE]}
    )
    assert await refused(verifier, "opaque-0123456789") == expected


async def test_introspection_aud_ignored_without_audiences(
    issuer: IssuerServer, make_verifier: MakeVerifier
) -> None:
    issuer.introspect("opaque-0123456789", {**ACTIVE, "aud": "other", "iss": "https://as.x"})
    verifier = await make_verifier({"introspection": with_introspection(issuer)})
    identity = await verifier.verify("opaque-0123456789")
    assert identity.issuer == "https://as.x"


async def test_introspection_answer_cached(
    issuer: IssuerServer, make_verifier: MakeVerifier, clock: Clock
) -> None:
    """Two verifies, one introspection; after cache_ttl the endpoint is asked again."""
    issuer.introspect("opaque-0123456789", ACTIVE)
    verifier = await make_verifier({"introspection": with_introspection(issuer, cache_ttl="30s")})
    first = await verifier.verify("opaque-0123456789")
    assert await verifier.verify("opaque-0123456789") is first
    assert issuer.counts() == {"introspection": 1}

    clock.now = NOW + 31
    await verifier.verify("opaque-0123456789")
    assert issuer.counts() == {"introspection": 2}


async def test_introspection_without_exp_lives_cache_ttl(
    issuer: IssuerServer, make_verifier: MakeVerifier, clock: Clock
) -> None:
    issuer.introspect("opaque-0123456789", {k: v for k, v in ACTIVE.items() if k != "exp"})
    verifier = await make_verifier({"introspection": with_introspection(issuer, cache_ttl="1m")})
    assert (await verifier.verify("opaque-0123456789")).expires_at == NOW + 60


async def test_introspection_cache_never_outlives_exp(
    issuer: IssuerServer, make_verifier: MakeVerifier, clock: Clock
) -> None:
    """An answer is reused until min(exp, now + cache_ttl)."""
    issuer.introspect("opaque-0123456789", {**ACTIVE, "exp": NOW + 10})
    verifier = await make_verifier({"introspection": with_introspection(issuer, cache_ttl="5m")})
    await verifier.verify("opaque-0123456789")
    clock.now = NOW + 11
    await verifier.verify("opaque-0123456789")  # within exp's leeway: asked again
    assert issuer.counts() == {"introspection": 2}


async def test_concurrent_verifies_share_one_introspection(
    issuer: IssuerServer, make_verifier: MakeVerifier
) -> None:
    """A burst of requests with one new token asks the endpoint once."""
    issuer.introspect("opaque-0123456789", ACTIVE)
    verifier = await make_verifier({"introspection": with_introspection(issuer)})
    results = await asyncio.gather(*(verifier.verify("opaque-0123456789") for _ in range(20)))
    assert len({id(r) for r in results}) == 1
    assert issuer.counts() == {"introspection": 1}


@pytest.mark.parametrize("failure", ["down", "503", "garbage", "401"])
async def test_introspection_endpoint_failures_are_unavailable(
    issuer: IssuerServer, make_verifier: MakeVerifier, failure: str
) -> None:
    """Unreachable, 5xx, garbage, or refusing our credentials: the token cannot be judged."""
    section = with_introspection(issuer)
    if failure == "down":
        section["endpoint"] = f"http://127.0.0.1:{free_port()}/introspect"
    elif failure == "401":
        section["client_secret"] = "wrong"
    else:
        issuer.fail_introspection(failure)
    verifier = await make_verifier({"introspection": section})
    with pytest.raises(IdPUnavailable) as info:
        await verifier.verify("opaque-0123456789")
    assert "opaque-0123456789" not in str(info.value)


async def test_introspection_answer_without_active_is_unavailable(
    issuer: IssuerServer, make_verifier: MakeVerifier
) -> None:
    issuer.introspect("opaque-0123456789", {"sub": "x", "active": "true"})
    verifier = await make_verifier({"introspection": with_introspection(issuer)})
    with pytest.raises(IdPUnavailable):
        await verifier.verify("opaque-0123456789")


async def test_jwt_of_unknown_issuer_falls_back_to_introspection(
    issuer: IssuerServer, make_verifier: MakeVerifier
) -> None:
    """A JWT whose issuer is not configured locally may still be the introspecting AS's."""
    token = sign(claims(issuer, iss="https://as.example"), STRANGER)
    issuer.introspect(token, {**ACTIVE, "iss": "https://as.example"})
    verifier = await make_verifier(
        {**second_issuer(issuer), "introspection": with_introspection(issuer)}
    )
    identity = await verifier.verify(token)
    assert (identity.issuer, identity.subject) == ("https://as.example", "svc-reports")
    assert issuer.counts() == {"introspection": 1}
    # A JWT of a known issuer is never sent anywhere: it is judged locally.
    assert await refused(verifier, sign(claims(issuer), IMPOSTOR)) == "bad signature"
    assert issuer.counts() == {"introspection": 1, "jwks": 1}


# --- the identity cache ----------------------------------------------------------------------


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every signature check (`joserfc.jwt.decode`) the verifier makes."""
    calls: list[str] = []
    real = jwt.decode

    def counting(value: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(value))
        return real(value, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return calls


async def test_cache_hit_does_not_verify_again(
    issuer: IssuerServer, make_verifier: MakeVerifier, decodes: list[str]
) -> None:
    verifier = await make_verifier(second_issuer(issuer))
    token = sign(claims(issuer), RSA)
    first = await verifier.verify(token)
    for _ in range(3):
        assert await verifier.verify(token) is first
    assert len(decodes) == 1
    assert issuer.counts() == {"jwks": 1}


async def test_expired_cached_token_refused(
    issuer: IssuerServer, make_verifier: MakeVerifier, decodes: list[str], clock: Clock
) -> None:
    """A cached identity is used until the token's exp; within the leeway after it the token
    is verified each time (and not cached); past the leeway it is refused."""
    verifier = await make_verifier(second_issuer(issuer))
    token = sign(claims(issuer, exp=NOW + 100), RSA)
    await verifier.verify(token)
    clock.now = NOW + 99
    await verifier.verify(token)
    assert len(decodes) == 1

    clock.now = NOW + 101
    await verifier.verify(token)
    await verifier.verify(token)
    assert len(decodes) == 3

    clock.now = NOW + 100 + LEEWAY + 1
    assert await refused(verifier, token) == "token expired"


async def test_cache_is_bounded_oldest_goes(
    issuer: IssuerServer, make_verifier: MakeVerifier, decodes: list[str]
) -> None:
    verifier = await make_verifier({**second_issuer(issuer), "cache_max_entries": 2})
    tokens = [sign(claims(issuer, jti=f"jti-{i}"), RSA) for i in range(3)]
    for token in tokens:
        await verifier.verify(token)
    assert len(decodes) == 3
    await verifier.verify(tokens[2])
    await verifier.verify(tokens[1])
    assert len(decodes) == 3  # the two newest are still cached
    await verifier.verify(tokens[0])
    assert len(decodes) == 4  # the oldest was evicted


async def test_failures_are_not_cached(
    issuer: IssuerServer, make_verifier: MakeVerifier, decodes: list[str]
) -> None:
    verifier = await make_verifier(second_issuer(issuer))
    token = sign(claims(issuer, aud="other"), RSA)
    for _ in range(2):
        assert await refused(verifier, token) == "wrong audience"
    assert len(decodes) == 2


async def test_disabled_section() -> None:
    verifier = BearerVerifier(BearerConfig(), unstarted_provider())
    assert not verifier.enabled


# --- garbage never escapes as anything else --------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_CLAIM_NAMES = st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "iat", "scope", "scp"])


@st.composite
def _odd_signed(draw: st.DrawFn, server: IssuerServer) -> str:
    """A properly signed token whose claims are valid ones with some replaced by odd JSON."""
    body = claims(server)
    for name in draw(st.lists(_CLAIM_NAMES, min_size=1, max_size=4, unique=True)):
        body[name] = draw(_JSON)
    header: dict[str, Any] = draw(
        st.dictionaries(st.sampled_from(["typ", "crit", "kid", "x5u"]), _JSON)
    )
    return sign(body, RSA, "RS256", **header)


@st.composite
def _mutated(draw: st.DrawFn, token: str) -> str:
    """A valid token with characters of its header or payload replaced (a signature's last
    character may be changed in unused bits only, which would still verify)."""
    chars = list(token)
    end = token.rindex(".")
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, end - 1))
        chars[at] = draw(st.sampled_from("AaZz09-_.=+/ "))
    result = "".join(chars)
    return result if result != token else result + "x"


def test_garbage_raises_only_invalid_bearer_token() -> None:
    """Whatever arrives as a bearer token, with every path configured (a second issuer and
    introspection that says inactive), the only outcome is `InvalidBearerToken`."""
    server = IssuerServer([RSA, EC])
    clock = Clock()
    section = {**second_issuer(server), "introspection": with_introspection(server)}
    valid = sign(claims(server), RSA)
    try:
        with asyncio.Runner() as runner:
            verifier = BearerVerifier(
                BearerConfig.model_validate(section), unstarted_provider(), clock=clock
            )
            runner.run(verifier.start())
            assert runner.run(verifier.verify(valid)).subject == "svc-billing"

            def check(token: str) -> None:
                try:
                    identity = runner.run(verifier.verify(token))
                except InvalidBearerToken:
                    return
                # The one body that may pass: the odd claims happened to be valid ones.
                assert identity.subject and identity.expires_at >= NOW - LEEWAY

            @settings(
                max_examples=300,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            )
            @given(
                token=st.text(max_size=200)
                | st.from_regex(r"[A-Za-z0-9_-]{0,40}\.[A-Za-z0-9_-]{0,60}\.[A-Za-z0-9_-]{0,20}")
                | st.from_regex(r"[A-Za-z0-9\-._~+/]{1,80}=*", fullmatch=True)
                | _mutated(valid)
                | _odd_signed(server)
            )
            def garbage(token: str) -> None:
                check(token)

            garbage()
            runner.run(verifier.close())
    finally:
        server.stop()
