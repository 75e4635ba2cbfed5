"""The IdP circuit breaker: one per process, for the provider's token endpoint.

A transient failure (no answer, a reset, a 5xx, garbage: `IdPUnavailable`) opens it. While it
is open no session sends its own refresh grant: one probe per `refresh.probe_interval` does,
and its success closes the breaker for everyone at once (docs/refresh.md, "IdP circuit
breaker"). It decides before the Redis lock is taken, so refused sessions cost no lock traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from sidecar.errors import IdPUnavailable, TokenRequestError
from sidecar.metrics import Metrics
from sidecar.session import SessionRecord

__all__ = ["IdPBreaker", "Pass"]

log = logging.getLogger("sidecar.refresh")

_OPEN: Final = "open"
_CLOSED: Final = "closed"


@dataclass(eq=False, frozen=True, slots=True)
class Pass:
    """Leave to try a refresh grant for one session: while open, only the probe has one."""

    h: str
    probe: bool


class IdPBreaker:
    """Closed: every due session refreshes. Open: one probe per `probe_interval`."""

    def __init__(
        self,
        probe_interval: float,
        idp_timeout: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = probe_interval
        self._idp_timeout = idp_timeout
        self._metrics = metrics
        self._clock = clock
        self._opened_at: float | None = None  # monotonic; None while closed
        self._next_probe_at = 0.0
        self._probe: Pass | None = None
        self._probe_ended = asyncio.Event()
        metrics.idp_breaker_open.set(0)

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def admit(self, h: str) -> Pass | None:
        """A pass for session `h`'s grant, or None: the breaker is open and this is not the
        probe (one is running, or the last one left less than `probe_interval` ago)."""
        if self._opened_at is None:
            return Pass(h, probe=False)
        now = self._clock()
        if self._probe is not None or now < self._next_probe_at:
            return None
        self._next_probe_at = now + self._interval
        self._probe = Pass(h, probe=True)
        self._probe_ended.clear()
        return self._probe

    async def admit_after_probe(self, h: str) -> Pass | None:
        """`admit`, after waiting for a running probe's outcome for up to
        min(probe_interval, idp_timeout): a request that arrives while the IdP is being
        probed then refreshes as soon as it is back, instead of answering 503."""
        admitted = self.admit(h)
        if admitted is None and self._probe is not None:
            limit = min(self._interval, self._idp_timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._probe_ended.wait(), limit)
            admitted = self.admit(h)
        return admitted

    def admits(self, h: str) -> bool:
        """Whether session `h`'s refresh, admitted earlier, may still send its grant: the
        breaker may have opened since."""
        return self._opened_at is None or (self._probe is not None and self._probe.h == h)

    def release(self, admitted: Pass) -> None:
        """The refresh that held `admitted` is over (with or without a grant)."""
        if self._probe is admitted:
            self._probe = None
            self._probe_ended.set()

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Around one token-endpoint call: its outcome moves the breaker.

        Any answer (tokens, or an OAuth error such as `invalid_grant`) shows the IdP works and
        closes it; `IdPUnavailable` opens it. No answer within `idp_timeout` opens it at
        once: the grant runs on for its late answer, but other sessions stop piling grants
        onto a stalled IdP meanwhile (docs/refresh.md, "Late answers").
        """
        if self._opened_at is not None:
            # The next probe leaves an interval after this grant, not after its admission:
            # one that waited for another replica's lock leaves late (no two closer).
            self._next_probe_at = max(self._next_probe_at, self._clock() + self._interval)
        slow = asyncio.get_running_loop().call_later(
            self._idp_timeout, self.failed, "no answer within refresh.idp_timeout"
        )
        try:
            yield
        except TokenRequestError:
            self.succeeded()
            raise
        except IdPUnavailable as exc:
            self.failed(str(exc))
            raise
        else:
            self.succeeded()
        finally:
            slow.cancel()

    def learn(self, before: SessionRecord, after: SessionRecord) -> None:
        """What another process's grant for the same session, waited for, tells about the IdP.

        New tokens: it answered. Same tokens in a new version with the same count of the
        session's own failures: only a transient failure writes that (`Refresher._failed`).
        """
        if after.access_token != before.access_token:
            self.succeeded()
        elif after.version != before.version and after.failed_attempts == before.failed_attempts:
            self.failed("another process's refresh grant failed")

    def retry_after(self) -> int:
        """Whole seconds until the next probe may leave, at least 1 and at most
        `probe_interval` (rounded down; 1 when the interval is shorter than a second)."""
        wait = math.ceil(self._next_probe_at - self._clock())
        return max(1, min(wait, math.floor(self._interval)))

    def failed(self, error: str) -> None:
        if self._opened_at is not None:
            return
        now = self._clock()
        self._opened_at = now
        self._next_probe_at = now + self._interval
        self._metrics.idp_breaker_open.set(1)
        self._metrics.idp_breaker_transitions.labels(_OPEN).inc()
        log.warning(
            "IdP circuit breaker open: one refresh probe per probe_interval until it answers",
            extra={"error": error, "probe_interval": self._interval},
        )

    def succeeded(self) -> None:
        if self._opened_at is None:
            return
        was_open = self._clock() - self._opened_at
        self._opened_at = None
        self._probe = None
        self._probe_ended.set()
        self._metrics.idp_breaker_open.set(0)
        self._metrics.idp_breaker_transitions.labels(_CLOSED).inc()
        log.info("IdP circuit breaker closed", extra={"open_s": round(was_open, 3)})
