"""Back-Channel Logout 1.0 logout tokens (§2.4, §2.6): each validation rule broken alone,
the replay window, garbage that never escapes as another exception, and key rotation
through `OIDCClient`."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc.errors import InvalidKeyIdError
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey
from joserfc.jws import JWSRegistry

from sidecar.config import OIDCConfig
from sidecar.errors import IdPUnavailable, InvalidLogoutToken
from sidecar.health import Readiness
from sidecar.oidc import LogoutClaims, OIDCClient, UnknownLogoutKey, validate_logout_token
from sidecar.oidc.id_token import LEEWAY
from sidecar.oidc.logout_token import LOGOUT_EVENT, MAX_AGE, MAX_LIFETIME, MAX_TOKEN_LENGTH
from tests.support.idp import CLIENT_ID, CLIENT_SECRET, ThreadedIdP
from tests.support.ports import free_port

ISSUER = "https://idp.example.com"
CLIENT = "app"
NOW = 1_700_000_000.0
DROP = object()  # a claim or header member to leave out

RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
EC = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
IMPOSTOR = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})  # RSA's kid, another key
STRANGER = RSAKey.generate_key(2048, parameters={"kid": "unpublished"})
SHARED = OctKey.import_key(b"a-shared-secret-of-thirty-two-b!", parameters={"kid": "oct-1"})
KEYS = KeySet.import_key_set({"keys": [RSA.as_dict(private=False), EC.as_dict(private=False)]})
ALGORITHMS = ("RS256", "ES256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign_raw(header: dict[str, Any], payload: bytes, key: Any, alg: str) -> str:
    """A compact JWS over exactly these bytes: no library checks on header or claims."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(payload)}"
    signature = JWSRegistry.algorithms[alg].sign(signing_input.encode("ascii"), key)
    return f"{signing_input}.{b64(signature)}"


def claims(**changes: Any) -> dict[str, Any]:
    """A valid §2.4 claim set at NOW, with `changes` applied (DROP removes a claim)."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": CLIENT,
        "iat": NOW - 5,
        "exp": NOW + 115,
        "jti": "jti-0123456789",
        "sid": "sid-0123456789",
        "events": {LOGOUT_EVENT: {}},
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


def sign(body: dict[str, Any], *, key: Any = RSA, alg: str = "RS256", **header: Any) -> str:
    """`body` signed by `key`; header defaults: `alg`, the key's `kid`, `typ: logout+jwt`."""
    head = {"alg": alg, "kid": key.kid, "typ": "logout+jwt", **header}
    head = {k: v for k, v in head.items() if v is not DROP}
    return sign_raw(head, json.dumps(body).encode(), key, alg)


def validate(
    token: str,
    *,
    now: float = NOW,
    keys: KeySet = KEYS,
    algorithms: tuple[str, ...] = ALGORITHMS,
) -> LogoutClaims:
    return validate_logout_token(
        token, keys, issuer=ISSUER, client_id=CLIENT, now=now, algorithms=algorithms
    )


def reason_of(token: str, **options: Any) -> str:
    """The `reason` the token is refused with; its message must not echo the token."""
    with pytest.raises(InvalidLogoutToken) as info:
        validate(token, **options)
    message = str(info.value)
    assert not any(len(part) >= 4 and part in message for part in token.split("."))
    return info.value.reason


# --- valid tokens -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "subject", "sid"),
    [
        ({}, None, "sid-0123456789"),
        ({"sid": DROP, "sub": "alice"}, "alice", None),
        ({"sub": "alice"}, "alice", "sid-0123456789"),
    ],
    ids=["sid-only", "sub-only", "both"],
)
def test_valid_token_gives_its_claims(changes: dict[str, Any], subject: str, sid: str) -> None:
    """§2.4: sub, sid or both; the claims come back as they were sent."""
    result = validate(sign(claims(**changes)))
    assert result == LogoutClaims(
        issuer=ISSUER,
        subject=subject,
        sid=sid,
        jti="jti-0123456789",
        remember_until=NOW + 115 + LEEWAY,
    )


