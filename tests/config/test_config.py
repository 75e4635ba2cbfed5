"""Configuration: reference expansion, scalar types, and errors that name the key
(docs/configuration.md)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import Address, Config, load_config, parse_config, parse_duration
from sidecar.errors import ConfigError
from tests.support.configs import EXAMPLE_ENV, fixed_config
from tests.support.keys import TEST_KEY
from tests.support.repo import EXAMPLE_CONFIG


def parse(data: dict[str, Any] | str, env: dict[str, str] | None = None) -> Config:
    text = data if isinstance(data, str) else yaml.safe_dump(data)
    return parse_config(text, env=env or {})


def problems(data: dict[str, Any] | str, env: dict[str, str] | None = None) -> list[str]:
    """The problems of an invalid configuration; fails the test if it is valid."""
    with pytest.raises(ConfigError) as caught:
        parse(data, env)
    return caught.value.problems


def with_values(**changes: Any) -> dict[str, Any]:
    """`fixed_config()` with dotted keys replaced: `with_values(**{"server.workers": 2})`."""
    data = fixed_config()
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[last] = value
    return data


# --- the example file ------------------------------------------------------------------------


def test_example_config_is_valid() -> None:
    """config.example.yaml validates once its two secrets are in the environment."""
    config = load_config(EXAMPLE_CONFIG, env=EXAMPLE_ENV)
    assert config.oidc.client_secret is not None
    assert config.oidc.client_secret.get_secret_value() == "example-secret"
    assert config.session.encryption_keys[0].get_secret_value() == TEST_KEY


def test_example_documents_every_key() -> None:
    """Every key the models know appears in config.example.yaml (docs/configuration.md)."""
    data = yaml.safe_load(EXAMPLE_CONFIG.read_text())

    def missing(model: Any, node: dict[str, Any], where: str) -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            if name not in node:
                out.append(f"{where}{name}")
                continue
            sub = node[name]
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                out += missing(annotation, sub, f"{where}{name}.")
        return out

    assert missing(Config, data, "") == []
    upstream_model = Config.model_fields["upstreams"].annotation.__args__[0]  # type: ignore[union-attr]
    assert missing(upstream_model, data["upstreams"][0], "upstreams[0].") == []


# --- references ------------------------------------------------------------------------------


def test_env_reference_is_expanded() -> None:
    """`${NAME}` is replaced by the environment variable's value."""
    data = with_values(**{"oidc.client_secret": "${SECRET}"})
    config = parse(data, {"SECRET": "s3cr3t"})
    assert config.oidc.client_secret is not None
    assert config.oidc.client_secret.get_secret_value() == "s3cr3t"


def test_env_reference_inside_text() -> None:
    """A reference can sit inside a longer string and several can share one."""
    data = with_values(**{"upstreams.0.url": "http://${HOST}:${PORT}/base"})
    config = parse(data, {"HOST": "backend", "PORT": "8080"})
    assert config.upstreams[0].url == "http://backend:8080/base"


def test_env_reference_typed_by_the_model() -> None:
    """An expanded string becomes an int or bool where the model wants one."""
    data = with_values(**{"server.workers": "${W}", "session.cookie_secure": "${SECURE}"})
    data["session"]["cookie_name"] = "sidecar"
    config = parse(data, {"W": "3", "SECURE": "false"})
    assert config.server.workers == 3
    assert config.session.cookie_secure is False


def test_env_default_used_when_unset() -> None:
    """`${NAME:-default}` falls back to the default only when NAME is unset."""
    data = with_values(**{"oidc.client_id": "${CLIENT:-fallback}"})
    assert parse(data).oidc.client_id == "fallback"
    assert parse(data, {"CLIENT": "given"}).oidc.client_id == "given"


def test_env_default_may_be_empty() -> None:
    """`${NAME:-}` expands to the empty string when NAME is unset."""
    data = with_values(**{"oidc.client_id": "app${SUFFIX:-}"})
    assert parse(data).oidc.client_id == "app"


