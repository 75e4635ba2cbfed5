"""`auth-sidecar config-schema` agrees with the validator: what one accepts the other accepts,
durations are strings with a unit (their defaults too), and every key is described."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml

from sidecar.config import Config
from sidecar.config.schema import config_schema
from sidecar.config.types import DURATION_PATTERN, parse_duration
from tests.support.keys import TEST_KEY
from tests.support.repo import EXAMPLE_CONFIG


def _valid() -> dict[str, Any]:
    return {
        "server": {"public_url": "https://app.example.com"},
        "oidc": {"issuer": "https://idp.example.com", "client_id": "app", "client_secret": "s"},
        "session": {"encryption_keys": [TEST_KEY]},
        "refresh": {"before_expiry": "60s"},
        "upstreams": [{"path": "/", "url": "http://127.0.0.1:8080"}],
    }


def _properties() -> list[tuple[str, str, dict[str, Any]]]:
    schema = config_schema()
    sections = {"Config": schema, **schema["$defs"]}
    return [
        (model, name, prop)
        for model, section in sections.items()
        for name, prop in section.get("properties", {}).items()
    ]


def _is_duration(prop: dict[str, Any]) -> bool:
    return any(p.get("pattern") == DURATION_PATTERN for p in [prop, *prop.get("anyOf", ())])


def test_every_key_is_described() -> None:
    undescribed = [f"{m}.{n}" for m, n, p in _properties() if not p.get("description")]
    assert undescribed == []


def test_duration_defaults_are_durations_the_validator_takes() -> None:
    durations = [(m, n, p) for m, n, p in _properties() if _is_duration(p) and "default" in p]
    assert len(durations) >= 12  # refresh, server, session and upstream timings
    for model, name, prop in durations:
        default = prop["default"]
        assert isinstance(default, str), f"{model}.{name}: default {default!r}"
        assert jsonschema.Draft202012Validator(prop).is_valid(default), (model, name)
        assert parse_duration(default) >= 0, (model, name)


def test_the_example_configuration_validates_against_the_schema() -> None:
    document = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    jsonschema.Draft202012Validator(config_schema()).validate(document)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("refresh.before_expiry", 60),  # a bare number: the validator says "ambiguous"
        ("refresh.before_expiry", "60 seconds"),
        ("server.workers", 0),
        ("session.store", "disk"),
        ("server.workres", 2),  # an unknown key
    ],
)
def test_what_the_validator_refuses_the_schema_refuses(key: str, value: Any) -> None:
    document = _valid()
    jsonschema.Draft202012Validator(config_schema()).validate(document)
    Config.model_validate(document)  # both take the unchanged document
    section, name = key.split(".")
    document.setdefault(section, {})[name] = value
    assert not jsonschema.Draft202012Validator(config_schema()).is_valid(document)
    with pytest.raises(ValueError):
        Config.model_validate(document)
