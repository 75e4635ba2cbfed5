"""Session sealing, records and both stores; the Redis store against a real server."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
import redis.asyncio as redis

from sidecar.config import SessionConfig
from sidecar.redis.store import RedisSessionStore
from sidecar.session import (
    Keyring,
    PendingLogin,
    SealError,
    SessionManager,
    SessionRecord,
    new_session_id,
    session_hash,
)
from tests.support.keys import KEY_A, KEY_B
from tests.support.records import ACCESS, REFRESH, record
from tests.support.stores import REDIS_URL


def session_config(*keys: str) -> SessionConfig:
    return SessionConfig(encryption_keys=list(keys or (KEY_A,)))  # type: ignore[arg-type]


class TestKeyring:
    def test_round_trip(self) -> None:
        """What is sealed for one session id opens with the same id."""
        ring = Keyring.from_base64([KEY_A])
        sealed = ring.seal(b"id", b"h", b"secret data")
        assert ring.open(b"id", b"h", sealed) == (b"secret data", False)

    def test_other_session_id_cannot_open(self) -> None:
        """The master key alone opens nothing: the per-session key needs the cookie's id."""
        ring = Keyring.from_base64([KEY_A])
        sealed = ring.seal(b"id-1", b"h", b"secret data")
        with pytest.raises(SealError):
            ring.open(b"id-2", b"h", sealed)

    def test_binding_is_authenticated(self) -> None:
        """A blob moved under another Redis key (other hash) does not open."""
        ring = Keyring.from_base64([KEY_A])
        sealed = ring.seal(b"id", b"h1", b"data")
        with pytest.raises(SealError):
            ring.open(b"id", b"h2", sealed)

    @pytest.mark.parametrize("cut", [1, 5, 20])
    def test_tampered_or_truncated(self, cut: int) -> None:
        """A flipped bit or a truncated envelope is refused, never half-decrypted."""
        ring = Keyring.from_base64([KEY_A])
        sealed = bytearray(ring.seal(b"id", b"h", b"data" * 10))
        flipped = (
            bytes(sealed[:-cut])
            + bytes([sealed[-cut] ^ 1])
            + bytes(sealed[len(sealed) - cut + 1 :])
        )
        with pytest.raises(SealError):
            ring.open(b"id", b"h", flipped)
        with pytest.raises(SealError):
            ring.open(b"id", b"h", bytes(sealed[:-cut]))

    def test_rotation(self) -> None:
        """After rotation the old key still opens, and says the record wants resealing."""
        old = Keyring.from_base64([KEY_A]).seal(b"id", b"h", b"data")
        rotated = Keyring.from_base64([KEY_B, KEY_A])
        assert rotated.open(b"id", b"h", old) == (b"data", True)
        assert rotated.open(b"id", b"h", rotated.seal(b"id", b"h", b"data")) == (b"data", False)
        with pytest.raises(SealError):
            Keyring.from_base64([KEY_B]).open(b"id", b"h", old)

    def test_nonces_differ(self) -> None:
        """Two seals of the same data differ (fresh random nonce each time)."""
        ring = Keyring.from_base64([KEY_A])
        assert ring.seal(b"id", b"h", b"d") != ring.seal(b"id", b"h", b"d")


def test_session_ids_and_hashes() -> None:
    """Ids are 256-bit URL-safe strings; the hash is stable and reveals nothing of the id."""
    ids = {new_session_id() for _ in range(100)}
    assert len(ids) == 100
    sid = ids.pop()
    assert len(sid) == 43 and len(base64.urlsafe_b64decode(sid + "=")) == 32
    assert session_hash(sid) == session_hash(sid) != sid


