"""Sessions as the rest of the sidecar sees them: ids in, decrypted records out.

Joins the keyring (sealing), the store (bytes under hashes) and the clock. A cookie that
is malformed, unknown, expired or fails to decrypt is simply "no session".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

from sidecar.config import SessionConfig
from sidecar.errors import StoreUnavailable
from sidecar.session.cache import SessionCache
from sidecar.session.crypto import Keyring, SealError
from sidecar.session.record import Session, SessionRecord, new_session_id, session_hash
from sidecar.session.store import SessionStore, Waiters
from sidecar.telemetry import Tracing

__all__ = [
    "LOGIN_TTL",
    "PendingLogin",
    "Session",
    "SessionInfo",
    "SessionManager",
    "TracedSessionManager",
    "idp_session_ref",
    "subject_key",
    "user_ref",
]

log = logging.getLogger("sidecar.session")

LOGIN_TTL: Final = 600.0  # a pending login lives 10 minutes (docs/sessions.md)
_SESSION_ID: Final = re.compile(r"[A-Za-z0-9_-]{43}")
_TOUCH_MEMORY: Final = 100_000  # sessions whose last idle-timeout touch time is remembered
_FEED_RETRY: Final = 0.5  # seconds before following the change feed again after it failed
# The metadata key is derived from the master keys alone (the admin view must open it without
# the session id); it holds identities and times, never a token (docs/sessions.md).
_META: Final = b"session metadata"


def subject_key(issuer: str, value: str) -> str:
    """Index key part for an (issuer, sub) or (issuer, sid) pair; never the raw values."""
    digest = hashlib.sha256(f"{issuer}\x00{value}".encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def user_ref(issuer: str, subject: str) -> str:
    """The index of a user's sessions."""
    return "sub:" + subject_key(issuer, subject)