def test_file_reference_strips_trailing_newline(tmp_path: Path) -> None:
    """`${file:/path}` reads the file and drops its trailing newline, as in k8s secrets."""
    secret = tmp_path / "client-secret"
    secret.write_text("from-a-file\n")
    data = with_values(**{"oidc.client_secret": f"${{file:{secret}}}"})
    config = parse(data)
    assert config.oidc.client_secret is not None
    assert config.oidc.client_secret.get_secret_value() == "from-a-file"


def test_file_reference_keeps_inner_newlines(tmp_path: Path) -> None:
    """Only the trailing newline of a secret file is dropped, not the ones inside."""
    secret = tmp_path / "multi"
    secret.write_text("line1\nline2\n")
    data = with_values(**{"oidc.client_secret": f"${{file:{secret}}}"})
    config = parse(data)
    assert config.oidc.client_secret is not None
    assert config.oidc.client_secret.get_secret_value() == "line1\nline2"


def test_file_reference_in_a_list(tmp_path: Path) -> None:
    """An encryption key can come from a mounted secret file."""
    key = tmp_path / "session-key"
    key.write_text(TEST_KEY + "\n")
    data = with_values(**{"session.encryption_keys": [f"${{file:{key}}}"]})
    assert parse(data).session.encryption_keys[0].get_secret_value() == TEST_KEY


def test_double_dollar_is_a_literal() -> None:
    """`$${NAME}` writes a literal `${NAME}` and is not expanded."""
    data = with_values(**{"oidc.client_secret": "pa$${NOT_EXPANDED}ss"})
    config = parse(data, {"NOT_EXPANDED": "oops"})
    assert config.oidc.client_secret is not None
    assert config.oidc.client_secret.get_secret_value() == "pa${NOT_EXPANDED}ss"


def test_expanded_value_is_not_expanded_again() -> None:
    """A value that itself contains `${...}` is taken as is, not expanded a second time."""
    data = with_values(**{"oidc.client_secret": "${A}"})
    config = parse(data, {"A": "${B}", "B": "nested"})
    assert config.oidc.client_secret is not None
    assert config.oidc.client_secret.get_secret_value() == "${B}"


def test_unset_env_names_key_and_variable() -> None:
    """An unset variable without default is an error naming the key and the variable."""
    data = with_values(**{"upstreams.0.url": "${UPSTREAM_URL}"})
    assert problems(data) == ["upstreams[0].url: environment variable UPSTREAM_URL is not set"]


def test_every_unset_env_is_reported() -> None:
    """All unset variables are reported at once, not only the first."""
    data = with_values(**{"oidc.client_secret": "${A}", "session.encryption_keys": ["${B}"]})
    assert problems(data) == [
        "oidc.client_secret: environment variable A is not set",
        "session.encryption_keys[0]: environment variable B is not set",
    ]


def test_unreadable_file_names_key_and_path(tmp_path: Path) -> None:
    """A missing secret file is an error naming the key, the path and the reason."""
    path = tmp_path / "absent"
    data = with_values(**{"oidc.client_secret": f"${{file:{path}}}"})
    (problem,) = problems(data)
    assert problem.startswith(f"oidc.client_secret: cannot read {path}: ")
    assert "No such file" in problem


def test_invalid_reference_names_key() -> None:
    """`${1BAD}` is refused with the key and the accepted forms."""
    (problem,) = problems(with_values(**{"oidc.client_id": "${1BAD}"}))
    assert problem.startswith("oidc.client_id: ${1BAD} is not a valid reference")
    assert "${NAME:-default}" in problem


