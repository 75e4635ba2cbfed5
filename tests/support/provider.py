"""The certified `oidc-provider` (Node, tests/e2e/provider.mjs) as a real OpenID provider process.

`start_provider` runs it on a free port with one confidential client registered for a
sidecar URL and waits for its `READY <issuer>` line; the `oidc_provider` fixture
(tests/e2e/conftest.py) stops every provider a test started. A missing `node` or
`tests/e2e/node_modules` fails the test: the e2e tests never skip.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import stop_process
from tests.support.repo import REPO_ROOT

__all__ = [
    "CLIENT_ID",
    "CLIENT_SECRET",
    "E2E_DIR",
    "ProviderHandle",
    "set_outage",
    "set_refresh_grace",
    "set_slow_token_answers",
    "start_provider",
]

E2E_DIR = REPO_ROOT / "tests" / "e2e"
PROVIDER_SCRIPT = E2E_DIR / "provider.mjs"
CLIENT_ID = "auth-sidecar-e2e"
CLIENT_SECRET = "e2e-client-secret-that-is-long-enough-0123456789"
READY_TIMEOUT = 20.0


@dataclass
class ProviderHandle:
    """A running `provider.mjs`: its issuer, discovery document, counters and log."""

    issuer: str
    client_id: str
    client_secret: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    metadata: dict[str, Any]

    def stats(self) -> dict[str, Any]:
        """Counters the provider keeps from its own events (grants, revocations, logouts)."""
        with urllib.request.urlopen(self.issuer + "/__test/stats", timeout=5) as r:
            return dict(json.loads(r.read()))

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sidecar_oidc(self, post_logout_redirect_url: str) -> dict[str, Any]:
        """The sidecar's `oidc` config section for this provider and its client."""
        return {
            "issuer": self.issuer,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "scopes": ["openid", "email", "profile", "offline_access"],
            "post_logout_redirect_url": post_logout_redirect_url,
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_process(self.proc, 10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _require_node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node (>= 20) is required for the end-to-end tests against oidc-provider; "
            "install Node.js, then run: cd tests/e2e && npm ci",
            pytrace=False,
        )
    if not (E2E_DIR / "node_modules" / "oidc-provider" / "package.json").is_file():
        pytest.fail(
            "tests/e2e/node_modules is missing: run "
            "`(cd tests/e2e && npm ci --no-audit --no-fund)`",
            pytrace=False,
        )
    return node


def start_provider(
    log_path: Path, public_url: str, options: dict[str, Any] | None = None
) -> ProviderHandle:
    """`provider.mjs` with a client for the sidecar at `public_url`; `options` as it takes them.

    Options: `access_token_ttl`, `refresh_token_ttl`, `conform_id_token_claims`, and
    `client={...}` to change the client's registration.
    """
    node = _require_node()
    options = dict(options or {})
    base = public_url.rstrip("/")
    client = {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "redirect_uris": [base + "/oauth2/callback"],
        "post_logout_redirect_uris": [base + "/"],
    }
    client.update(options.pop("client", {}))
    config = {"port": 0, "clients": [client], **options}
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [node, str(PROVIDER_SCRIPT)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=log,
        env={**os.environ, "E2E_PROVIDER_CONFIG": json.dumps(config), "NODE_ENV": "test"},
    )
    log.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT
    line = b""
    while time.monotonic() < deadline and not line.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
    if not line.startswith(b"READY "):
        proc.kill()
        proc.wait()
        pytest.fail(
            f"oidc-provider did not start (exit {proc.returncode}): "
            f"{line.decode(errors='replace')}{log_path.read_text(errors='replace')}",
            pytrace=False,
        )
    issuer = line.split()[1].decode()
    with urllib.request.urlopen(issuer + "/.well-known/openid-configuration", timeout=5) as r:
        metadata = json.loads(r.read())
    return ProviderHandle(issuer, CLIENT_ID, CLIENT_SECRET, proc, log_path, metadata)


def set_outage(provider: ProviderHandle, mode: str) -> None:
    """The provider's test hook: its token endpoint fails (`503`, `reset`) or works (`off`)."""
    url = f"{provider.issuer}/__test/outage?mode={mode}"
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5) as r:
        assert r.status == 200


def _post_seconds(provider: ProviderHandle, hook: str, seconds: float) -> None:
    url = f"{provider.issuer}/__test/{hook}?seconds={seconds}"
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5) as r:
        assert r.status == 200


def set_slow_token_answers(provider: ProviderHandle, seconds: float) -> None:
    """The provider's test hook: each token request is processed at once (a refresh grant
    rotates) and answered `seconds` later; 0 ends it."""
    _post_seconds(provider, "slow", seconds)


def set_refresh_grace(provider: ProviderHandle, seconds: float) -> None:
    """The provider's test hook: a rotated refresh token is accepted again for `seconds`
    after its first use, as IdPs with a grace window do; 0 ends it."""
    _post_seconds(provider, "refresh-grace", seconds)
