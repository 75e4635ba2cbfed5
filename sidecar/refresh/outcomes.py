"""How a refresh ended: the `outcome` label of `sidecar_refresh_total` and of the `refresh`
log line (docs/refresh.md, "Outcomes"). Also the `reason` a `SessionEnded` carries."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Outcome"]


class Outcome(StrEnum):
    # The session has a usable token afterwards.
    REFRESHED = "refreshed"
    REFRESHED_LATE = "refreshed_late"  # answered after idp_timeout, within late_answer_timeout
    REFRESHED_ELSEWHERE = "refreshed_elsewhere"  # another replica held the lock and refreshed
    ALREADY_FRESH = "already_fresh"  # found fresh under the lock
    # The session is kept; the token is used while still valid, else 503.
    TRANSIENT = "transient"  # no usable answer: backoff, next_attempt_at
    REJECTED = "rejected"  # an OAuth error other than invalid_grant
    UNAVAILABLE = "unavailable"  # token expired and no refresh possible now
    WAIT_TIMEOUT = "wait_timeout"  # another replica's grant still running at wait_timeout
    WRITE_CONFLICT = "write_conflict"  # our lock expired and another write won
    LEASE_LOST = "lease_lost"  # our lock's lease may have run out: the answer is not written
    ERROR = "error"  # anything unexpected
    # The session is over: log in again.
    ENDED = "ended"
    ENDED_DURING_REFRESH = "ended_during_refresh"  # deleted meanwhile (logout)
    INVALID_GRANT_REVOKED = "invalid_grant_revoked"
    INVALID_GRANT_LOST_ROTATION = "invalid_grant_lost_rotation"  # a holder died after the grant
    INVALID_ID_TOKEN = "invalid_id_token"  # noqa: S105 - a label; the new ID token is not theirs