def idp_session_ref(issuer: str, sid: str) -> str:
    """The index of one IdP session's sessions (OpenID Connect `sid`)."""
    return "sid:" + subject_key(issuer, sid)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What an operator may see of a session: never a token, a cookie or the session id.

    `id` is the session hash. A record stored before metadata was kept shows only its id.
    """

    id: str
    iss: str | None = None
    sub: str | None = None
    sid: str | None = None
    created_at: float | None = None
    last_refresh_at: float | None = None
    expires_at: float | None = None

    def refs(self) -> list[str]:
        """The indexes that list this session."""
        if self.iss is None or self.sub is None:
            return []
        refs = [user_ref(self.iss, self.sub)]
        if self.sid:
            refs.append(idp_session_ref(self.iss, self.sid))
        return refs


@dataclass(frozen=True, slots=True)
class PendingLogin:
    """What `/oauth2/start` remembers for `/oauth2/callback` (one use, 10 minutes)."""

    code_verifier: str
    nonce: str
    return_to: str
    binding_hash: str  # sha256 of the login cookie's secret: the browser that started it
    created_at: float


class SessionManager:
    """Create, load, save and delete sessions; store pending logins."""

    def __init__(
        self,
        store: SessionStore,
        keyring: Keyring,
        config: SessionConfig,
        clock: Callable[[], float] = time.time,
        on_caching: Callable[[bool], None] = lambda _: None,
    ) -> None:
        """`on_caching` hears when the cache goes on or off (a metric; logs say why)."""
        self.store = store
        self._keyring = keyring
        self._config = config
        self._clock = clock
        self._touched: dict[str, float] = {}
        self._cache = SessionCache(config.cache_ttl, config.cache_max_entries)
        self._on_caching = on_caching
        # Reads under way for `current`, by session id, with the change count they began at.
        self._reading: dict[str, tuple[asyncio.Task[Session | None], int]] = {}
        self._ending = Waiters()  # who watches which session's end (`ending`)
        self._checks: set[asyncio.Task[None]] = set()

    async def current(self, session_id: str | None) -> Session | None:
        """`load` for a request: a session this process opened moments ago is reused as is."""
        if session_id is None:
            return None
        session = self._cache.get(session_id)
        if session is None:
            return await self._load_once(session_id)
        if session.record.expires_at <= self._clock():
            self._cache.forget(session.h)
            return None
        if self._config.idle_timeout:
            await self._touch(session.h, session.record)
        return session

    async def _load_once(self, session_id: str) -> Session | None:
        """`load`, shared by the requests that miss the cache for the same session together.

        Without it, each time an entry ages out every request in flight on that session reads
        and decrypts the record at once, and the burst queues behind itself in the Redis
        client (measured: 100-970 ms stalls at 2 workers, bench/README.md). A read that began
        before the latest announced change may return the old record, so it is not joined.
        """
        changes = self._cache.changes
        reading = self._reading.get(session_id)
        if reading is None or reading[1] != changes:
            task = asyncio.create_task(self.load(session_id), name="session-read")
            reading = (task, changes)
            self._reading[session_id] = reading
            task.add_done_callback(functools.partial(self._read_done, session_id, reading))
        # One caller going away (a client hanging up) must not cancel the others' read.
        return await asyncio.shield(reading[0])

    def _read_done(
        self, session_id: str, reading: tuple[asyncio.Task[Session | None], int], _: object
    ) -> None:
        if self._reading.get(session_id) is reading:
            del self._reading[session_id]
        task = reading[0]
        if not task.cancelled():
            task.exception()  # retrieved: callers that stayed have it; no "never retrieved"

    @property
    def caching(self) -> bool:
        """Whether opened sessions are reused now (only while the change feed is proven)."""
        return self._cache.enabled

    async def follow_changes(self) -> None:
        """Follow the store's change feed: it keeps the cache honest (the cache is on only
        while the feed is proven) and tells watchers of `ending` that a session ended.

        Runs until cancelled; a feed failure turns the cache off until the feed is back.
        """
        try:
            while True:
                try:
                    await self.store.watch(self._changed)
                except StoreUnavailable as exc:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise asyncio.CancelledError from exc  # redis-py hid our cancellation
                    if self._cache.enabled:  # once per outage, not once per retry
                        log.warning(
                            "session change feed lost; session cache off until it is back",
                            extra={"error": str(exc)},
                        )
                self._cache.switch_off()
                self._on_caching(False)
                await asyncio.sleep(_FEED_RETRY)
        except Exception:
            log.exception("session change feed failed; session cache off")
            raise
        finally:
            self._cache.switch_off()
            self._on_caching(False)
            for check in self._checks:
                check.cancel()

    def _changed(self, h: str | None) -> None:
        """From the feed: `h` changed or went; None: (re)subscribed, anything may have changed."""
        if h is None:
            self._cache.clear()
            if self._config.cache_ttl > 0:
                self._cache.enabled = True
                self._on_caching(True)
            watched = self._ending.watched()
        else:
            self._cache.invalidate(h)
            watched = [h] if self._ending.watching(h) else []
        if watched:
            check = asyncio.get_running_loop().create_task(self._check_ended(watched))
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)

    async def _check_ended(self, hashes: list[str]) -> None:
        """Wake the watchers of those sessions that no longer exist (a change may also be a
        refresh); a store failure leaves them to the next change or resubscription."""
        try:
            live = await self.store.lookup(hashes)
        except StoreUnavailable:
            return
        for h in hashes:
            if h not in live:
                self._ending.wake(h)

    async def load(self, session_id: str | None) -> Session | None:
        """The session named by a cookie value as the store has it now, or None if unusable."""
        if not session_id or not _SESSION_ID.fullmatch(session_id):
            return None
        h = session_hash(session_id)
        seen = self._cache.changes  # a change announced while we read makes our copy stale
        session = await self._read(session_id, h)
        if session is None:
            self._cache.forget(h)
            return None
        self._cache.put(session, seen)
        return session

    async def _read(self, session_id: str, h: str) -> Session | None:
        found = await self.store.get(h)
        if found is None:
            return None
        version, sealed = found
        try:
            plain, stale_key = self._keyring.open(session_id.encode(), h.encode(), sealed)
            record = SessionRecord.from_bytes(plain)
        except (SealError, ValueError, TypeError):
            log.warning("session record does not open", extra={"session": h[:12]})
            return None
        if record.version != version or record.expires_at <= self._clock():
            return None
        if stale_key:
            # Key rotation: reseal under the current key, same version, fenced.
            await self.store.replace(
                h,
                version,
                version,
                self._seal(session_id, h, record),
                self.ttl(record),
                self._seal_meta(h, record),
            )
        elif self._config.idle_timeout:
            await self._touch(h, record)
        return Session(session_id, h, record)

    async def _touch(self, h: str, record: SessionRecord) -> None:
        """Idle timeout: each use pushes the store TTL out again, at most every tenth of it."""
        now = self._clock()
        if self._touched.get(h, 0.0) > now - self._config.idle_timeout / 10:
            return
        if len(self._touched) > _TOUCH_MEMORY:
            self._touched.clear()  # a bounded hint, not state: forgetting costs one write
        self._touched[h] = now
        await self.store.touch(h, self.ttl(record))

    async def create(self, record: SessionRecord) -> Session:
        """Store `record` under a brand-new id (no fixation) and index it."""
        session_id = new_session_id()
        h = session_hash(session_id)
        await self.store.create(
            h,
            record.version,
            self._seal(session_id, h, record),
            self.ttl(record),
            self._seal_meta(h, record),
        )
        await self._index(h, record)
        return Session(session_id, h, record)

    async def over_cap(self, session: Session) -> list[SessionInfo]:
        """The user's oldest other sessions beyond `session.max_per_user` (none if 0)."""
        cap = self._config.max_per_user
        if not cap:
            return []
        record = session.record
        others = [
            info
            for info in await self.sessions_of_user(record.issuer, record.subject)
            if info.id != session.h
        ]
        others.sort(key=lambda info: info.created_at or 0.0)
        return others[: max(0, len(others) + 1 - cap)]

    async def save(self, session: Session, record: SessionRecord) -> bool:
        """Fenced write of a new version; False if the session changed or vanished meanwhile."""
        self._cache.forget(session.h)
        seen = self._cache.changes
        saved = await self.store.replace(
            session.h,
            session.record.version,
            record.version,
            self._seal(session.id, session.h, record),
            self.ttl(record),
            self._seal_meta(session.h, record),
        )
        if saved:
            self._cache.put(session.with_record(record), seen)
            if record.expires_at != session.record.expires_at:
                await self._index(session.h, record)  # the indexes' scores are its end
        return saved

    async def delete(self, session: Session) -> None:
        """Remove the session and its index entries."""
        self._cache.forget(session.h)
        await self.store.delete(session.h)
        self._ending.wake(session.h)
        await self._unindex({ref: [session.h] for ref in _refs(session.record)})

    async def end(self, sessions: Sequence[SessionInfo], listed_under: str | None = None) -> int:
        """End many sessions at once (central logout, admin, cap): records deleted and
        announced to every replica, index entries removed; how many still existed.

        `listed_under`: the index they were found in, cleaned even for sessions without
        metadata.
        """
        if not sessions:
            return 0
        hashes = [info.id for info in sessions]
        for h in hashes:
            self._cache.forget(h)
        ended = await self.store.end(hashes)
        for h in hashes:
            self._ending.wake(h)
        removals: dict[str, list[str]] = {}
        for info in sessions:
            for ref in {*info.refs(), *([listed_under] if listed_under else [])}:
                removals.setdefault(ref, []).append(info.id)
        await self._unindex(removals)
        return ended

    async def sessions_of_user(self, issuer: str, subject: str) -> list[SessionInfo]:
        """The live sessions of one user at one issuer."""
        return self._describe(await self.store.indexed(user_ref(issuer, subject)))

    async def sessions_of_idp_session(self, issuer: str, sid: str) -> list[SessionInfo]:
        """The live sessions that one IdP session (its `sid`) logged in."""
        return self._describe(await self.store.indexed(idp_session_ref(issuer, sid)))

    async def describe(self, hashes: Sequence[str]) -> list[SessionInfo]:
        """The live sessions among `hashes` (admin: one session by its id)."""
        return self._describe(await self.store.lookup(hashes))

    async def remember_logout_token(self, issuer: str, jti: str, until: float) -> bool:
        """False if a logout token with this `jti` was accepted before (Back-Channel Logout
        1.0 §2.6 step 10)."""
        return await self.store.remember(subject_key(issuer, jti), until)

    async def forget_logout_token(self, issuer: str, jti: str) -> None:
        """The logout of a remembered token failed: the IdP's retry must be accepted."""
        with contextlib.suppress(StoreUnavailable):
            await self.store.forget(subject_key(issuer, jti))

    @contextlib.contextmanager
    def ending(self, h: str) -> Iterator[asyncio.Event]:
        """An event set when session `h` ends, by this process or any other (through the
        change feed): long-lived uses such as a proxied websocket watch it."""
        event, _ = self._ending.join(h)
        try:
            yield event
        finally:
            self._ending.leave(h, event)

    async def mark_grant_sent(self, session: Session, at: float) -> None:
        """Note that a refresh grant for `session` is leaving at `at`; the next fenced write
        clears it. A mark found later means a holder sent a grant and never stored its
        answer: the IdP may have rotated (docs/refresh.md, "Lost rotation vs revocation")."""
        await self.store.mark_attempt(session.h, at)

    async def grant_sent_at(self, session: Session) -> float | None:
        """When a grant was last sent for `session` without its answer being stored."""
        return await self.store.attempt_mark(session.h)

    def ttl(self, record: SessionRecord) -> float:
        """Store TTL: the absolute end, or sooner with an idle timeout."""
        remaining = record.expires_at - self._clock()
        if self._config.idle_timeout:
            remaining = min(remaining, self._config.idle_timeout)
        return max(0.001, remaining)

    async def _index(self, h: str, record: SessionRecord) -> None:
        try:
            await self.store.index(h, _refs(record), record.expires_at)
        except Exception:  # best-effort, never a condition for the session itself
            log.warning("session index update failed", extra={"session": h[:12]})

    async def _unindex(self, removals: dict[str, list[str]]) -> None:
        try:
            await self.store.unindex(removals)
        except Exception:  # index keys are best-effort (docs/sessions.md)
            log.warning("session index cleanup failed", extra={"sessions": len(removals)})

    def _seal_meta(self, h: str, record: SessionRecord) -> bytes:
        meta = {
            "iss": record.issuer,
            "sub": record.subject,
            "sid": record.idp_session_id,
            "created_at": record.created_at,
            "last_refresh_at": record.refreshed_at,
            "expires_at": record.expires_at,
        }
        return self._keyring.seal(_META, h.encode(), json.dumps(meta).encode())

    def _describe(self, found: dict[str, bytes | None]) -> list[SessionInfo]:
        infos = []
        for h, sealed in found.items():
            info = SessionInfo(h)
            if sealed is not None:
                try:
                    meta = json.loads(self._keyring.open(_META, h.encode(), sealed)[0])
                    info = SessionInfo(
                        h,
                        **{k: meta.get(k) for k in SessionInfo.__dataclass_fields__ if k != "id"},
                    )
                except (SealError, ValueError, TypeError, AttributeError):
                    log.warning("session metadata does not open", extra={"session": h[:12]})
            infos.append(info)
        return infos

    def _seal(self, session_id: str, h: str, record: SessionRecord) -> bytes:
        return self._keyring.seal(session_id.encode(), h.encode(), record.to_bytes())

    async def put_login(self, state: str, login: PendingLogin, keep: int) -> int:
        """Store `login` for `state`; only its browser's newest `keep` stay usable.

        Returns how many older pending logins of the browser were dropped.
        """
        key = session_hash(state)
        plain = json.dumps(asdict(login)).encode()
        return await self.store.put_login(
            key,
            self._keyring.seal(state.encode(), key.encode(), plain),
            LOGIN_TTL,
            # The store lists a browser's logins under a hash of the binding hash: not the
            # value the callback compares, though that alone would not forge the cookie.
            session_hash(login.binding_hash),
            keep,
        )

    async def take_login(self, state: str) -> PendingLogin | None:
        """The pending login for `state`, consumed; None if unknown, used, expired or forged."""
        key = session_hash(state)
        sealed = await self.store.take_login(key)
        if sealed is None:
            return None
        try:
            plain, _ = self._keyring.open(state.encode(), key.encode(), sealed)
            login = PendingLogin(**json.loads(plain))
        except (SealError, ValueError, TypeError):
            return None
        if login.created_at + LOGIN_TTL <= self._clock():
            return None
        return login


