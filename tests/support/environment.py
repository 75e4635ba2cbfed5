"""The environment variables a test must never inherit from the shell that runs pytest.

The sidecar reads `AUTH_SIDECAR_CONFIG` (cli.py) and `AUTH_SIDECAR_WORKER_DIR`
(supervisor.py), and expands `${NAME}` in configuration values from the environment
(config/expand.py): the names below are those config.example.yaml and the Helm chart refer
to (the tests' own configurations pass their environment explicitly). Proxy variables would
send the tests' own urllib calls to 127.0.0.1 through a proxy.

`AUTH_SIDECAR_TEST_REDIS` (stores.REDIS_URL) and `CI` (tests/proxy/test_path_confusion.py)
are the suite's own knobs and stay.
"""

from __future__ import annotations

__all__ = ["CALLER_ENVIRONMENT"]

_READ_BY_THE_SIDECAR = ("AUTH_SIDECAR_CONFIG", "AUTH_SIDECAR_WORKER_DIR")
_REFERENCED_BY_CONFIGS = (
    "OIDC_CLIENT_SECRET",
    "SESSION_KEY",
    "REDIS_PASSWORD",
    "REDIS_SENTINEL_PASSWORD",
)
_PROXIES = tuple(
    name
    for base in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    for name in (base, base.upper())
)

CALLER_ENVIRONMENT = _READ_BY_THE_SIDECAR + _REFERENCED_BY_CONFIGS + _PROXIES
