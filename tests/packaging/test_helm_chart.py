"""The Helm chart helm/auth-sidecar, checked as files (issue 5); no `helm` binary needed.

Chart.yaml, values.yaml and values.schema.json are parsed; every `.Values.…` reference in the
templates must exist in values.yaml; values.yaml and the example values files, merged over the
defaults the way Helm merges them, must pass the schema (validated with `jsonschema`, by the
draft the schema declares) and their `config:` must pass the sidecar's own validation.
Rendering, `helm lint`, checkov and `helm package` are in test_helm_real.py, with the real tools.
"""

from __future__ import annotations

import copy
import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from pydantic import BaseModel

from sidecar import __version__
from sidecar.config import Config, parse_config, parse_duration
from tests.support.keys import TEST_KEY
from tests.support.repo import REPO_ROOT

CHART = REPO_ROOT / "helm" / "auth-sidecar"
TEMPLATES = CHART / "templates"
EXAMPLES = CHART / "examples"

# The example values files; sidecar-deployment.yaml is a template of an app's chart instead.
VALUES_EXAMPLES = [
    "single-replica-memory.yaml",
    "ha-sentinel.yaml",
    "redis-cluster.yaml",
    "sidecar-values.yaml",
]
SIDECAR_EXAMPLE = EXAMPLES / "sidecar-deployment.yaml"