# --- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("24h", 86400.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("2d", 172800.0),
        ("0", 0.0),
        ("0s", 0.0),
        (0, 0.0),
    ],
)
def test_duration_parses(text: str | int, seconds: float) -> None:
    """Durations are written with units and parsed to seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("value", [30, 1.5, "30", " 45 ", "-5s", "5 minutes", "1x", "", True])
def test_duration_refuses(value: object) -> None:
    """Bare numbers, negatives, unknown units and booleans are not durations."""
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


def test_bare_number_duration_names_key() -> None:
    """`timeout: 30` is refused with the key path and a hint that a unit is needed."""
    (problem,) = problems(with_values(**{"upstreams.0.timeout": 30}))
    assert problem.startswith("upstreams[0].timeout: expected a duration with a unit")
    assert "30s" in problem


def test_duration_in_config_becomes_seconds() -> None:
    """Durations in the YAML arrive in the models as float seconds."""
    data = with_values(**{"upstreams.0.timeout": "1h30m", "upstreams.0.connect_timeout": "500ms"})
    upstream = parse(data).upstreams[0]
    assert (upstream.timeout, upstream.connect_timeout) == (5400.0, 0.5)


def test_zero_upstream_timeout_refused() -> None:
    """An upstream timeout of 0 (which would mean no timeout at all) is refused."""
    (problem,) = problems(with_values(**{"upstreams.0.timeout": "0s"}))
    assert problem.startswith("upstreams[0].timeout: expected a value greater than 0")


# --- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("0.0.0.0:4180", Address("0.0.0.0", 4180)),
        ("localhost:1", Address("localhost", 1)),
        ("[::1]:4180", Address("::1", 4180)),
        ("[::]:65535", Address("::", 65535)),
    ],
)
def test_address_parses(text: str, address: Address) -> None:
    """`host:port` listen addresses, IPv6 in brackets, parse to host and port."""
    assert parse(with_values(**{"server.listen": text})).server.listen == address


def test_ipv6_address_prints_with_brackets() -> None:
    """An IPv6 address is written back as `[::1]:4180`, usable in a URL."""
    assert str(Address("::1", 4180)) == "[::1]:4180"
    assert str(Address("127.0.0.1", 80)) == "127.0.0.1:80"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:0", "port must be between 1 and 65535, got 0"),
        ("127.0.0.1:65536", "port must be between 1 and 65535, got 65536"),
        ("127.0.0.1", "expected host:port such as 0.0.0.0:4180"),
        (":4180", "expected host:port such as 0.0.0.0:4180"),
        ("127.0.0.1:http", "expected host:port such as 0.0.0.0:4180"),
        ("::1:4180", "write IPv6 addresses in brackets, as [::1]:4180"),
        ("[nope]:4180", "'nope' is not an IPv6 address"),
        (4180, "expected host:port"),
    ],
)
def test_bad_address_names_key(value: object, expected: str) -> None:
    """A bad listen address names `management.listen` and says what is expected."""
    (problem,) = problems(with_values(**{"management.listen": value}))
    assert problem.startswith(f"management.listen: {expected}")


# --- structure -------------------------------------------------------------------------------


def test_unknown_key_suggests_the_close_one() -> None:
    """A misspelt key is an error with a did-you-mean hint."""
    data = with_values(**{"upstreams.0.timout": "5s"})
    assert problems(data) == ["upstreams[0].timout: unknown key; did you mean 'timeout'?"]


def test_unknown_section_suggests_the_close_one() -> None:
    """A misspelt section name is caught at the top level too."""
    data = fixed_config()
    data["refesh"] = {}
    assert problems(data) == ["refesh: unknown key; did you mean 'refresh'?"]


def test_unknown_key_lists_the_known_ones() -> None:
    """An unknown key with no close match lists the keys the section does have."""
    (problem,) = problems(with_values(**{"logging.zzz": 1}))
    assert problem == "logging.zzz: unknown key; expected one of: level, access_log"


def test_unknown_key_in_nested_optional_section() -> None:
    """Unknown keys are found inside optional nested sections like upstreams[0].access."""
    data = with_values(**{"upstreams.0.access": {"allowed_group": ["admins"]}})
    assert problems(data) == [
        "upstreams[0].access.allowed_group: unknown key; did you mean 'allowed_groups'?"
    ]


@pytest.mark.parametrize(
    ("remove", "expected"),
    [
        ("oidc", "oidc: required key is missing"),
        ("upstreams", "upstreams: required key is missing"),
    ],
)
def test_missing_section(remove: str, expected: str) -> None:
    """A missing required section is named."""
    data = fixed_config()
    del data[remove]
    assert problems(data) == [expected]


def test_missing_key_in_list_item() -> None:
    """A missing required key inside a list item is named with its index."""
    data = fixed_config()
    data["upstreams"].append({"path": "/api"})
    assert problems(data) == ["upstreams[1].url: required key is missing"]


def test_empty_file_lists_every_required_section() -> None:
    """An empty file names each required section."""
    assert problems("") == [
        "server: required key is missing",
        "oidc: required key is missing",
        "session: required key is missing",
        "upstreams: required key is missing",
    ]


def test_top_level_must_be_a_mapping() -> None:
    """A document that is a list is refused with a clear message."""
    assert problems("- server\n") == ["(top level): expected a mapping of sections such as server:"]


def test_mapping_where_list_expected() -> None:
    """`upstreams:` given as a mapping says a list is expected."""
    data = with_values(upstreams={"path": "/", "url": "http://127.0.0.1:9"})
    assert problems(data) == ["upstreams: expected a list, got dict"]


def test_list_where_mapping_expected() -> None:
    """`server:` given as a list says a mapping is expected."""
    assert problems(with_values(server=["listen"])) == ["server: expected a mapping, got list"]


def test_string_where_list_expected() -> None:
    """`scopes: openid` (a string) says a list is expected."""
    assert problems(with_values(**{"oidc.scopes": "openid"})) == [
        "oidc.scopes: expected a list, got str"
    ]


def test_wrong_scalar_type() -> None:
    """A non-number for `server.workers` names the key and the expected type."""
    (problem,) = problems(with_values(**{"server.workers": "two"}))
    assert problem.startswith("server.workers: expected a valid integer")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("session.store", "mongo", "session.store: expected 'redis' or 'memory'"),
        ("session.same_site", "sometimes", "session.same_site: expected 'lax', 'strict' or 'none'"),
        ("logging.level", "loud", "logging.level: expected 'debug', 'info', 'warning' or 'error'"),
        ("inject.authorization", "both", "inject.authorization: expected 'access_token'"),
        (
            "management.readiness_requires",
            ["db"],
            "management.readiness_requires[0]: expected 'redis' or 'idp'",
        ),
    ],
)
def test_enum_value_names_key_and_choices(key: str, value: object, expected: str) -> None:
    """A value outside an enum names the key and lists the allowed values."""
    (problem,) = problems(with_values(**{key: value}))
    assert problem.startswith(expected)


def test_yaml_syntax_error_has_line_number() -> None:
    """Broken YAML is reported with its line and column."""
    text = "server:\n  listen: 127.0.0.1:1\n   bad: indent\n"
    (problem,) = problems(text)
    assert problem.startswith("line 3, column 7: not valid YAML")


def test_yaml_error_at_end_of_file() -> None:
    """A document cut off at its end is a ConfigError, not a crash."""
    (problem,) = problems("server:\n  trusted_proxies: [\n")
    assert problem.startswith("line 3, column 1: not valid YAML")


def test_yaml_flow_list_reference_hint() -> None:
    """Unquoted `[${KEY}]` gets a hint to quote the reference."""
    (problem,) = problems("session:\n  encryption_keys: [${SESSION_KEY}]\n")
    assert problem.startswith("line 2, column")
    assert 'quote references: ["${NAME}"]' in problem


def test_unreadable_config_file(tmp_path: Path) -> None:
    """A config path that does not exist is a ConfigError naming the path."""
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.yaml")
    assert caught.value.problems == [
        f"cannot read {tmp_path / 'nope.yaml'}: No such file or directory"
    ]


def test_error_text_names_the_source_file(tmp_path: Path) -> None:
    """The error's text starts with the file and lists one problem per line."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(with_values(**{"server.workers": 0, "logging.level": "x"})))
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    lines = str(caught.value).splitlines()
    assert lines[0] == f"invalid configuration in {path}:"
    assert lines[1].startswith("  server.workers: expected a value greater than or equal to 1")
    assert lines[2].startswith("  logging.level: expected")


