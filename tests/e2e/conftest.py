"""End-to-end fixtures: the certified `oidc-provider` (Node) as a real OpenID provider process.

`oidc_provider` is a factory: `oidc_provider(public_url)` starts `node tests/e2e/provider.mjs`
on a free port with one confidential client registered for that sidecar URL, waits for its
`READY <issuer>` line and returns a `ProviderHandle`. Every provider started is stopped after
the test. A missing `node` or `tests/e2e/node_modules` fails the test: these tests never skip.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import stop_process

E2E_DIR = Path(__file__).resolve().parent
REPO_ROOT = E2E_DIR.parent.parent
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


def _start(tmp_path: Path, public_url: str, options: dict[str, Any], index: int) -> ProviderHandle:
    node = _require_node()
    base = public_url.rstrip("/")
    client = {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "redirect_uris": [base + "/oauth2/callback"],
        "post_logout_redirect_uris": [base + "/"],
    }
    client.update(options.pop("client", {}))
    config = {"port": 0, "clients": [client], **options}
    log_path = tmp_path / f"oidc-provider-{index}.log"
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


@pytest.fixture
def oidc_provider(tmp_path: Path) -> Iterator[Callable[..., ProviderHandle]]:
    """`oidc_provider(public_url, **options)` runs oidc-provider with a client for that URL.

    Options go to `provider.mjs` as they are (`access_token_ttl`, `refresh_token_ttl`,
    `conform_id_token_claims`, `client={...}` to change the client's registration).
    """
    started: list[ProviderHandle] = []

    def start(public_url: str, **options: Any) -> ProviderHandle:
        handle = _start(tmp_path, public_url, options, len(started))
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()
        if handle.proc.stdout is not None:
            handle.proc.stdout.close()
