"""examples/keycloak (Keycloak, Redis, an app and the sidecar in Compose) holds together: the
sidecar's config passes the validator, and the realm, the Compose file and the config agree
on client, secret, redirect URIs, groups and files. The containers themselves need a registry,
which CI does not reach; users run them on their own machines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import load_config
from tests.support.keys import TEST_KEY
from tests.support.repo import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "keycloak"


def _compose() -> dict[str, Any]:
    return yaml.safe_load((EXAMPLE / "compose.yaml").read_text())  # type: ignore[no-any-return]


def _realm() -> dict[str, Any]:
    return json.loads((EXAMPLE / "realm-demo.json").read_text())  # type: ignore[no-any-return]


def test_the_sidecar_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    environment = _compose()["services"]["sidecar"]["environment"]
    monkeypatch.setenv("OIDC_CLIENT_SECRET", environment["OIDC_CLIENT_SECRET"])
    monkeypatch.setenv("SESSION_KEY", TEST_KEY)
    config = load_config(str(EXAMPLE / "sidecar.yaml"))
    assert config.session.store == "redis"


def test_realm_compose_and_config_agree() -> None:
    config = yaml.safe_load((EXAMPLE / "sidecar.yaml").read_text())
    realm = _realm()
    (client,) = realm["clients"]
    compose = _compose()
    public_url = config["server"]["public_url"]
    assert config["oidc"]["issuer"] == f"http://localhost:8080/realms/{realm['realm']}"
    assert config["oidc"]["client_id"] == client["clientId"]
    assert compose["services"]["sidecar"]["environment"]["OIDC_CLIENT_SECRET"] == client["secret"]
    assert client["redirectUris"] == [public_url + "/oauth2/callback"]
    assert (
        client["attributes"]["post.logout.redirect.uris"]
        == config["oidc"]["post_logout_redirect_url"]
    )
    # The rotation the sidecar is built for, and tokens short enough to watch a refresh.
    assert realm["revokeRefreshToken"] is True and realm["refreshTokenMaxReuse"] == 0
    assert realm["accessTokenLifespan"] > 2 * int(config["refresh"]["before_expiry"].rstrip("s"))
    # /admin admits the admins group, which the groups mapper puts in the `groups` claim.
    (admin,) = [u for u in config["upstreams"] if u["path"] == "/admin"]
    assert admin["access"]["allowed_groups"] == ["admins"]
    mapper = client["protocolMappers"][0]["config"]
    assert mapper["claim.name"] == "groups" and mapper["full.path"] == "false"
    alice = next(u for u in realm["users"] if u["username"] == "alice")
    assert "/admins" in alice["groups"]
    # Where Compose says the services listen is where the config looks for them.
    app_port = compose["services"]["app"]["command"][-1]
    assert all(u["url"] == f"http://localhost:{app_port}" for u in config["upstreams"])
    assert config["redis"]["url"].startswith("redis://localhost:6379/")
    assert "--http-port=8080" in compose["services"]["keycloak"]["command"]


def test_compose_mounts_files_that_exist() -> None:
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert (EXAMPLE / source).resolve().exists(), (name, source)
        build = service.get("build")
        if build is not None:
            assert (EXAMPLE / build / "Dockerfile").exists(), name


def test_readme_points_to_the_example() -> None:
    assert "examples/keycloak" in (REPO_ROOT / "README.md").read_text()
    assert Path(EXAMPLE / "README.md").exists()