# --- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        base64.b64encode(b"k" * 16).decode(),  # valid base64, 16 bytes
        base64.b64encode(b"k" * 33).decode(),  # valid base64, 33 bytes
        "this-is-not-base64-at-all!!",
    ],
)
def test_bad_encryption_key_names_index(key: str) -> None:
    """A key that is not 32 bytes of base64 is named by its index."""
    data = with_values(**{"session.encryption_keys": [TEST_KEY, key]})
    assert problems(data) == [
        "session.encryption_keys[1]: expected 32 bytes of base64 "
        "(make one with `auth-sidecar generate-key`)"
    ]


def test_errors_never_contain_secret_values(tmp_path: Path) -> None:
    """Neither a bad key, nor secrets near other errors, appear in the error text."""
    bad_key = "SUPERSECRETKEYVALUE0123456789abcdefg"
    data = with_values(
        **{
            "session.encryption_keys": [bad_key],
            "session.store": "${STORE_SECRET}",
            "oidc.client_secret": ["${CLIENT_SECRET}"],
            "upstreams.0.url": "ftp://user:PASSWORDVALUE@host/",
        }
    )
    env = {"STORE_SECRET": "STORESECRETVALUE", "CLIENT_SECRET": "CLIENTSECRETVALUE"}
    with pytest.raises(ConfigError) as caught:
        parse(data, env)
    text = str(caught.value)
    assert "session.encryption_keys[0]" in text
    assert "session.store" in text
    assert "oidc.client_secret" in text
    assert "upstreams[0].url" in text
    for secret in (bad_key, "STORESECRETVALUE", "CLIENTSECRETVALUE", "PASSWORDVALUE"):
        assert secret not in text
        assert secret not in repr(caught.value)