@pytest.mark.parametrize(
    "typ", ["logout+jwt", "LOGOUT+JWT", "application/logout+jwt", "JWT", "jwt", DROP]
)
def test_accepted_typ(typ: Any) -> None:
    """§2.4 explicit typing is recommended, not required: plain JWT or no typ pass too."""
    assert validate(sign(claims(), typ=typ)).sid == "sid-0123456789"


def test_ec_key_and_other_claims() -> None:
    """ES256 verifies; claims the RP does not understand are ignored (§2.4)."""
    token = sign(claims(extra={"x": [1, 2]}, scope="openid"), key=EC, alg="ES256")
    assert validate(token).jti == "jti-0123456789"


@pytest.mark.parametrize(
    "changes",
    [
        {"aud": ["other", CLIENT]},
        {"iat": NOW + LEEWAY},
        {"exp": NOW - LEEWAY},
        {"exp": DROP, "iat": NOW - MAX_AGE},
        {"jti": "j" * 256},
        {"events": {LOGOUT_EVENT: {"extra": 1}, "http://other.example/event": {}}},
        {"iat": int(NOW), "exp": int(NOW) + 60},
    ],
    ids=[
        "aud-list",
        "iat-at-leeway",
        "exp-at-leeway",
        "no-exp-at-max-age",
        "jti-256",
        "events-more",
        "int-times",
    ],
)
def test_edges_accepted(changes: dict[str, Any]) -> None:
    """The limits themselves are inside the rules."""
    validate(sign(claims(**changes)))


# --- each §2.6 rule alone ---------------------------------------------------------------

_VIOLATIONS: list[tuple[str, dict[str, Any], str]] = [
    ("iss-other", {"iss": "https://evil.example.com"}, "issuer"),
    ("iss-slash", {"iss": ISSUER + "/"}, "issuer"),
    ("iss-missing", {"iss": DROP}, "issuer"),
    ("aud-other", {"aud": "other"}, "audience"),
    ("aud-list-without", {"aud": ["other", "app2"]}, "audience"),
    ("aud-missing", {"aud": DROP}, "audience"),
    ("iat-missing", {"iat": DROP}, "iat"),
    ("iat-future", {"iat": NOW + LEEWAY + 1}, "iat"),
    ("iat-bool", {"iat": True}, "iat"),
    ("iat-string", {"iat": str(int(NOW))}, "iat"),
    ("iat-nan", {"iat": float("nan")}, "iat"),
    ("iat-huge", {"iat": -(10**400)}, "iat"),
    ("iat-too-old-without-exp", {"exp": DROP, "iat": NOW - MAX_AGE - LEEWAY - 1}, "iat"),
    ("iat-beyond-lifetime", {"iat": NOW - MAX_LIFETIME - 1, "exp": NOW + 3600}, "iat"),
    ("exp-past", {"exp": NOW - LEEWAY - 1}, "exp"),
    ("exp-string", {"exp": "soon"}, "exp"),
    ("exp-bool", {"exp": False}, "exp"),
    ("exp-null", {"exp": None}, "exp"),
    ("exp-infinite", {"exp": float("inf")}, "exp"),
    ("events-missing", {"events": DROP}, "events"),
    ("events-list", {"events": [LOGOUT_EVENT]}, "events"),
    ("events-string", {"events": LOGOUT_EVENT}, "events"),
    ("events-empty", {"events": {}}, "events"),
    ("events-other", {"events": {"http://schemas.openid.net/event/other": {}}}, "events"),
    ("event-value-string", {"events": {LOGOUT_EVENT: "yes"}}, "events"),
    ("event-value-list", {"events": {LOGOUT_EVENT: []}}, "events"),
    ("event-value-null", {"events": {LOGOUT_EVENT: None}}, "events"),
    ("no-sub-no-sid", {"sid": DROP}, "subject"),
    ("sid-empty", {"sid": ""}, "subject"),
    ("sid-number", {"sid": 7}, "subject"),
    ("sub-null", {"sub": None}, "subject"),
    ("sub-empty-with-sid", {"sub": ""}, "subject"),
    ("nonce", {"nonce": "n-0123"}, "nonce"),
    ("nonce-null", {"nonce": None}, "nonce"),
    ("jti-missing", {"jti": DROP}, "jti"),
    ("jti-empty", {"jti": ""}, "jti"),
    ("jti-number", {"jti": 12345}, "jti"),
    ("jti-too-long", {"jti": "j" * 257}, "jti"),
]


