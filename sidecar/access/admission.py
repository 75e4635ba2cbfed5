"""Whether a session may reach an upstream, and the identity headers it carries there.

Both depend only on the record, and a record never changes under one (session hash,
version): every write bumps the version. So the answer is worked out once per version and
upstream, not on every request (claims walked, header values cleaned).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from sidecar.access.rules import allowed, claim_values
from sidecar.config import AccessConfig, InjectConfig
from sidecar.session.record import Session, SessionRecord

__all__ = ["Admission", "identity_headers"]

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


def identity_headers(record: SessionRecord, inject: InjectConfig) -> list[tuple[str, str]]:
    """`Authorization: Bearer …` and the configured claim headers for one session."""
    out: list[tuple[str, str]] = []
    if inject.authorization == "access_token":
        out.append(("Authorization", f"Bearer {record.access_token}"))
    elif inject.authorization == "id_token" and record.id_token:
        out.append(("Authorization", f"Bearer {record.id_token}"))
    claims: Mapping[str, Any] = {**record.claims, "sub": record.subject}
    for header, path in inject.headers.items():
        values = claim_values(claims, path)
        if values:
            # Header values must not carry line breaks or controls from a claim.
            out.append((header, ",".join(_printable(v) for v in values)))
    return out


def _printable(value: str) -> str:
    return "".join(c for c in value if c >= " " and c != "\x7f")
