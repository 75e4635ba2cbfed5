"""Route rules: per upstream, which rule a request matches (method and canonical path; never
the query) and whether a caller's claims meet its conditions (docs/rules.md)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sidecar.access.rules import claim_at, claim_values, email_allowed
from sidecar.config import AccessConfig, RouteRule

__all__ = ["Route", "RouteTable", "glob_pattern"]

_MATCHES_KEPT: Final = 4096  # (method, path) answers remembered per upstream
_PATH_KEPT: Final = 256  # longer paths are matched afresh, not remembered


def glob_pattern(glob: str) -> re.Pattern[str]:
    """`*` matches within one segment, `**` any number of whole segments (none included):
    `/api/admin/**` matches `/api/admin`, `/api/admin/` and `/api/admin/x/y`."""
    out = ["^"]
    for segment in glob.split("/")[1:]:
        if segment == "**":
            out.append("(?:/.*)?")
        else:
            out.append("/" + "[^/]*".join(re.escape(part) for part in segment.split("*")))
    return re.compile("".join(out) + "$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Route:
    """One compiled rule; `index` is its position in the upstream's list (for caching)."""

    index: int
    rule: RouteRule
    methods: frozenset[str] | None
    patterns: tuple[re.Pattern[str], ...] | None

    @property
    def allow(self) -> str:
        return self.rule.allow

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self.patterns is None or any(p.match(path) for p in self.patterns)

    def permits(
        self, claims: Mapping[str, Any], scopes: Iterable[str], access: AccessConfig
    ) -> bool:
        """Whether a caller with these claims (and token scopes) meets every condition.

        Sessions carry no scopes: a rule that names scopes admits bearer tokens only.
        """
        rule = self.rule
        if rule.groups and set(claim_values(claims, access.groups_claim)).isdisjoint(rule.groups):
            return False
        if (rule.emails or rule.email_domains) and not email_allowed(
            claims, rule.emails, rule.email_domains, access.require_verified_email
        ):
            return False
        for path, wanted in rule.claims.items():
            found = claim_at(claims, path)
            values = found if isinstance(found, list) else [found]
            # JSON types count: true is not "true", 1 is not "1" or true.
            if not any(type(v) is type(w) and v == w for v in values for w in wanted):
                return False
        return not rule.scopes or set(rule.scopes) <= set(scopes)


class RouteTable:
    """An upstream's rules in order; `match` gives the first that applies, or None."""

    __slots__ = ("_known", "routes")

    def __init__(self, rules: Sequence[RouteRule]) -> None:
        self.routes = tuple(
            Route(
                index,
                rule,
                frozenset(rule.methods) if rule.methods else None,
                tuple(glob_pattern(g) for g in rule.paths) if rule.paths else None,
            )
            for index, rule in enumerate(rules)
        )
        self._known: dict[tuple[str, str], Route | None] = {}

    def __bool__(self) -> bool:
        return bool(self.routes)

    def match(self, method: str, path: str) -> Route | None:
        """The first rule for `method` on the canonical `path`, remembered (bounded)."""
        key = (method, path)
        known = self._known
        if key in known:
            return known[key]
        found = next((r for r in self.routes if r.matches(method, path)), None)
        if len(path) <= _PATH_KEPT:
            if len(known) >= _MATCHES_KEPT:
                known.clear()
            known[key] = found
        return found
