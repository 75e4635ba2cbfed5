"""Whether a caller may reach an upstream, and the identity headers it carries there.

A caller is a session or a validated bearer token. The answer depends only on the caller's
claims and the rule that applies, and a session's claims never change under one (session
hash, version), a token's never: so it is worked out once per caller, upstream and rule, not
on every request (claims walked, header values cleaned). Which rule applies is the route
table's answer (sidecar/access/routes.py; docs/rules.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from sidecar.access.routes import Route, RouteTable
from sidecar.access.rules import allowed, claim_values
from sidecar.config import AccessConfig, InjectConfig
from sidecar.session.record import Session, SessionRecord

__all__ = ["Admission", "Headers", "identity_headers"]

_MAX_ENTRIES: Final = 10_000  # answers kept; the map starts over when full
_Key = tuple[str, int, str, int]
Headers = tuple[tuple[str, str], ...]


class Admission:
    """The global rules, each upstream's route table, and the answers worked out so far."""

    __slots__ = ("_answers", "_inject", "_rules", "_tables")

    def __init__(
        self,
        access: AccessConfig,
        inject: InjectConfig,
        tables: Mapping[str, RouteTable] | None = None,
    ) -> None:
        self._rules = access
        self._inject = inject
        self._tables = {prefix: table for prefix, table in (tables or {}).items() if table}
        self._answers: dict[_Key, Headers | None] = {}

    def route(self, scope: str, method: str, path: str) -> Route | None:
        """The first rule of upstream `scope` that applies to the request, if any."""
        table = self._tables.get(scope)
        return table.match(method.upper(), path) if table is not None else None

    def headers(
        self,
        session: Session,
        scope: str,
        rules: AccessConfig | None = None,
        route: Route | None = None,
    ) -> Headers | None:
        """A session's identity headers at upstream `scope`, or None when it may not pass."""
        record = session.record
        key = (session.h, record.version, scope, route.index if route is not None else -1)
        answers = self._answers
        if key in answers:
            return answers[key]
        claims = {**record.claims, "sub": record.subject}
        answer = (
            tuple(identity_headers(record, self._inject))
            if self._permits(claims, (), rules, route)
            else None
        )
        self._keep(key, answer)
        return answer

    def bearer_headers(
        self,
        token: str,
        key: str,
        claims: Mapping[str, Any],
        scopes: Iterable[str],
        scope: str,
        rules: AccessConfig | None = None,
        route: Route | None = None,
    ) -> Headers | None:
        """A bearer caller's headers (its own Authorization, claim headers from the token),
        or None when it may not pass; `key` names the token (its hash), never the token."""
        cache_key = (key, 0, scope, route.index if route is not None else -1)
        answers = self._answers
        if cache_key in answers:
            return answers[cache_key]
        answer = None
        if self._permits(claims, scopes, rules, route):
            answer = (("Authorization", f"Bearer {token}"), *claim_headers(claims, self._inject))
        self._keep(cache_key, answer)
        return answer

    def _permits(
        self,
        claims: Mapping[str, Any],
        scopes: Iterable[str],
        rules: AccessConfig | None,
        route: Route | None,
    ) -> bool:
        """The global rules always; then the matched rule's conditions, or without one the
        upstream's own `access` (docs/rules.md)."""
        if route is None:
            return allowed(claims, (self._rules, rules))
        return allowed(claims, (self._rules,)) and route.permits(claims, scopes, self._rules)

    def _keep(self, key: _Key, answer: Headers | None) -> None:
        if len(self._answers) >= _MAX_ENTRIES:
            self._answers.clear()
        self._answers[key] = answer


def identity_headers(record: SessionRecord, inject: InjectConfig) -> list[tuple[str, str]]:
    """`Authorization: Bearer …` and the configured claim headers for one session."""
    out: list[tuple[str, str]] = []
    if inject.authorization == "access_token":
        out.append(("Authorization", f"Bearer {record.access_token}"))
    elif inject.authorization == "id_token" and record.id_token:
        out.append(("Authorization", f"Bearer {record.id_token}"))
    out.extend(claim_headers({**record.claims, "sub": record.subject}, inject))
    return out


def claim_headers(claims: Mapping[str, Any], inject: InjectConfig) -> list[tuple[str, str]]:
    """The configured claim headers (`inject.headers`) from a caller's claims."""
    out: list[tuple[str, str]] = []
    for header, path in inject.headers.items():
        values = claim_values(claims, path)
        if values:
            # Header values must not carry line breaks or controls from a claim.
            out.append((header, ",".join(_printable(v) for v in values)))
    return out


def _printable(value: str) -> str:
    return "".join(c for c in value if c >= " " and c != "\x7f")