# What the Secret provides, as the container's environment.
SECRET_ENV = {
    "OIDC_CLIENT_SECRET": "client-secret",
    "SESSION_KEY": TEST_KEY,
    "REDIS_PASSWORD": "redis-password",
    "REDIS_SENTINEL_PASSWORD": "sentinel-password",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def chart() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(CHART / "Chart.yaml")
    return data


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(CHART / "values.yaml")
    return data


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    return data


def merge(defaults: Any, override: Any) -> Any:
    """Helm's values merge: maps merge key by key, null deletes a key, anything else replaces."""
    if not (isinstance(defaults, dict) and isinstance(override, dict)):
        return copy.deepcopy(override)
    out = copy.deepcopy(defaults)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def example_values(name: str, values: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = merge(values, load_yaml(EXAMPLES / name))
    return merged


# --- the schema, with jsonschema -----------------------------------------------------------


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> Validator:
    """A validator of the draft the schema names in `$schema` (what Helm applies too)."""
    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def schema_errors(validator: Validator, instance: Any) -> list[str]:
    """Each error as "<JSON path>: <message>"; [] when valid."""
    errors = sorted(validator.iter_errors(instance), key=lambda e: e.json_path)
    return [f"{e.json_path}: {e.message}" for e in errors]


def test_schema_is_a_valid_draft_07_schema(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert validator_for(schema) is Draft7Validator
    Draft7Validator.check_schema(schema)


# (values override, JSON path of the error, the schema keyword that fails, in its message)
BAD_VALUES: list[tuple[dict[str, Any], str, str, str]] = [
    ({"mode": "sidecars"}, "$.mode", "enum", "'sidecars' is not one of"),
    ({"replicaCount": "3"}, "$.replicaCount", "type", "is not of type 'integer'"),
    ({"replicaCount": True}, "$.replicaCount", "type", "is not of type 'integer'"),
    ({"replicas": 3}, "$", "additionalProperties", "'replicas' was unexpected"),
    ({"config": {"oidc": None}}, "$.config", "required", "'oidc' is a required property"),
    ({"config": {"session": {"store": "file"}}}, "$.config.session.store", "enum", "'file'"),
    ({"config": {"upstreams": []}}, "$.config.upstreams", "minItems", "should be non-empty"),
    (
        {"config": {"server": {"listn": "x"}}},
        "$.config.server",
        "additionalProperties",
        "listn",
    ),
    ({"ports": {"http": 0}}, "$.ports.http", "minimum", "less than the minimum of 1"),
    (
        {"terminationGracePeriodSeconds": "35s"},
        "$.terminationGracePeriodSeconds",
        "type",
        "'35s' is not of type 'integer'",
    ),
    (
        {"podDisruptionBudget": {"enabled": "yes"}},
        "$.podDisruptionBudget.enabled",
        "type",
        "'yes' is not of type 'boolean'",
    ),
    ({"image": {"digest": "latest"}}, "$.image.digest", "pattern", "'latest' does not match"),
]


@pytest.mark.parametrize(
    ("override", "path", "keyword", "mentions"),
    [pytest.param(*row, id=json.dumps(row[0], separators=(",", ":"))) for row in BAD_VALUES],
)
def test_schema_rejects_bad_values(
    override: dict[str, Any],
    path: str,
    keyword: str,
    mentions: str,
    values: dict[str, Any],
    validator: Validator,
) -> None:
    """Typos and wrong types fail, at the right place (the rest of the values stay valid)."""
    errors = list(validator.iter_errors(merge(values, override)))
    assert [(e.json_path, e.validator) for e in errors] == [(path, keyword)], [
        e.message for e in errors
    ]
    assert mentions in errors[0].message


# --- Chart.yaml, values.yaml and the schema ---------------------------------------------


def test_chart_metadata(chart: dict[str, Any], values: dict[str, Any]) -> None:
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "auth-sidecar" == CHART.name
    assert chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", str(chart["version"]))
    assert chart["appVersion"] == __version__, "appVersion follows sidecar.__version__"
    assert values["image"]["tag"] == chart["appVersion"], "the default image is the app version"


def test_values_match_the_schema(values: dict[str, Any], validator: Validator) -> None:
    assert schema_errors(validator, values) == []


def test_schema_accepts_a_digest(values: dict[str, Any], validator: Validator) -> None:
    pinned = merge(values, {"image": {"digest": "sha256:" + "0123456789abcdef" * 4}})
    assert schema_errors(validator, pinned) == []


@pytest.mark.parametrize("name", VALUES_EXAMPLES)
def test_example_values_match_the_schema(
    name: str, values: dict[str, Any], validator: Validator
) -> None:
    assert schema_errors(validator, example_values(name, values)) == []


def test_every_example_file_is_covered() -> None:
    files = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert files == {*VALUES_EXAMPLES, SIDECAR_EXAMPLE.name}


def test_top_level_schema_is_closed(values: dict[str, Any], schema: dict[str, Any]) -> None:
    """Typos in top-level keys fail `helm lint`; every documented key is in the schema."""
    assert schema["additionalProperties"] is False
    assert set(values) <= set(schema["properties"])
    assert set(schema["properties"]) - set(values) <= {"global"}  # global: Helm's, as a subchart
    assert set(schema["properties"]["config"]["required"]) == {
        "server",
        "oidc",
        "session",
        "upstreams",
    }


def _section_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def test_schema_knows_every_sidecar_config_key(schema: dict[str, Any]) -> None:
    """The schema closes the config sections (typos fail `helm lint`), so a key added to the
    sidecar's config must be added to values.schema.json too: this test says which."""
    config_schema = schema["properties"]["config"]
    missing: list[str] = []
    for section, field in Config.model_fields.items():
        section_schema = config_schema["properties"].get(section)
        if section_schema is None:
            missing.append(f"config.{section}")
            continue
        model = _section_model(field.annotation)
        if model is None:
            continue
        if section_schema.get("type") == "array":
            section_schema = section_schema["items"]
        for key in model.model_fields:
            if key not in section_schema.get("properties", {}):
                missing.append(f"config.{section}.{key}")
    assert missing == [], f"add to helm/auth-sidecar/values.schema.json: {missing}"


# --- the config: map is a valid sidecar configuration ---------------------------------


def sidecar_config(values: dict[str, Any]) -> Config:
    """Parse `config:` as the sidecar will, with the Secret's variables set."""
    config = copy.deepcopy(values["config"])
    return parse_config(yaml.safe_dump(config), env=SECRET_ENV, source="values config")


def test_default_config_is_a_valid_sidecar_config(values: dict[str, Any]) -> None:
    config = sidecar_config(values)
    assert config.session.store == "redis"
    assert config.oidc.client_secret is not None
    assert config.oidc.client_secret.get_secret_value() == SECRET_ENV["OIDC_CLIENT_SECRET"]


@pytest.mark.parametrize("name", VALUES_EXAMPLES)
def test_example_config_is_a_valid_sidecar_config(name: str, values: dict[str, Any]) -> None:
    sidecar_config(example_values(name, values))


def test_redis_topology_examples_configure_the_sidecar(values: dict[str, Any]) -> None:
    """The Sentinel and Cluster examples parse into real Sentinel and Cluster settings."""
    sentinel = sidecar_config(example_values("ha-sentinel.yaml", values)).redis.sentinel
    assert sentinel is not None and sentinel.master_name and len(sentinel.addresses) >= 3
    assert sentinel.password is not None
    cluster = sidecar_config(example_values("redis-cluster.yaml", values)).redis.cluster
    assert cluster is not None and len(cluster.nodes) >= 3


def test_memory_example_is_one_process(values: dict[str, Any]) -> None:
    merged = example_values("single-replica-memory.yaml", values)
    config = sidecar_config(merged)
    assert config.session.store == "memory"
    assert merged["replicaCount"] == 1 and config.server.workers == 1
    assert not merged["autoscaling"]["enabled"]


@pytest.mark.parametrize("name", [None, *VALUES_EXAMPLES])
def test_ports_match_the_listen_addresses(name: str | None, values: dict[str, Any]) -> None:
    merged = example_values(name, values) if name else values
    config = sidecar_config(merged)
    assert config.server.listen.port == merged["ports"]["http"]
    assert config.management.listen.port == merged["ports"]["management"]
    assert config.server.listen.host == config.management.listen.host == "0.0.0.0"


@pytest.mark.parametrize("name", [None, *VALUES_EXAMPLES])
def test_termination_grace_covers_the_drain(name: str | None, values: dict[str, Any]) -> None:
    """SIGKILL must not arrive before shutdown_delay + shutdown_grace, plus a margin for
    closing pools and the worker supervisor's last wait."""
    merged = example_values(name, values) if name else values
    server = merged["config"]["server"]
    drain = parse_duration(server.get("shutdown_delay", 0)) + parse_duration(
        server.get("shutdown_grace", "25s")
    )
    assert merged["terminationGracePeriodSeconds"] >= drain + 5


@pytest.mark.parametrize("name", [None, *VALUES_EXAMPLES])
def test_no_inline_secrets(name: str | None, values: dict[str, Any]) -> None:
    """Secrets reach the config only as ${ENV} / ${file:} references."""
    merged = example_values(name, values) if name else values
    config = merged["config"]
    secret = config["oidc"].get("client_secret")
    assert secret is None or secret.startswith("${")
    for key in config["session"]["encryption_keys"]:
        assert key.startswith("${"), "session keys come from the Secret"
    url = (config.get("redis") or {}).get("url", "")
    userinfo = url.partition("://")[2].partition("@")[0] if "@" in url else ""
    password = userinfo.partition(":")[2]
    assert password in ("", "${REDIS_PASSWORD:-}", "${REDIS_PASSWORD}")


# --- templates --------------------------------------------------------------------------


def template_files() -> list[Path]:
    return sorted(TEMPLATES.iterdir())


def without_comments(text: str) -> str:
    return re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", text, flags=re.DOTALL)


def resolve(values: Any, dotted: str) -> bool:
    node = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_every_values_reference_exists(values: dict[str, Any]) -> None:
    missing: list[str] = []
    for path in template_files():
        text = without_comments(path.read_text(encoding="utf-8"))
        for ref in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", text):
            ref = ref.rstrip(".")
            if ref.startswith("config."):
                assert "config" in values  # below config: the sidecar's free-form file
                continue
            if not resolve(values, ref):
                missing.append(f"{path.name}: .Values.{ref}")
    assert missing == []


def defined_templates() -> set[str]:
    text = (TEMPLATES / "_helpers.tpl").read_text(encoding="utf-8")
    return set(re.findall(r'\{\{-?\s*define\s+"([^"]+)"', text))


def test_sidecar_mode_templates_exist_and_are_documented() -> None:
    text = (TEMPLATES / "_helpers.tpl").read_text(encoding="utf-8")
    assert {"auth-sidecar.container", "auth-sidecar.volumes"} <= defined_templates()
    for name in ("auth-sidecar.container", "auth-sidecar.volumes"):
        comment = re.search(r"/\*\s*\n" + re.escape(name) + r" — ", text)
        assert comment, f"{name}: document the named template in a comment above it"


def container_template() -> str:
    text = (TEMPLATES / "_helpers.tpl").read_text(encoding="utf-8")
    match = re.search(r'define "auth-sidecar.container" -\}\}(.*?)\{\{- end \}\}\n\n', text, re.S)
    assert match
    return match.group(1)


def test_secrets_come_from_the_secret_as_environment() -> None:
    text = container_template()
    for env in ("OIDC_CLIENT_SECRET", "SESSION_KEY", "REDIS_PASSWORD"):
        assert re.search(rf"- name: {env}\n      valueFrom:\n        secretKeyRef:", text), env
    assert 'include "auth-sidecar.secretName"' in text
    for path in template_files():
        assert "kind: Secret" not in path.read_text(encoding="utf-8"), "no Secret is created"


def test_security_context_defaults(values: dict[str, Any]) -> None:
    container = values["securityContext"]
    assert container["runAsNonRoot"] is True
    assert container["runAsUser"] == container["runAsGroup"] == 10001  # the Dockerfile's USER
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    assert container["seccompProfile"]["type"] == "RuntimeDefault"
    pod = values["podSecurityContext"]
    assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert "securityContext:\n    {{- toYaml .Values.securityContext" in container_template()
    assert "mountPath: /tmp" in container_template()  # the one writable directory


def test_sidecar_example_puts_the_sidecar_in_front(values: dict[str, Any]) -> None:
    text = SIDECAR_EXAMPLE.read_text(encoding="utf-8")
    assert 'include "auth-sidecar.container" $sidecar' in text
    assert 'include "auth-sidecar.volumes" $sidecar' in text
    assert "targetPort: proxy" in text
    assert "127.0.0.1:8080" in text
    config = sidecar_config(example_values("sidecar-values.yaml", values))
    assert [u.url for u in config.upstreams] == ["http://127.0.0.1:8080"]


def test_readme_lists_every_top_level_value(values: dict[str, Any]) -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    rows = "\n".join(ln for ln in readme.splitlines() if ln.startswith("| `"))
    for key in values:
        assert re.search(rf"`{key}[`.]", rows), f"README.md: no row for {key}"
