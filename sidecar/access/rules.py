"""Who may pass: group, email and email-domain rules over the session's claims."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sidecar.config import AccessConfig

__all__ = ["allowed", "claim_values"]


def claim_values(claims: Mapping[str, Any], path: str) -> list[str]:
    """Values at a dotted claim path (`realm_access.roles`); a scalar becomes one value."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return []
        value = value[part]
    if isinstance(value, list | tuple):
        return [str(v) for v in value if isinstance(v, str | int | float | bool)]
    if isinstance(value, str | int | float | bool):
        return [str(value).lower() if isinstance(value, bool) else str(value)]
    return []


def allowed(claims: Mapping[str, Any], rules: Iterable[AccessConfig | None]) -> bool:
    """True when every set of rules lets the user in; empty rules allow everyone."""
    return all(_passes(claims, r) for r in rules if r is not None)


def _passes(claims: Mapping[str, Any], rules: AccessConfig) -> bool:
    if rules.allowed_groups:
        groups = set(claim_values(claims, rules.groups_claim))
        if groups.isdisjoint(rules.allowed_groups):
            return False
    if rules.allowed_emails or rules.allowed_email_domains:
        email = claims.get("email")
        # An address the IdP has not verified proves nothing about who this is: only the
        # JSON boolean true counts (OIDC Core §5.1), not "false", "true" or a missing claim.
        verified = claims.get("email_verified") is True or not rules.require_verified_email
        if not isinstance(email, str) or not verified:
            return False
        email = email.lower()
        by_address = email in {e.lower() for e in rules.allowed_emails}
        domain = email.rpartition("@")[2]
        by_domain = domain in {d.lower().lstrip("@") for d in rules.allowed_email_domains}
        if not (by_address or by_domain):
            return False
    return True