@pytest.mark.parametrize(
    ("changes", "reason"), [v[1:] for v in _VIOLATIONS], ids=[v[0] for v in _VIOLATIONS]
)
def test_each_claim_rule_alone(changes: dict[str, Any], reason: str) -> None:
    """§2.6: one broken claim is enough to refuse the token, under its own label."""
    assert reason_of(sign(claims(**changes))) == reason


@pytest.mark.parametrize("typ", ["at+jwt", "application/jwt", "JOSE", "id_token+jwt", ""])
def test_other_typ_refused(typ: str) -> None:
    """§2.4 explicit typing: another kind of JWT from the same IdP is not a logout token."""
    assert reason_of(sign(claims(), typ=typ)) == "typ"


def test_hs256_with_shared_secret_refused() -> None:
    """HMAC is refused even when advertised and the secret is in the key set."""
    keys = KeySet([*KEYS.keys, SHARED])
    token = sign(claims(), key=SHARED, alg="HS256")
    assert reason_of(token, keys=keys, algorithms=(*ALGORITHMS, "HS256")) == "signature"


def test_hs256_with_public_key_as_secret_refused() -> None:
    """Algorithm confusion: an HMAC over the RSA public key (known to all) does not pass."""
    header = b64(json.dumps({"alg": "HS256", "kid": "rsa-1", "typ": "logout+jwt"}).encode())
    signing_input = f"{header}.{b64(json.dumps(claims()).encode())}"
    mac = hmac.new(RSA.as_pem(private=False), signing_input.encode(), hashlib.sha256)
    token = f"{signing_input}.{b64(mac.digest())}"
    assert reason_of(token) == "signature"


@pytest.mark.parametrize("signature", ["", "c2lnbmF0dXJl"])
def test_alg_none_refused(signature: str) -> None:
    """§2.6: `none` MUST NOT be used, even when listed by the IdP."""
    header = b64(json.dumps({"alg": "none", "typ": "logout+jwt"}).encode())
    token = f"{header}.{b64(json.dumps(claims()).encode())}.{signature}"
    assert reason_of(token, algorithms=("none", *ALGORITHMS)) == "signature"


def test_alg_not_advertised_refused() -> None:
    """Only algorithms the IdP advertises (and we allow) are accepted."""
    token = sign(claims(), key=EC, alg="ES256")
    assert reason_of(token, algorithms=("RS256",)) == "signature"


@pytest.mark.parametrize("alg", [DROP, 5, ["RS256"], "rs256"])
def test_missing_or_odd_alg_refused(alg: Any) -> None:
    header = {"kid": "rsa-1", "typ": "logout+jwt"} | ({} if alg is DROP else {"alg": alg})
    token = sign_raw(header, json.dumps(claims()).encode(), RSA, "RS256")
    assert reason_of(token) == "signature"


def test_same_kid_other_key_refused() -> None:
    """A key that merely claims a published kid does not verify."""
    assert reason_of(sign(claims(), key=IMPOSTOR)) == "signature"


def test_key_type_mismatch_refused() -> None:
    """An ES256 token naming an RSA kid is a signature failure, not a crash."""
    token = sign(claims(), key=EC, alg="ES256", kid="rsa-1")
    assert reason_of(token) == "signature"


def test_unknown_kid_asks_for_a_refetch() -> None:
    """An unknown kid is its own subclass so the caller can refetch the JWKS once."""
    with pytest.raises(UnknownLogoutKey) as info:
        validate(sign(claims(), key=STRANGER))
    assert isinstance(info.value, InvalidLogoutToken)
    assert info.value.reason == "signature"
    assert info.value.status == 400 and info.value.code == "invalid_request"


# --- malformed ------------------------------------------------------------------------


