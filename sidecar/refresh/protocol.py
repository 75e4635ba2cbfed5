"""`ensure_fresh`: the refresh protocol of docs/refresh.md, read top to bottom.

1. Fresh enough → use the token; no lock, no write.
2. In-process single-flight per session, in a shielded task of its own.
3. Redis lock per session, held by a short lease its holder renews; a waiter listens on the
   event channel and polls the record, and takes over within the lease if the holder dies.
4. Holding the lock, re-read: another replica may have refreshed already.
5. One refresh grant; retried only if it certainly never left. Callers stop waiting for it at
   `idp_timeout`, the grant itself runs on up to `late_answer_timeout` (a late answer is kept).
6. Fenced write, publish, release; `invalid_grant` ends the session; a transient failure
   opens the IdP circuit breaker (breaker.py): until a probe succeeds, due sessions use their
   current token while it is still valid, else 503. Only a failure of one session alone
   (`rejected`) records `next_attempt_at` for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, NoReturn

from sidecar.audit import audit
from sidecar.config import RefreshConfig
from sidecar.errors import (
    IdPUnavailable,
    InvalidIDToken,
    RefreshUnavailable,
    SessionEnded,
    SidecarError,
    StoreUnavailable,
    TokenRequestError,
)
from sidecar.metrics import Metrics
from sidecar.oidc import OIDCClient, TokenResponse
from sidecar.oidc.tokens import is_jwt
from sidecar.refresh.breaker import IdPBreaker, Pass
from sidecar.refresh.outcomes import Outcome
from sidecar.session import Session, SessionManager, SessionRecord
from sidecar.session.store import ENDED, FAILED, REFRESHED, Events, Locks
from sidecar.telemetry import Tracing, current_span, span

__all__ = ["RefreshTiming", "Refresher", "refresh_window"]

log = logging.getLogger("sidecar.refresh")

_MAX_ROUNDS: Final = 3  # lock attempts per refresh before giving up with 503
# A token this close to expiry is not forwarded: it would expire in transit or at the
# upstream's own check (and our clock may be a little behind the IdP's). Seconds, at most a
# tenth of the token's lifetime.
_STILL_VALID: Final = 1.0


@dataclass(frozen=True, slots=True)
class RefreshTiming:
    """The protocol's fixed intervals, in seconds. Not configuration: they follow from the
    protocol; tests pass shorter ones to run the same logic faster."""

    poll_interval: float = 0.25  # a waiter re-reads the record this often (its real guarantee)
    watchdog_margin: float = 5.0  # the lock may outlive late_answer_timeout by this, no more
    renew_retry: float = 0.25  # a lease renewal that met a Redis blip is tried again this soon
    backoff_base: float = 1.0  # first wait after a transient failure, doubling, with jitter
    backoff_max: float = 60.0
    save_retry: float = 0.1  # between writes of a new token set while Redis is away
    lease_margin: float = 0.25  # stop writing this long before our lock may expire


@dataclass(eq=False)
class _Flight:
    """One session's refresh in this process: the task, and when its grant left (if it has)."""

    task: asyncio.Task[Session]
    # Who asked first: the client address and request id of the refresh's audit line.
    requester: Mapping[str, str | None] = field(default_factory=dict)
    sent: asyncio.Future[float] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def mark_sent(self) -> None:
        if not self.sent.done():
            self.sent.set_result(time.monotonic())


@dataclass(eq=False)
class _Lease:
    """Our hold on a session's refresh lock, and until when it surely lasts (monotonic).

    Counted from before the command that set or extended it, so it never overestimates.
    `renew_until`: the watchdog renews it no longer than this (docs/refresh.md, "The lease").
    """

    owner: str
    valid_until: float
    renew_until: float


class _LeaseLost(RefreshUnavailable):
    """Our lease may have run out: another replica may hold the lock, so we write nothing."""


def refresh_window(record: SessionRecord, before_expiry: float) -> float:
    """Refresh when less than `min(before_expiry, lifetime / 2)` is left (docs/refresh.md)."""
    lifetime = max(0.0, record.access_expires_at - record.refreshed_at)
    return min(before_expiry, lifetime / 2)