def test_secrets_masked_in_repr() -> None:
    """The validated config does not show its secrets in repr()."""
    data = with_values(**{"oidc.client_secret": "CLIENTSECRETVALUE"})
    text = repr(parse(data))
    assert "CLIENTSECRETVALUE" not in text
    assert TEST_KEY not in text


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("server.public_url", "app.example.com", "server.public_url: expected an absolute http"),
        ("upstreams.0.url", "http://x/?a=1", "upstreams[0].url: must not contain a query"),
        ("upstreams.0.path", "api", "upstreams[0].path: expected a path starting with /"),
        ("public_paths", ["/ok", "//x"], "public_paths[1]: expected a path starting with /"),
        ("server.trusted_proxies", ["10.0.0.0/8", "nope"], "server.trusted_proxies: 'nope'"),
        ("oidc.scopes", ["email"], "oidc.scopes: must include 'openid'"),
        ("redis.url", "http://redis", "redis.url: expected a redis://, rediss:// or unix://"),
        ("session.encryption_keys", [], "session.encryption_keys: List should have at least 1"),
        ("session.cookie_name", "a b", "session.cookie_name: 'a b' is not a valid cookie name"),
        ("inject.headers", {"X Bad": "sub"}, "inject.headers: 'X Bad' is not a valid header"),
        ("server.workers", 0, "server.workers: expected a value greater than or equal to 1"),
    ],
)
def test_bad_value_names_key(key: str, value: object, expected: str) -> None:
    """Each kind of bad value is reported with its key path and what is expected."""
    (problem,) = problems(with_values(**{key: value}))
    assert problem.startswith(expected)


# --- relations between keys ------------------------------------------------------------------


def test_lock_ttl_is_a_lease_of_at_least_a_second() -> None:
    """refresh.lock_ttl below 1 s is refused, naming lock_ttl; the holder renews it, so it
    need not exceed refresh.idp_timeout, and an older config's 30 s still loads."""
    (problem,) = problems(with_values(refresh={"lock_ttl": "900ms"}))
    assert problem.startswith("refresh.lock_ttl: must be at least 1s")
    assert parse(with_values(refresh={"idp_timeout": "10s"})).refresh.lock_ttl == 5.0
    assert parse(with_values(refresh={"idp_timeout": "10s", "lock_ttl": "1s"})).refresh
    assert parse(with_values(refresh={"lock_ttl": "30s"})).refresh.lock_ttl == 30.0


