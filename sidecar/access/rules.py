"""Who may pass: group, email and email-domain rules over the session's claims."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sidecar.config import AccessConfig

__all__ = ["allowed", "claim_at", "claim_values", "email_allowed"]


def claim_values(claims: Mapping[str, Any], path: str) -> list[str]:
    """Values at a dotted claim path (`realm_access.roles`) as text; a scalar becomes one."""
    value = claim_at(claims, path)
    if isinstance(value, list | tuple):
        return [str(v) for v in value if isinstance(v, str | int | float | bool)]
    if isinstance(value, str | int | float | bool):
        return [str(value).lower() if isinstance(value, bool) else str(value)]
    return []


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The JSON value at a dotted claim path, or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def allowed(claims: Mapping[str, Any], rules: Iterable[AccessConfig | None]) -> bool:
    """True when every set of rules lets the user in; empty rules allow everyone."""
    return all(_passes(claims, r) for r in rules if r is not None)


def _passes(claims: Mapping[str, Any], rules: AccessConfig) -> bool:
    if rules.allowed_groups:
        groups = set(claim_values(claims, rules.groups_claim))
        if groups.isdisjoint(rules.allowed_groups):
            return False
    return not (rules.allowed_emails or rules.allowed_email_domains) or email_allowed(
        claims, rules.allowed_emails, rules.allowed_email_domains, rules.require_verified_email
    )


def email_allowed(
    claims: Mapping[str, Any],
    emails: Iterable[str],
    domains: Iterable[str],
    require_verified: bool,
) -> bool:
    """Whether the caller's address is one of `emails` or in one of `domains`."""
    email = claims.get("email")
    # An address the IdP has not verified proves nothing about who this is: only the
    # JSON boolean true counts (OIDC Core §5.1), not "false", "true" or a missing claim.
    verified = claims.get("email_verified") is True or not require_verified
    if not isinstance(email, str) or not verified:
        return False
    email = email.lower()
    by_address = email in {e.lower() for e in emails}
    domain = email.rpartition("@")[2]
    return by_address or domain in {d.lower().lstrip("@") for d in domains}