def _segments(header: Any, payload: bytes = b"{}") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(payload)}.c2ln"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "a.b.c.d.e",
        "ñ.ñ.ñ",
        "eyJ.eyJ.sig=",
        " " + sign(claims()),
        sign(claims()) + "\n",
        "e.e.e",
        f"{b64(b'not json')}.{b64(b'{}')}.c2ln",
        _segments(["alg", "RS256"]),
        _segments({"alg": "RS256", "kid": 5}),
        _segments({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"], "exp": 1}),
        f"{b64(b'[' * 2000)}.{b64(b'{}')}.c2ln",
    ],
)
def test_malformed(token: str) -> None:
    """Not a compact JWS, or its header is not a usable JSON object."""
    assert reason_of(token) == "malformed"


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b'"claims"', b"[" * 5000])
def test_signed_payload_not_an_object(payload: bytes) -> None:
    """A correctly signed token whose payload is no JSON object is garbage."""
    token = sign_raw({"alg": "RS256", "kid": "rsa-1"}, payload, RSA, "RS256")
    assert reason_of(token) == "malformed"


def test_oversized_token_refused_before_decoding() -> None:
    """More than 16 KiB is refused as it stands, even when correctly signed."""
    token = sign(claims(padding="x" * MAX_TOKEN_LENGTH))
    assert len(token) > MAX_TOKEN_LENGTH
    assert reason_of(token) == "malformed"


# --- the replay window ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"exp": NOW + 115}, NOW + 115 + LEEWAY),
        ({"exp": NOW - 30}, NOW - 30 + LEEWAY),
        ({"exp": DROP, "iat": NOW - 5}, NOW - 5 + MAX_AGE + LEEWAY),
        ({"exp": NOW + 10 * 86400, "iat": NOW - 5}, NOW - 5 + MAX_LIFETIME),
        ({"exp": NOW + 10 * 86400, "iat": NOW - MAX_LIFETIME}, NOW),
    ],
    ids=["exp", "exp-in-leeway", "no-exp", "far-exp-capped", "capped-at-now"],
)
def test_remember_until(changes: dict[str, Any], expected: float) -> None:
    """exp (or iat + MAX_AGE) plus LEEWAY, never later than iat + one day."""
    assert validate(sign(claims(**changes))).remember_until == expected


@settings(max_examples=300, deadline=None)
@given(
    iat=st.floats(-2 * MAX_LIFETIME, 2 * LEEWAY),
    exp=st.none() | st.floats(-2 * MAX_LIFETIME, 20 * MAX_LIFETIME),
)
def test_accepted_token_is_remembered_while_acceptable(iat: float, exp: float | None) -> None:
    """Whenever a token is accepted, its jti is still to be remembered, and for no longer
    than one day after iat: a replay cache keyed on remember_until sees every replay."""
    body = claims(iat=NOW + iat, exp=DROP if exp is None else NOW + exp)
    try:
        result = validate(sign(body, key=EC, alg="ES256"))
    except InvalidLogoutToken as exc:
        assert exc.reason in {"iat", "exp"}
        return
    assert NOW <= result.remember_until <= NOW + iat + MAX_LIFETIME


# --- garbage never escapes as another exception -----------------------------------------

VALID = sign(claims())
_B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _only_invalid_logout_token(token: str) -> None:
    """Valid or refused with `InvalidLogoutToken`; any other exception fails the test."""
    try:
        validate(token)
    except InvalidLogoutToken as exc:
        message = str(exc)
        assert not any(len(part) >= 8 and part in message for part in token.split("."))


_garbage = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    st.text(alphabet=_B64_ALPHABET + ".", max_size=300),
    st.lists(st.binary(max_size=120).map(b64), min_size=1, max_size=6).map(".".join),
    st.tuples(st.binary(max_size=200), st.binary(max_size=200), st.binary(max_size=80)).map(
        lambda parts: ".".join(b64(p) for p in parts)
    ),
)


@settings(max_examples=1000, deadline=None)
@given(token=_garbage)
def test_garbage_raises_only_invalid_logout_token(token: str) -> None:
    _only_invalid_logout_token(token)


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    token = VALID
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "delete", "insert", "swap", "dup"]))
        if not token:
            break
        at = draw(st.integers(0, len(token) - 1))
        if kind == "flip":
            char = draw(st.sampled_from(_B64_ALPHABET + ".=+/ \x00é"))
            token = token[:at] + char + token[at + 1 :]
        elif kind == "truncate":
            token = token[:at]
        elif kind == "delete":
            token = token[:at] + token[at + 1 :]
        elif kind == "insert":
            token = token[:at] + draw(st.text(max_size=4)) + token[at:]
        else:
            parts = token.split(".")
            i = draw(st.integers(0, len(parts) - 1))
            j = draw(st.integers(0, len(parts) - 1))
            if kind == "swap":
                parts[i], parts[j] = parts[j], parts[i]
            else:
                parts.insert(i, parts[j])
            token = ".".join(parts)
    return token


