"""Session administration from outside the request path: the `auth-sidecar sessions` command
talking to Redis directly, and the admin API of a multi-worker sidecar, which the supervisor
serves (docs/operations.md, "Admin API" and "Sessions from the command line")."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sidecar.config import SessionConfig
from sidecar.redis.store import RedisSessionStore
from sidecar.session import Keyring, Session, SessionManager
from tests.support.configs import config_dict
from tests.support.keys import TEST_KEY
from tests.support.login import browser as new_browser
from tests.support.login import login, session_cookie
from tests.support.records import record
from tests.support.repo import REPO_ROOT
from tests.support.sidecars import SidecarProcess
from tests.support.stores import REDIS_URL, store_sections

ISSUER = "https://idp.example"
ADMIN_TOKEN = "admin-token-for-the-tests-0123456789"


def sessions_command(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "sessions", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        check=False,
    )


async def _stored(prefix: str, subjects: list[str]) -> tuple[list[Session], RedisSessionStore]:
    store = RedisSessionStore.from_url(REDIS_URL, prefix)
    config = SessionConfig.model_validate({"encryption_keys": [TEST_KEY]})
    sessions = SessionManager(store, Keyring.from_base64([TEST_KEY]), config)
    made = [await sessions.create(record(subject=s, idp_session_id=None)) for s in subjects]
    return made, store


def _config_file(tmp_path: Path, prefix: str, **sections: Any) -> Path:
    data = config_dict(**store_sections("redis", prefix), **sections)
    data["oidc"]["issuer"] = ISSUER
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def test_the_sessions_command_lists_and_ends_sessions(
    redis_prefix: str, tmp_path: Path
) -> None:
    made, store = await _stored(redis_prefix, ["alice", "alice", "alice", "bob"])
    try:
        config = _config_file(tmp_path, redis_prefix)
        listed = sessions_command(config, "list", "--sub", "alice")
        assert listed.returncode == 0, listed.stderr
        shown = json.loads(listed.stdout)["sessions"]
        assert sorted(s["id"] for s in shown) == sorted(s.h for s in made[:3])
        assert {s["sub"] for s in shown} == {"alice"}
        assert not any(s.id in listed.stdout for s in made)  # hashes only, never an id

        one = sessions_command(config, "end", "--id", made[0].h)
        assert (one.returncode, json.loads(one.stdout)) == (0, {"ended": 1})
        again = sessions_command(config, "end", "--id", made[0].h)
        assert again.returncode == 1 and "no live session" in again.stderr
        rest = sessions_command(config, "end", "--sub", "alice")
        assert (rest.returncode, json.loads(rest.stdout)) == (0, {"ended": 2})
        assert json.loads(sessions_command(config, "list", "--sub", "alice").stdout) == {
            "sessions": []
        }
        other = sessions_command(config, "list", "--sub", "bob", "--iss", "https://x.example")
        assert json.loads(other.stdout) == {"sessions": []}
        assert (
            len(json.loads(sessions_command(config, "list", "--sub", "bob").stdout)["sessions"])
            == 1
        )
    finally:
        await store.close()


def test_the_sessions_command_explains_what_it_cannot_do(tmp_path: Path) -> None:
    memory = tmp_path / "memory.yaml"
    memory.write_text(yaml.safe_dump(config_dict()))
    result = sessions_command(memory, "list", "--sub", "alice")
    assert result.returncode == 1 and "memory" in result.stderr and "Traceback" not in result.stderr

    unreachable = config_dict(**store_sections("redis", "x"))
    unreachable["redis"]["url"] = "redis://127.0.0.1:1/0"
    path = tmp_path / "unreachable.yaml"
    path.write_text(yaml.safe_dump(unreachable))
    result = sessions_command(path, "list", "--sub", "alice")
    assert result.returncode == 1 and "redis" in result.stderr and "Traceback" not in result.stderr

    usage = sessions_command(path, "end")
    assert usage.returncode == 2 and "--sub" in usage.stderr


async def _admin(url: str, method: str = "GET", token: str | None = ADMIN_TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as s, s.request(method, url, headers=headers) as r:
        body = await r.read()
        return r.status, json.loads(body) if r.content_type == "application/json" else None


async def test_a_multi_worker_sidecar_serves_the_admin_api_from_its_supervisor(
    sidecar_process: Callable[..., SidecarProcess], redis_prefix: str
) -> None:
    data = config_dict(
        **store_sections("redis", redis_prefix),
        public_paths=[],
        admin={"tokens": [ADMIN_TOKEN]},
    )
    data["server"]["workers"] = 2
    proc = sidecar_process(data)
    async with new_browser() as b:
        await login(b, proc, "/app")
        cookie = session_cookie(b)
    listing = proc.management + "/admin/sessions?sub=alice"
    assert (await _admin(listing, token=None))[0] == 401
    status, body = await _admin(listing)
    assert status == 200 and len(body["sessions"]) == 1
    assert await _admin(listing, "DELETE") == (200, {"ended": 1})
    headers = {"Cookie": f"sidecar={cookie}", "Accept": "application/json"}
    await asyncio.sleep(0.1)  # cached copies in the workers go within 100 ms (change feed)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        # Both workers: each may have had the session cached.
        for _ in range(10):
            async with s.get(proc.url("/app"), headers=headers, allow_redirects=False) as r:
                assert r.status == 401