class TestManager:
    async def test_create_load_delete(self, store) -> None:  # type: ignore[no-untyped-def]
        """A created session loads back equal, and is gone after delete."""
        sessions = SessionManager(store, Keyring.from_base64([KEY_A]), session_config())
        created = await sessions.create(record())
        loaded = await sessions.load(created.id)
        assert loaded is not None and loaded.record == created.record
        await sessions.delete(loaded)
        assert await sessions.load(created.id) is None

    @pytest.mark.parametrize(
        "cookie", ["", "short", "x" * 43, "x" * 500, "../../etc", new_session_id()]
    )
    async def test_unusable_cookies(self, store, cookie: str) -> None:  # type: ignore[no-untyped-def]
        """Malformed, unknown or oversized cookie values are simply no session."""
        sessions = SessionManager(store, Keyring.from_base64([KEY_A]), session_config())
        await sessions.create(record())
        assert await sessions.load(cookie) is None

    async def test_expired_record_is_no_session(self, store) -> None:  # type: ignore[no-untyped-def]
        """A record past its absolute expiry does not load."""
        sessions = SessionManager(store, Keyring.from_base64([KEY_A]), session_config())
        created = await sessions.create(record(expires_at=time.time() + 0.05))
        await asyncio.sleep(0.1)
        assert await sessions.load(created.id) is None

    async def test_fenced_save(self, store) -> None:  # type: ignore[no-untyped-def]
        """A save succeeds once per version, and never brings a deleted session back."""
        sessions = SessionManager(store, Keyring.from_base64([KEY_A]), session_config())
        created = await sessions.create(record())
        newer = created.record.evolve(version=2, access_token="new")
        assert await sessions.save(created, newer)
        assert not await sessions.save(created, newer.evolve(version=3))  # stale version
        loaded = await sessions.load(created.id)
        assert loaded is not None and loaded.record.access_token == "new"
        await sessions.delete(loaded)
        assert not await sessions.save(loaded, newer.evolve(version=3))
        assert await sessions.load(created.id) is None

    async def test_key_rotation_reseals_on_load(self, store) -> None:  # type: ignore[no-untyped-def]
        """With a new first key, an old record still loads and is resealed under the new key."""
        old = SessionManager(store, Keyring.from_base64([KEY_A]), session_config(KEY_A))
        created = await old.create(record())
        rotated = SessionManager(store, Keyring.from_base64([KEY_B, KEY_A]), session_config())
        assert (await rotated.load(created.id)) is not None
        only_new = SessionManager(store, Keyring.from_base64([KEY_B]), session_config())
        loaded = await only_new.load(created.id)
        assert loaded is not None and loaded.record == created.record

    async def test_pending_login_is_one_use(self, store) -> None:  # type: ignore[no-untyped-def]
        """A pending login is returned once; the second take finds nothing."""
        sessions = SessionManager(store, Keyring.from_base64([KEY_A]), session_config())
        login = PendingLogin("verifier", "nonce", "/back", "hash", time.time())
        await sessions.put_login("state-1", login, keep=5)
        assert await sessions.take_login("state-2") is None
        assert await sessions.take_login("state-1") == login
        assert await sessions.take_login("state-1") is None


async def test_redis_holds_no_plaintext(redis_prefix: str) -> None:
    """A scan of every key the store wrote finds neither tokens nor the session id."""
    store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    sessions = SessionManager(store, Keyring.from_base64([KEY_A]), session_config())
    created = await sessions.create(record())
    await sessions.put_login(
        "some-state", PendingLogin("verif-xyz", "n", "/", "h", time.time()), keep=5
    )
    client = redis.Redis.from_url(REDIS_URL)
    dump = b""
    async for key in client.scan_iter(match=f"{redis_prefix}:*"):
        dump += key
        kind = await client.type(key)
        if kind == b"hash":
            dump += b"".join(k + v for k, v in (await client.hgetall(key)).items())
        elif kind == b"string":
            dump += await client.get(key) or b""
        elif kind == b"zset":
            dump += b"".join(await client.zrange(key, 0, -1))
    await client.aclose()
    await store.close()
    assert dump
    for secret in (
        ACCESS,
        REFRESH,
        created.id,
        "id.token.value",
        "verif-xyz",
        "some-state",
        "alice",
    ):
        assert secret.encode() not in dump
    assert session_hash(created.id).encode() in dump  # keys use the hash, as designed


async def test_redis_ttl_follows_session_expiry(redis_prefix: str) -> None:
    """The Redis key expires with the session's remaining lifetime."""
    store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    sessions = SessionManager(store, Keyring.from_base64([KEY_A]), session_config())
    created = await sessions.create(record(expires_at=time.time() + 120))
    client = redis.Redis.from_url(REDIS_URL)
    ttl = await client.pttl(f"{redis_prefix}:s:{{{created.h}}}")
    await client.aclose()
    await store.close()
    assert 110_000 < ttl <= 120_000


async def test_redis_down_is_store_unavailable() -> None:
    """An unreachable Redis raises the sidecar's StoreUnavailable, not a redis exception."""
    from sidecar.errors import StoreUnavailable

    store = RedisSessionStore.from_url("redis://127.0.0.1:1/0", "x")
    with pytest.raises(StoreUnavailable):
        await store.get("h")
    await store.close()


