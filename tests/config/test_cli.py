"""The `auth-sidecar` command line, mostly run as real processes (docs/configuration.md)."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar import __version__, cli
from sidecar.config import Config
from tests.support.configs import EXAMPLE_ENV, fixed_config
from tests.support.keys import TEST_KEY
from tests.support.ports import free_port
from tests.support.repo import EXAMPLE_CONFIG, REPO_ROOT

CONSOLE_SCRIPT = Path(sys.executable).parent / "auth-sidecar"


def run_cli(
    *args: str, env: dict[str, str] | None = None, script: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run `python -m sidecar ARGS` (or the console script) with a clean config environment."""
    base = {k: v for k, v in os.environ.items() if k not in ("AUTH_SIDECAR_CONFIG",)}
    command = [str(CONSOLE_SCRIPT)] if script else [sys.executable, "-m", "sidecar"]
    return subprocess.run(
        [*command, *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        check=False,
    )


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_check_config_accepts_example() -> None:
    """`check-config` on config.example.yaml with its secrets set exits 0."""
    result = run_cli("check-config", "--config", str(EXAMPLE_CONFIG), env=EXAMPLE_ENV)
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout


def test_console_script_check_config() -> None:
    """The installed `auth-sidecar` console script runs check-config too."""
    assert CONSOLE_SCRIPT.exists()
    result = run_cli("check-config", "--config", str(EXAMPLE_CONFIG), env=EXAMPLE_ENV, script=True)
    assert result.returncode == 0, result.stderr


def test_check_config_broken_exits_1_without_traceback(tmp_path: Path) -> None:
    """A broken config exits 1; stderr names the key and shows no traceback."""
    data = fixed_config()
    data["upstreams"][0]["timeout"] = 30
    data["refresh"] = {"idp_timeout": "10s", "lock_ttl": "500ms"}
    path = write_config(tmp_path, data)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 1
    assert "upstreams[0].timeout: expected a duration with a unit" in result.stderr
    assert "refresh.lock_ttl: must be at least 1s" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_check_config_missing_secret_is_named() -> None:
    """The example without its environment names both missing variables, never a traceback."""
    result = run_cli("check-config", "--config", str(EXAMPLE_CONFIG))
    assert result.returncode == 1
    assert "oidc.client_secret: environment variable OIDC_CLIENT_SECRET is not set" in (
        result.stderr
    )
    assert "session.encryption_keys[0]: environment variable SESSION_KEY is not set" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_check_config_bad_key_value_not_printed(tmp_path: Path) -> None:
    """A wrong encryption key is named on stderr but its value is not printed."""
    bad = "THIS-KEY-VALUE-MUST-NOT-BE-PRINTED"
    path = write_config(tmp_path, fixed_config(session={"encryption_keys": [bad]}))
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 1
    assert "session.encryption_keys[0]: expected 32 bytes of base64" in result.stderr
    assert bad not in result.stderr + result.stdout


def test_check_config_yaml_error_has_line(tmp_path: Path) -> None:
    """Invalid YAML exits 1 with the line number and no traceback."""
    path = tmp_path / "broken.yaml"
    path.write_text("server:\n  listen: [\n")
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 1
    assert "line 3, column 1: not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_option() -> None:
    """Without --config and AUTH_SIDECAR_CONFIG the CLI says how to pass one, exit 1."""
    result = run_cli("check-config")
    assert result.returncode == 1
    assert "pass --config FILE or set AUTH_SIDECAR_CONFIG" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_from_environment_variable() -> None:
    """AUTH_SIDECAR_CONFIG names the config file when --config is absent."""
    env = {**EXAMPLE_ENV, "AUTH_SIDECAR_CONFIG": str(EXAMPLE_CONFIG)}
    result = run_cli("check-config", env=env)
    assert result.returncode == 0, result.stderr
    assert str(EXAMPLE_CONFIG) in result.stdout


def test_missing_config_file() -> None:
    """A config path that does not exist exits 1 naming the path."""
    result = run_cli("check-config", "--config", "/nonexistent/sidecar.yaml")
    assert result.returncode == 1
    assert "cannot read /nonexistent/sidecar.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_schema_is_json_schema() -> None:
    """`config-schema` prints a JSON Schema with every section and no extra keys allowed."""
    result = run_cli("config-schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(Config.model_fields)
    assert set(schema["required"]) == {"server", "oidc", "session", "upstreams"}
    for name, definition in schema["$defs"].items():
        assert definition["additionalProperties"] is False, name


def test_config_schema_describes_example() -> None:
    """Every key of config.example.yaml is a property of the printed schema, typed alike."""
    schema = json.loads(run_cli("config-schema").stdout)
    data = yaml.safe_load(EXAMPLE_CONFIG.read_text())

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in node:
            return resolve(schema["$defs"][node["$ref"].rsplit("/", 1)[1]])
        if "anyOf" in node:
            return resolve(next(n for n in node["anyOf"] if n.get("type") != "null"))
        return node

    def check(node: dict[str, Any], value: Any, where: str) -> None:
        node = resolve(node)
        if isinstance(value, dict) and "properties" in node:
            for key, sub in value.items():
                assert key in node["properties"], f"{where}.{key} is not in the schema"
                check(node["properties"][key], sub, f"{where}.{key}")
        elif isinstance(value, list):
            assert node["type"] == "array", where
            for i, item in enumerate(value):
                check(node["items"], item, f"{where}[{i}]")
        elif isinstance(value, str) and "type" in node:
            assert node["type"] == "string", where

    check(schema, data, "")
    duration = schema["$defs"]["RefreshConfig"]["properties"]["lock_ttl"]
    assert duration["type"] == "string"
    assert "pattern" in duration


def test_generate_key_prints_32_random_bytes() -> None:
    """`generate-key` prints base64 of 32 bytes, different on every call."""
    first = run_cli("generate-key")
    second = run_cli("generate-key")
    assert first.returncode == 0
    key = first.stdout.strip()
    assert len(base64.b64decode(key, validate=True)) == 32
    assert key != second.stdout.strip()


def test_generated_key_is_accepted_by_config(capsys: pytest.CaptureFixture[str]) -> None:
    """A key from `generate-key` passes the config's key check."""
    assert cli.main(["generate-key"]) == 0
    key = capsys.readouterr().out.strip()
    Config.model_validate(fixed_config(session={"encryption_keys": [key]}))


def test_version() -> None:
    """`--version` prints the package version and exits 0."""
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"auth-sidecar {__version__}"


def test_no_command_prints_help() -> None:
    """Without a command the usage goes to stderr and the exit code is 2."""
    result = run_cli()
    assert result.returncode == 2
    assert "usage: auth-sidecar" in result.stderr


def test_run_workers_override_is_validated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run --workers 2` with the memory store fails like the same value in the file."""
    path = write_config(
        tmp_path, fixed_config(session={"store": "memory", "encryption_keys": [TEST_KEY]})
    )
    assert cli.main(["run", "--config", str(path), "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert "session.store: memory keeps sessions inside one process" in err


def test_run_workers_zero_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`run --workers 0` is refused, naming server.workers."""
    path = write_config(tmp_path, fixed_config())
    assert cli.main(["run", "--config", str(path), "--workers", "0"]) == 1
    assert "server.workers: expected a value greater than or equal to 1" in capsys.readouterr().err


def test_run_workers_override_reaches_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run --workers 3` hands a config with server.workers 3 to the server, rest unchanged."""
    import sidecar.logging
    import sidecar.server

    seen: list[Config] = []
    monkeypatch.setattr(sidecar.server, "run", lambda config, *_, **__: seen.append(config))
    monkeypatch.setattr(sidecar.logging, "configure_logging", lambda level: None)
    data = fixed_config()
    path = write_config(tmp_path, data)
    assert cli.main(["run", "--config", str(path), "--workers", "3"]) == 0
    (config,) = seen
    assert config.server.workers == 3
    assert str(config.server.listen) == data["server"]["listen"]
    assert config.session.encryption_keys[0].get_secret_value() == TEST_KEY


def test_run_without_override_uses_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` without --workers keeps the file's server.workers."""
    import sidecar.logging
    import sidecar.server

    seen: list[Config] = []
    monkeypatch.setattr(sidecar.server, "run", lambda config, *_, **__: seen.append(config))
    monkeypatch.setattr(sidecar.logging, "configure_logging", lambda level: None)
    data = fixed_config()
    data["server"]["workers"] = 5
    assert cli.main(["run", "--config", str(write_config(tmp_path, data))]) == 0
    assert seen[0].server.workers == 5


def test_run_broken_config_exits_1(tmp_path: Path) -> None:
    """`python -m sidecar run` with a broken config exits 1 before listening, no traceback."""
    data = fixed_config()
    data["server"]["lisen"] = "127.0.0.1:1"
    result = run_cli("run", "--config", str(write_config(tmp_path, data)))
    assert result.returncode == 1
    assert "server.lisen: unknown key; did you mean 'listen'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_port_in_use_exits_1(tmp_path: Path) -> None:
    """A management port already taken ends `run` with exit 1 naming the key, no traceback.

    With the Redis store this also guards shutdown: the store probe once swallowed its
    cancellation (redis-py turned it into a connection error) and the process never exited.
    """
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        data = fixed_config()
        data["server"]["listen"] = f"127.0.0.1:{free_port()}"
        data["management"]["listen"] = f"127.0.0.1:{taken.getsockname()[1]}"
        result = run_cli("run", "--config", str(write_config(tmp_path, data)))
    assert result.returncode == 1
    assert "management.listen: cannot listen on 127.0.0.1:" in result.stderr
    assert "address already in use" in result.stderr
    assert "Traceback" not in result.stderr
