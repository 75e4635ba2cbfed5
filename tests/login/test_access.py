"""Access rules over claims (sidecar/access/rules.py): email rules trust only verified addresses."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.access.rules import allowed
from sidecar.config import AccessConfig

DOMAIN = AccessConfig(allowed_email_domains=["example.com"])
ADDRESS = AccessConfig(allowed_emails=["alice@example.com"])
_MISSING = object()


@pytest.mark.parametrize("rules", [DOMAIN, ADDRESS])
@pytest.mark.parametrize(
    ("verified", "admitted"),
    [
        (True, True),
        (False, False),
        ("true", False),  # a string is not the boolean the claim is defined as
        ("false", False),
        (1, False),
        (None, False),
        (_MISSING, False),
    ],
)
def test_email_rules_need_email_verified_true(
    rules: AccessConfig, verified: Any, admitted: bool
) -> None:
    claims: dict[str, Any] = {"email": "alice@example.com"}
    if verified is not _MISSING:
        claims["email_verified"] = verified
    assert allowed(claims, [rules]) is admitted


@pytest.mark.parametrize("verified", [False, "false", _MISSING])
def test_opt_out_accepts_unverified_claims(verified: Any) -> None:
    """`require_verified_email: false` is the explicit opt-out for IdPs that omit the claim."""
    rules = AccessConfig(allowed_email_domains=["example.com"], require_verified_email=False)
    claims: dict[str, Any] = {"email": "alice@example.com"}
    if verified is not _MISSING:
        claims["email_verified"] = verified
    assert allowed(claims, [rules])


def test_verified_address_outside_the_rules_is_refused() -> None:
    claims = {"email": "mallory@example.org", "email_verified": True}
    assert not allowed(claims, [DOMAIN])
    assert not allowed(claims, [ADDRESS])


def test_rules_without_email_ignore_the_claim() -> None:
    """Group rules alone do not ask for a verified address."""
    rules = AccessConfig(allowed_groups=["admins"])
    assert allowed({"groups": ["admins"], "email_verified": False}, [rules])
