"""Whether a session may reach an upstream, and the identity headers it carries there.

Both depend only on the record, and a record never changes under one (session hash,
version): every write bumps the version. So the answer is worked out once per version and
upstream, not on every request (claims walked, header values cleaned).
"""

from __future__ import annotations

from typing import Final

from sidecar.access.rules import allowed
from sidecar.config import AccessConfig, InjectConfig
from sidecar.forwarding.headers import identity_headers
from sidecar.session.record import Session

__all__ = ["Admission"]

_MAX_ENTRIES: Final = 10_000  # answers kept; the map starts over when full
_Key = tuple[str, int, str]


class Admission:
    """`headers(session, rules)`: identity headers when the rules let the session in, else None."""

    __slots__ = ("_answers", "_inject", "_rules")

    def __init__(self, access: AccessConfig | None, inject: InjectConfig) -> None:
        self._rules = access
        self._inject = inject
        self._answers: dict[_Key, tuple[tuple[str, str], ...] | None] = {}

    def headers(
        self, session: Session, scope: str, rules: AccessConfig | None = None
    ) -> tuple[tuple[str, str], ...] | None:
        """For the global rules plus `rules` (one upstream's, named `scope`)."""
        record = session.record
        key = (session.h, record.version, scope)
        answers = self._answers
        if key in answers:
            return answers[key]
        answer = (
            tuple(identity_headers(record, self._inject))
            if allowed(record.claims, (self._rules, rules))
            else None
        )
        if len(answers) >= _MAX_ENTRIES:
            answers.clear()
        answers[key] = answer
        return answer
