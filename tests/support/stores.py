"""The shared Redis of the tests, and config sections that put sessions in one store or another."""

from __future__ import annotations

import os
import secrets
from typing import Any

from tests.support.keys import TEST_KEY

__all__ = ["REDIS_URL", "new_prefix", "store_sections"]

# The one knob the suite takes from its environment: where the shared Redis server is.
REDIS_URL = os.environ.get("AUTH_SIDECAR_TEST_REDIS", "redis://127.0.0.1:6379/0")


def new_prefix() -> str:
    """A key prefix of one test's own on the shared Redis: tests never see each other's keys."""
    return f"test-{secrets.token_hex(6)}"


def store_sections(kind: str, prefix: str) -> dict[str, Any]:
    """Sections for `make_config`: none for `memory` (its default), Redis under `prefix`."""
    if kind == "memory":
        return {}
    return {
        "session": {
            "store": "redis",
            "cookie_name": "sidecar",
            "cookie_secure": False,
            "encryption_keys": [TEST_KEY],
        },
        "redis": {"url": REDIS_URL, "key_prefix": prefix},
    }
