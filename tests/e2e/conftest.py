"""End-to-end fixtures: the certified `oidc-provider` (Node) as a real OpenID provider process.

`oidc_provider` is a factory: `oidc_provider(public_url)` starts `node tests/e2e/provider.mjs`
(tests/support/provider.py) on a free port with one confidential client registered for that
sidecar URL and returns a `ProviderHandle`. Every provider started is stopped after the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.provider import ProviderHandle, start_provider


@pytest.fixture
def oidc_provider(tmp_path: Path) -> Iterator[Callable[..., ProviderHandle]]:
    """`oidc_provider(public_url, **options)` runs oidc-provider with a client for that URL.

    Options go to `provider.mjs` as they are (`access_token_ttl`, `refresh_token_ttl`,
    `conform_id_token_claims`, `client={...}` to change the client's registration).
    """
    started: list[ProviderHandle] = []

    def start(public_url: str, **options: Any) -> ProviderHandle:
        log_path = tmp_path / f"oidc-provider-{len(started)}.log"
        handle = start_provider(log_path, public_url, options)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()