def test_wait_timeout_at_least_idp_timeout() -> None:
    """refresh.wait_timeout below refresh.idp_timeout is refused, naming wait_timeout."""
    data = with_values(refresh={"idp_timeout": "10s", "wait_timeout": "9s"})
    assert problems(data) == ["refresh.wait_timeout: must be at least refresh.idp_timeout"]


def test_wait_timeout_equal_to_idp_timeout_is_fine() -> None:
    """refresh.wait_timeout equal to refresh.idp_timeout is accepted."""
    data = with_values(refresh={"idp_timeout": "10s", "wait_timeout": "10s", "lock_ttl": "11s"})
    assert parse(data).refresh.wait_timeout == 10.0


def test_idp_timeout_must_be_positive() -> None:
    """refresh.idp_timeout of 0 is refused."""
    data = with_values(refresh={"idp_timeout": "0s"})
    assert problems(data) == ["refresh.idp_timeout: must be greater than 0"]


def test_memory_store_refused_with_workers() -> None:
    """The memory store with server.workers > 1 is refused, naming session.store."""
    data = with_values(**{"session.store": "memory", "server.workers": 2})
    (problem,) = problems(data)
    assert problem.startswith("session.store: memory keeps sessions inside one process")
    assert "server.workers" in problem


def test_memory_store_with_one_worker_is_fine() -> None:
    """The memory store with one worker is accepted."""
    assert parse(with_values(**{"session.store": "memory"})).session.store == "memory"


def test_duplicate_upstream_paths_refused() -> None:
    """Two upstreams on the same path prefix are refused, naming the second one."""
    data = fixed_config()
    data["upstreams"] += [
        {"path": "/api", "url": "http://127.0.0.1:1"},
        {"path": "/api", "url": "http://127.0.0.1:2"},
    ]
    (problem,) = problems(data)
    assert problem.startswith("upstreams[2].path: '/api' is already routed by upstreams[1]")


def test_host_cookie_needs_secure() -> None:
    """A __Host- cookie with cookie_secure: false is refused, naming cookie_secure."""
    data = with_values(**{"session.cookie_secure": False})
    (problem,) = problems(data)
    assert problem.startswith("session.cookie_secure: a __Host- cookie must be Secure")


def test_plain_cookie_may_be_insecure() -> None:
    """Without the __Host- prefix cookie_secure: false is allowed (local development)."""
    data = with_values(**{"session.cookie_secure": False, "session.cookie_name": "sidecar"})
    assert parse(data).session.cookie_secure is False


def test_management_must_not_share_the_main_listener() -> None:
    """management.listen equal to server.listen is refused."""
    data = fixed_config()
    data["management"]["listen"] = data["server"]["listen"]
    assert problems(data) == ["management.listen: must differ from server.listen"]


# --- overrides -------------------------------------------------------------------------------


def test_override_passes_the_same_checks() -> None:
    """A command-line override is validated together with the file, cross-section rules too."""
    text = yaml.safe_dump(with_values(**{"session.store": "memory"}))
    assert parse_config(text, env={}).server.workers == 1
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env={}, overrides={"server": {"workers": 2}})
    assert caught.value.problems[0].startswith("session.store: memory keeps sessions")


def test_override_replaces_only_its_key() -> None:
    """An override changes its key and keeps the rest of the section."""
    data = fixed_config()
    config = parse_config(yaml.safe_dump(data), env={}, overrides={"server": {"workers": 4}})
    assert config.server.workers == 4
    assert str(config.server.listen) == data["server"]["listen"]


def test_config_is_frozen() -> None:
    """Validated sections cannot be changed afterwards."""
    config = parse(fixed_config())
    with pytest.raises(ValueError, match="frozen"):
        config.server.workers = 3  # type: ignore[misc]