class TracedSessionManager(SessionManager):
    """A `SessionManager` whose request-path loads are spans (docs/operations.md, "Traces").

    A subclass, chosen once at start-up: with tracing off, `current` is the plain one.
    """

    def __init__(
        self,
        tracing: Tracing,
        store: SessionStore,
        keyring: Keyring,
        config: SessionConfig,
        **options: Any,
    ) -> None:
        super().__init__(store, keyring, config, **options)
        self._tracing = tracing

    async def current(self, session_id: str | None) -> Session | None:
        """`SessionManager.current` in a `session.load` span saying whether this process's
        cache answered or the store was read; the session hash, never the id."""
        if session_id is None:
            return None
        with self._tracing.span("session.load") as span:
            # A look without an await before `current`: the same answer it will get.
            cached = self._cache.get(session_id) is not None
            span.set("sidecar.session.source", "cache" if cached else "store")
            session = await super().current(session_id)
            span.set("sidecar.session.found", session is not None)
            if session is not None:
                span.set("sidecar.session.hash", session.h)
            return session


def _refs(record: SessionRecord) -> list[str]:
    refs = [user_ref(record.issuer, record.subject)]
    if record.idp_session_id:
        refs.append(idp_session_ref(record.issuer, record.idp_session_id))
    return refs