def _margin(record: SessionRecord) -> float:
    return min(_STILL_VALID, (record.access_expires_at - record.refreshed_at) / 10)


class Refresher:
    """Keeps sessions' access tokens fresh, once per rotation across all replicas."""

    def __init__(
        self,
        sessions: SessionManager,
        oidc: OIDCClient,
        locks: Locks,
        events: Events,
        config: RefreshConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        timing: RefreshTiming = RefreshTiming(),
        tracing: Tracing | None = None,
    ) -> None:
        self._tracing = tracing  # refresh, lock wait, grant and write spans (docs/operations.md)
        self._sessions = sessions
        self._oidc = oidc
        self._locks = locks
        self._events = events
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._timing = timing
        self._inflight: dict[str, _Flight] = {}
        self._breaker = IdPBreaker(config.probe_interval, config.idp_timeout, metrics)
        # Every outcome exported at 0 from start-up, so an alert's rate() sees the first
        # failure (docs/operations.md, "Dashboard and alerts").
        for outcome in Outcome:
            metrics.refresh_outcomes.labels(outcome)

    async def ensure_fresh(
        self, session: Session, requester: Callable[[], Mapping[str, str | None]] | None = None
    ) -> Session:
        """A session whose access token the upstream will accept, or an error to answer with.

        `requester` names the caller (client address, request id) for the audit line of a
        refresh it starts; called only then.
        """
        if self._usable(session.record) is True:
            return session
        # Step 2: register before the first await; shield so a client that goes away
        # cannot cancel a grant that others wait on (aiohttp connector.py does the same).
        # The flight starts with the store read, so a burst on a due session costs one read.
        flight = self._inflight.get(session.h)
        if flight is None:
            task = asyncio.create_task(self._from_store(session), name="session-refresh")
            flight = _Flight(task, requester() if requester is not None else {})
            self._inflight[session.h] = flight
            task.add_done_callback(partial(self._forget, session.h, flight))
        else:
            self._metrics.refresh_joins.inc()
        return await self._answer(flight, session)

    async def _from_store(self, session: Session) -> Session:
        """The stored record if it is usable, else a refresh of it.

        The caller's copy may come from this process's cache: the store has the last word
        on a session about to change (and a Redis outage then fails closed, here).
        """
        latest = await self._sessions.load(session.id)
        if latest is None:
            raise SessionEnded("session ended")
        decision = self._usable(latest.record)
        if decision is True:
            return latest
        if decision is False:
            self._unavailable(latest.record)
        admitted = await self._admit(latest)
        if admitted is None:
            return latest  # the breaker is open and the token still valid
        try:
            with span(self._tracing, "refresh", attributes={"sidecar.session.hash": latest.h}):
                return await self._refresh(latest)
        finally:
            self._breaker.release(admitted)

    async def _admit(self, session: Session) -> Pass | None:
        """The IdP circuit breaker's leave to refresh (docs/refresh.md, "IdP circuit breaker").

        Decided before the Redis lock, so a refused session costs no lock traffic. Refused:
        None while the token is still valid; an expired one waits briefly for a running
        probe (which may close the breaker), else 503.
        """
        record = session.record
        if self._still_valid(record):
            return self._breaker.admit(session.h)
        admitted = await self._breaker.admit_after_probe(session.h)
        if admitted is None:
            self._while_open(session)
        return admitted

    def _while_open(self, session: Session) -> Session:
        """The breaker is open: the current token while still valid, else 503 with a
        Retry-After of at most `probe_interval`."""
        record = session.record
        if self._still_valid(record):
            return session
        retry_after = self._breaker.retry_after()
        raise RefreshUnavailable("token expired; the IdP is unavailable", retry_after=retry_after)

    async def _answer(self, flight: _Flight, session: Session) -> Session:
        """The flight's result, or after `idp_timeout` of grant the current token / 503.

        The grant is not abandoned at `idp_timeout`: with rotation, presenting the same
        refresh token again after a timeout gets the grant revoked (docs/refresh.md, "Late
        answers").
        Only this caller stops waiting; the task keeps the lock and stores a late answer.
        """
        arrived = time.monotonic()
        task = flight.task
        if not flight.sent.done():
            # Lock wait and re-read: bounded by wait_timeout inside the task.
            either: set[asyncio.Future[Any]] = {task, flight.sent}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            limit = max(arrived, flight.sent.result()) + self._config.idp_timeout
            await asyncio.wait({task}, timeout=max(0.0, limit - time.monotonic()))
        if task.done():
            return task.result()
        log.info(
            "refresh answer late; request goes on without it", extra={"session": session.h[:12]}
        )
        return self._current_or_unavailable(session)

    def _current_or_unavailable(self, session: Session) -> Session:
        """The IdP is slow: use the current token while valid, else 503 (docs/architecture.md,
        "Failure policy")."""
        record = session.record
        if self._still_valid(record):
            return session
        raise RefreshUnavailable("token expired; the IdP has not answered yet", retry_after=1)

    def _forget(self, h: str, flight: _Flight, task: asyncio.Task[Session]) -> None:
        if self._inflight.get(h) is flight:
            del self._inflight[h]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have gone away meanwhile

    def _still_valid(self, record: SessionRecord) -> bool:
        """Whether the access token may still be forwarded (`_margin` before it expires)."""
        return record.access_expires_at - self._clock() > _margin(record)

    def _usable(self, record: SessionRecord) -> bool | None:
        """True: use as is. False: cannot be used now. None: a refresh should be tried."""
        now = self._clock()
        left = record.access_expires_at - now
        if left > refresh_window(record, self._config.before_expiry):
            return True
        if record.refresh_token is None:
            if left > _margin(record):
                return True
            raise SessionEnded("access token expired and there is no refresh token")
        if record.next_attempt_at is not None and record.next_attempt_at > now:
            return left > _margin(record)
        return None

    def _unavailable(self, record: SessionRecord) -> NoReturn:
        wait = (record.next_attempt_at or self._clock()) - self._clock()
        raise RefreshUnavailable("token expired; the IdP is unavailable", retry_after=wait)

    async def _refresh(self, session: Session) -> Session:
        """Steps 3-6 in the flight's task; its entry in `_inflight` exists before it runs."""
        started = time.perf_counter()
        outcome: str = Outcome.ERROR
        try:
            result, outcome = await self._refresh_rounds(session)
            return result
        except SessionEnded as exc:
            outcome = exc.reason
            raise
        except _LeaseLost:
            # Nothing written: the lock's next holder has the last word (docs/refresh.md,
            # "The lease"); the current token serves meanwhile while it is still valid.
            outcome = Outcome.LEASE_LOST
            return self._current_or_unavailable(session)
        except RefreshUnavailable:
            outcome = Outcome.UNAVAILABLE
            raise
        finally:
            duration = time.perf_counter() - started
            current_span(self._tracing).set("sidecar.refresh.outcome", outcome)
            self._metrics.refresh_outcomes.labels(outcome).inc()
            record = session.record
            flight = self._inflight.get(session.h)
            audit(
                "refresh",
                session=session.h,
                iss=record.issuer,
                sub=record.subject,
                outcome=outcome,
                **(flight.requester if flight is not None else {}),
            )
            log.info(
                "refresh",
                extra={
                    "session": session.h[:12],
                    "user": session.record.subject,
                    "outcome": outcome,
                    "duration_ms": round(duration * 1000, 1),
                },
            )

    async def _refresh_rounds(self, session: Session) -> tuple[Session, Outcome]:
        deadline = time.monotonic() + self._config.wait_timeout
        current = session
        for _ in range(_MAX_ROUNDS):
            asked = time.monotonic()
            owner = await self._locks.acquire(current.h, self._config.lock_ttl)
            if owner is not None:
                lease = _Lease(owner, asked + self._config.lock_ttl, self._renewal_limit())
                return await self._refresh_holding(current, lease)
            # Step 3: another process holds the lock. Wait for its outcome.
            self._metrics.lock_contention.inc()
            waited = time.perf_counter()
            with span(self._tracing, "refresh.lock_wait"):
                current = await self._wait_for_holder(current, deadline)
            self._metrics.lock_wait.observe(time.perf_counter() - waited)
            self._breaker.learn(session.record, current.record)  # the holder's grant, if any
            decision = self._usable(current.record)
            if decision is True:
                return current, Outcome.REFRESHED_ELSEWHERE
            if decision is False:
                self._unavailable(current.record)
            if not self._breaker.admits(current.h):
                # The holder's grant failed and opened the breaker: this one is no probe.
                return self._while_open(current), Outcome.REFRESHED_ELSEWHERE
            if time.monotonic() >= deadline:
                break
        # The holder's grant may still be running (a late answer is waited for): a still-valid
        # token is forwarded meanwhile (docs/architecture.md, "Failure policy").
        self._current_or_unavailable(current)
        return current, Outcome.WAIT_TIMEOUT

    async def _wait_for_holder(self, session: Session, deadline: float) -> Session:
        """Until the record's version changes, the lock goes, or the deadline passes.

        The record is read once as soon as we listen: a holder that finished between our
        failed lock attempt and the subscription sent its message to nobody.
        """
        async with self._events.waiting(session.h) as woken:
            while time.monotonic() < deadline:
                woken.clear()
                latest = await self._sessions.load(session.id)
                if latest is None:
                    raise SessionEnded("session ended during another refresh")
                if latest.record.version != session.record.version:
                    return latest
                if not await self._locks.held(session.h):
                    return latest
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), self._timing.poll_interval)
        return session

    async def _refresh_holding(self, session: Session, lease: _Lease) -> tuple[Session, Outcome]:
        h = session.h
        done = asyncio.Event()
        watchdog = asyncio.create_task(self._keep_lock(h, lease, done), name="refresh-lease")
        try:
            # Step 4: re-read under the lock; another replica may have refreshed already.
            latest = await self._sessions.load(session.id)
            if latest is None:
                raise SessionEnded("session ended before refresh")
            decision = self._usable(latest.record)
            if decision is True:
                return latest, Outcome.ALREADY_FRESH
            if decision is False:
                self._unavailable(latest.record)
            return await self._grant(latest, lease)
        finally:
            # Stop by flag, not only by cancellation: redis-py may swallow a cancellation,
            # and a watchdog failure must never replace the grant's outcome.
            done.set()
            watchdog.cancel()
            await asyncio.wait({watchdog}, timeout=1.0)
            try:
                await self._locks.release(h, lease.owner)
            except StoreUnavailable:
                # The lock expires by itself; the outcome stands (the record has the last word).
                log.warning("refresh lock not released", extra={"session": h[:12]})

    async def _grant(self, session: Session, lease: _Lease) -> tuple[Session, Outcome]:
        record = session.record
        assert record.refresh_token is not None  # _usable returned None only with one
        interrupted = await self._sessions.grant_sent_at(session)
        requested_at = self._clock()
        await self._sessions.mark_grant_sent(session, requested_at)
        lease.renew_until = self._renewal_limit()  # the grant may be answered until then
        started = time.perf_counter()
        flight = self._inflight.get(session.h)
        if flight is not None:
            flight.mark_sent()  # callers now wait idp_timeout at most; the grant runs on
        try:
            with span(self._tracing, "refresh.grant"):  # the IdP call: its `idp.token` below
                tokens = await self._sent_while_held(session.h, lease, record.refresh_token)
            validated = None
            if tokens.id_token is not None:
                # OIDC Core §12.2: same iss, sub and aud as the original ID token.
                validated = await self._oidc.validate_id_token(
                    tokens.id_token, expect_subject=record.subject
                )
            # Claims from the new access token replace the old one's (Keycloak's roles live
            # there): both verified once per refresh, here, never per request.
            access = await self._access_claims(tokens.access_token)
            previous = await self._access_claims(record.access_token, stored=True)
        except TokenRequestError as exc:
            if exc.error != "invalid_grant":
                return await self._failed(session, Outcome.REJECTED, maybe_rotated=False)
            await self._sessions.delete(session)
            await self._events.publish(session.h, ENDED)
            # A mark left by a holder that never wrote its result: the IdP rotated, we lost
            # the new token (the invariant's one hole, docs/architecture.md). Otherwise: revoked.
            reason = (
                Outcome.INVALID_GRANT_LOST_ROTATION
                if interrupted
                else Outcome.INVALID_GRANT_REVOKED
            )
            raise SessionEnded("refresh token refused by the IdP", reason=reason) from exc
        except IdPUnavailable as exc:
            took = round((time.perf_counter() - started) * 1000, 1)  # since the grant left
            log.warning(
                "refresh failed",
                extra={"session": session.h[:12], "error": str(exc), "duration_ms": took},
            )
            self._breaker.failed(str(exc))  # also when the IdP's keys, not its grant, failed
            return await self._failed(session, Outcome.TRANSIENT, maybe_rotated=exc.maybe_sent)
        except InvalidIDToken as exc:
            # The IdP rotated, but we cannot confirm who the tokens belong to: fail closed.
            await self._sessions.delete(session)
            await self._events.publish(session.h, ENDED)
            raise SessionEnded(str(exc), reason=Outcome.INVALID_ID_TOKEN) from exc
        finally:
            elapsed = time.perf_counter() - started
            self._metrics.idp_latency.observe(elapsed)

        updated = record.rotated(
            tokens,
            validated,
            requested_at,
            access_claims=access,
            previous_access_claims=previous,
        )
        with span(self._tracing, "refresh.save") as traced:  # the fenced write
            saved = await self._save_rotated(session, updated, lease)
            traced.set("sidecar.refresh.saved", saved)
        if not saved:
            latest = await self._sessions.load(session.id)
            if latest is None:
                # Deleted meanwhile (logout): never resurrect it.
                await self._events.publish(session.h, ENDED)
                raise SessionEnded(
                    "session ended during refresh", reason=Outcome.ENDED_DURING_REFRESH
                )
            # Only possible if our lock expired despite the watchdog; the other write wins.
            log.error(
                "refresh result lost to a concurrent write", extra={"session": session.h[:12]}
            )
            return latest, Outcome.WRITE_CONFLICT
        await self._events.publish(session.h, REFRESHED)
        # A late answer, kept: counted apart so operators see how often the IdP is that slow.
        late = elapsed > self._config.idp_timeout
        return session.with_record(updated), Outcome.REFRESHED_LATE if late else Outcome.REFRESHED

    async def _access_claims(self, token: str, *, stored: bool = False) -> dict[str, Any] | None:
        """The verified claims of a JWT access token of the provider; an opaque one is not
        looked into (`OIDCClient.access_token_claims`)."""
        if not is_jwt(token):
            return None
        return await self._oidc.access_token_claims(token, stored=stored)

    async def _save_rotated(self, session: Session, updated: SessionRecord, lease: _Lease) -> bool:
        """The fenced write of a rotated token set, tried again through a Redis outage.

        The IdP has rotated: giving up loses the new refresh token, and the session with it
        (the invariant's one hole, docs/architecture.md). While our lock surely holds nobody
        else can present the old refresh token, so a write that failed for want of Redis is
        retried until then.
        """
        retried = False
        while True:
            await self._ensure_held(session.h, lease)
            try:
                if await self._sessions.save(session, updated):
                    return True
                # A failed attempt may have landed without its reply reaching us.
                return retried and await self._stored_is(session, updated)
            except StoreUnavailable:
                timing = self._timing
                if time.monotonic() + timing.save_retry >= lease.valid_until - timing.lease_margin:
                    log.error(
                        "rotated tokens not stored: Redis unavailable until the lock expired",
                        extra={"session": session.h[:12]},
                    )
                    raise
                retried = True
                await asyncio.sleep(self._timing.save_retry)

    async def _stored_is(self, session: Session, record: SessionRecord) -> bool:
        latest = await self._sessions.load(session.id)
        return (
            latest is not None
            and latest.record.version == record.version
            and latest.record.access_token == record.access_token
        )

    def _renewal_limit(self) -> float:
        """How long from now a lease may be renewed: a grant sent now may be answered until
        `late_answer_timeout` has passed, and the lock must outlive it by the margin."""
        return time.monotonic() + self._config.late_answer_timeout + self._timing.watchdog_margin

    async def _keep_lock(self, h: str, lease: _Lease, done: asyncio.Event) -> None:
        """Renew our lease every third of it while we hold the lock, up to `lease.renew_until`.

        The lease is short so that waiters take over within it when its holder dies; renewed,
        it stays ours while we live, so no other replica sends a grant while ours may still
        be answered late (docs/refresh.md, "The lease").
        """
        ttl = self._config.lock_ttl
        pause = ttl / 3
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), pause)
            remaining = lease.renew_until - time.monotonic()
            if done.is_set() or remaining <= 0:
                return
            asked, extension = time.monotonic(), min(ttl, remaining + 1)
            pause = ttl / 3
            try:
                if not await self._locks.extend(h, lease.owner, extension):
                    log.error("refresh lock lost", extra={"session": h[:12]})
                    lease.valid_until = 0.0
                    return
                lease.valid_until = asked + extension
            except StoreUnavailable:
                # A blip: try again soon while the lease still runs; once it may have run
                # out we write nothing (`_holds`).
                log.warning("refresh lock not renewed", extra={"session": h[:12]})
                pause = min(pause, self._timing.renew_retry)

    async def _holds(self, h: str, lease: _Lease) -> bool:
        """Whether our lease surely holds; Redis is asked only when it may have run out.

        A compare-and-extend that succeeds proves the lock never lapsed (nobody else can own
        it under our random owner token), so a renewal lost to a blip costs no answer.
        """
        if time.monotonic() < lease.valid_until - self._timing.lease_margin:
            return True
        asked, ttl = time.monotonic(), self._config.lock_ttl
        try:
            extended = await self._locks.extend(h, lease.owner, ttl)
        except StoreUnavailable:
            return False
        if extended:
            lease.valid_until = asked + ttl
        return extended

    async def _ensure_held(self, h: str, lease: _Lease) -> None:
        """Go on only while our lease surely holds. Otherwise another replica may hold the
        lock now and send its own grant: whatever our grant got is not written, not even a
        failure (the invariant's one hole, docs/refresh.md)."""
        if await self._holds(h, lease):
            return
        log.error("refresh lock lost; the grant's answer is not stored", extra={"session": h[:12]})
        raise _LeaseLost("the refresh lock was lost; try again", retry_after=1)

    async def _sent_while_held(self, h: str, lease: _Lease, refresh_token: str) -> TokenResponse:
        """The grant's answer, to act on only while our lease holds."""
        try:
            with self._breaker.watching():  # its answer, or none, moves the IdP breaker
                tokens = await self._oidc.refresh(refresh_token)
        except SidecarError:
            await self._ensure_held(h, lease)
            raise
        await self._ensure_held(h, lease)
        return tokens

    async def _failed(
        self, session: Session, outcome: Outcome, *, maybe_rotated: bool
    ) -> tuple[Session, Outcome]:
        """Step 6, ambiguous failure: tell waiters, keep the session.

        Only a failure of this session alone (`rejected`) backs it off, exponentially. A
        transient one is the IdP's and has opened this process's breaker; the session is held
        for one `probe_interval` on every process, whose breakers may still be closed: its
        grant may have rotated the refresh token, and a second one at once would be the
        breaker's probe repeated per replica (docs/refresh.md, "IdP circuit breaker").
        `failed_attempts` is left alone, which tells waiters elsewhere it was transient
        (`IdPBreaker.learn`).
        """
        record = session.record
        if outcome is Outcome.TRANSIENT:
            failed = record.evolve(
                version=record.version + 1,
                next_attempt_at=self._clock() + self._config.probe_interval,
            )
        else:
            failures = record.failed_attempts + 1
            timing = self._timing
            delay = min(timing.backoff_max, timing.backoff_base * 2 ** (failures - 1))
            delay *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
            failed = record.evolve(
                version=record.version + 1,
                next_attempt_at=self._clock() + delay,
                failed_attempts=failures,
            )
        saved = await self._sessions.save(session, failed)
        if saved and maybe_rotated:
            # The grant may have reached the IdP and rotated the token: keep the mark so a
            # later invalid_grant is counted as a lost rotation, not a revocation.
            await self._sessions.mark_grant_sent(session, self._clock())
        await self._events.publish(session.h, FAILED)
        if not saved:
            raise SessionEnded("session ended during refresh", reason=Outcome.ENDED_DURING_REFRESH)
        updated = session.with_record(failed)
        if outcome is Outcome.TRANSIENT:
            return self._while_open(updated), outcome
        if self._still_valid(record):
            return updated, outcome
        self._unavailable(failed)
