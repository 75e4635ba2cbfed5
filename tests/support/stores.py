"""Config sections that put the sidecar's sessions in one store or the other."""

from __future__ import annotations

from typing import Any

from tests.conftest import REDIS_URL, TEST_KEY

__all__ = ["store_sections"]


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