async def test_redis_index_lists_session_and_expires_with_it(redis_prefix: str) -> None:
    """The per-user and per-sid indexes hold the session hash and expire with the session."""
    store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    sessions = SessionManager(store, Keyring.from_base64([KEY_A]), session_config())
    created = await sessions.create(record(expires_at=time.time() + 300))
    from sidecar.session.manager import idp_session_ref

    ref = idp_session_ref("https://idp.example", "sid-1")
    assert list(await store.indexed(ref)) == [created.h]
    client = redis.Redis.from_url(REDIS_URL)
    ttl = await client.ttl(f"{redis_prefix}:{ref}")
    await sessions.delete(created)
    assert await store.indexed(ref) == {}
    await client.aclose()
    await store.close()
    assert 290 < ttl <= 302


async def test_idle_timeout_caps_ttl_and_use_extends_it(redis_prefix: str) -> None:
    """With an idle timeout the record lives that long unless used; a use pushes it out."""
    store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    config = SessionConfig(encryption_keys=[KEY_A], idle_timeout="10s")  # type: ignore[arg-type]
    sessions = SessionManager(store, Keyring.from_base64([KEY_A]), config)
    created = await sessions.create(record(expires_at=time.time() + 3600))
    client = redis.Redis.from_url(REDIS_URL)
    key = f"{redis_prefix}:s:{{{created.h}}}"
    assert 9_000 < await client.pttl(key) <= 10_000
    await client.pexpire(key, 5_000)  # as if 5 s had passed unused
    assert await sessions.load(created.id) is not None
    assert 9_000 < await client.pttl(key) <= 10_000
    await client.aclose()
    await store.close()


async def test_redis_layout_is_one_compact_string(redis_prefix: str) -> None:
    """`<version>:<sealed>` under p:s:{h}; the attempt mark only around a refresh."""
    store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    sessions = SessionManager(store, Keyring.from_base64([KEY_A]), session_config())
    client = redis.Redis.from_url(REDIS_URL)
    try:
        plain = record(access_token="a" * 800, id_token="i" * 900)
        created = await sessions.create(plain)
        key = f"{redis_prefix}:s:{{{created.h}}}"
        mark = f"{redis_prefix}:a:{{{created.h}}}"
        assert await client.type(key) == b"string"
        value = await client.get(key)
        assert value.startswith(b"1:")
        # Deflated before sealing: smaller than the JSON it holds.
        assert len(value) < len(json_bytes(plain))

        await store.mark_attempt(created.h, 123.5)
        assert await store.attempt_mark(created.h) == 123.5
        # As long as the record, not longer. Redis rounds each PTTL to the millisecond on its
        # own clock reading, so the two may differ by a millisecond or two either way.
        key_ttl = await client.pttl(key)
        assert 0 < await client.pttl(mark) <= key_ttl + 5
        assert await sessions.save(created, created.record.evolve(version=2))
        assert not await client.exists(mark)  # a fenced write clears it
        await store.mark_attempt(created.h, 124.0)
        await sessions.delete(created.with_record(created.record.evolve(version=2)))
        assert not await client.exists(key) and not await client.exists(mark)
        await store.mark_attempt(created.h, 125.0)  # never for a missing record
        assert not await client.exists(mark)
    finally:
        await client.aclose()
        await store.close()


async def test_record_in_an_older_layout_is_no_session(redis_prefix: str) -> None:
    """A hash written by an earlier development build: "log in again", not a 503."""
    store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    sessions = SessionManager(store, Keyring.from_base64([KEY_A]), session_config())
    client = redis.Redis.from_url(REDIS_URL)
    try:
        session_id = new_session_id()
        await client.hset(
            f"{redis_prefix}:s:{{{session_hash(session_id)}}}", mapping={"v": 1, "d": b"x"}
        )
        assert await sessions.load(session_id) is None
    finally:
        await client.aclose()
        await store.close()


def json_bytes(value: SessionRecord) -> bytes:
    import dataclasses
    import json

    return json.dumps(dataclasses.asdict(value), separators=(",", ":")).encode()


def test_record_reads_compressed_and_plain_json() -> None:
    original = record()
    assert SessionRecord.from_bytes(original.to_bytes()) == original
    assert SessionRecord.from_bytes(json_bytes(original)) == original  # written before deflate
    with pytest.raises(ValueError):
        SessionRecord.from_bytes(b"\x78\x9cnot deflate")