@settings(max_examples=1000, deadline=None)
@given(token=_mutated())
def test_mutated_token_raises_only_invalid_logout_token(token: str) -> None:
    _only_invalid_logout_token(token)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300)
    | st.floats()
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
_claim_names = st.sampled_from(
    ["iss", "aud", "iat", "exp", "sub", "sid", "jti", "events", "nonce", "nbf", "x"]
)
_header_names = st.sampled_from(["alg", "kid", "typ", "crit", "cty", "jku", "x5c", "b64", "zip"])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    claim_changes=st.dictionaries(_claim_names, _json, max_size=3),
    header_changes=st.dictionaries(_header_names, _json, max_size=2),
)
def test_signed_odd_json_raises_only_invalid_logout_token(
    claim_changes: dict[str, Any], header_changes: dict[str, Any]
) -> None:
    """Correctly signed, so every claim and header check is reached with odd JSON values."""
    header = {"alg": "ES256", "kid": "ec-1", "typ": "logout+jwt", **header_changes}
    token = sign_raw(header, json.dumps(claims(**claim_changes)).encode(), EC, "ES256")
    try:
        result = validate(token)
    except InvalidLogoutToken:
        return
    assert result.remember_until >= NOW


# --- OIDCClient: key rotation -----------------------------------------------------------


@pytest.fixture
def idp() -> Iterator[ThreadedIdP]:
    """An IdP of this test alone: rotating its keys must not disturb other tests."""
    server = ThreadedIdP(free_port())
    yield server
    server.stop()


def _client(issuer: str) -> OIDCClient:
    config = OIDCConfig(issuer=issuer, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    return OIDCClient(config, "http://127.0.0.1:9/oauth2/callback", 5.0, Readiness())


@pytest.fixture
async def client(idp: ThreadedIdP) -> AsyncIterator[OIDCClient]:
    """A client that has loaded the IdP's metadata and keys."""
    oidc = _client(idp.issuer)
    await oidc.start()
    await asyncio.wait_for(oidc.discover_forever(), 10)
    yield oidc
    await oidc.close()


async def test_client_accepts_rotated_key_after_one_refetch(
    client: OIDCClient, idp: ThreadedIdP
) -> None:
    """A logout token signed with a key published after start-up validates: the unknown kid
    triggers one JWKS refetch, then the retry succeeds."""
    cached = client.jwks.keys
    assert cached is not None
    kid = idp.call(idp.idp.rotate_signing_key)
    token = idp.call(lambda: idp.idp.backchannel_logout_token(CLIENT_ID, sid="sid-rotated"))
    with pytest.raises(InvalidKeyIdError):
        cached.get_by_kid(kid)

    result = await client.validate_logout_token(token)

    assert (result.issuer, result.sid, result.subject) == (idp.issuer, "sid-rotated", None)
    assert client.jwks.keys is not cached
    assert client.jwks.keys.get_by_kid(kid)


async def test_client_unknown_kid_after_refetch_raises(
    client: OIDCClient, idp: ThreadedIdP
) -> None:
    """A kid the refetched JWKS still lacks is refused; a second try within the refetch
    interval does not fetch again and is refused the same way."""
    now = time.time()
    body = claims(iss=idp.issuer, aud=CLIENT_ID, iat=now, exp=now + 60)
    token = sign(body, key=STRANGER)
    cached = client.jwks.keys

    with pytest.raises(UnknownLogoutKey):
        await client.validate_logout_token(token)
    refetched = client.jwks.keys
    assert refetched is not cached  # one refetch happened

    with pytest.raises(UnknownLogoutKey):
        await client.validate_logout_token(token)
    assert client.jwks.keys is refetched  # rate-limited: refetch said no, error re-raised


async def test_client_without_keys_is_unavailable() -> None:
    """Before discovery has loaded keys, a logout token cannot be judged: 503, not 400."""
    oidc = _client("https://idp.example.com")
    with pytest.raises(IdPUnavailable):
        await oidc.validate_logout_token(VALID)
