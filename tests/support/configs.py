"""Sidecar configurations built from dicts: every test states only what it cares about."""

from __future__ import annotations

import copy
from typing import Any

from sidecar.config import Config
from tests.support.idp import ThreadedIdP, shared_idp
from tests.support.keys import TEST_KEY
from tests.support.ports import free_port

__all__ = [
    "EXAMPLE_ENV",
    "config_dict",
    "fixed_config",
    "make_config",
    "replica_configs",
    "upstream_config",
]

# What config.example.yaml refers to: its two secrets.
EXAMPLE_ENV = {"OIDC_CLIENT_SECRET": "example-secret", "SESSION_KEY": TEST_KEY}


def config_dict(
    upstream_url: str = "http://127.0.0.1:9", *, idp: ThreadedIdP | None = None, **sections: Any
) -> dict[str, Any]:
    """A minimal valid configuration as a dict; keyword arguments replace whole sections.

    It logs in against `idp` (the shared dev IdP by default), keeps sessions in memory, and
    makes every path public (proxy tests); login tests pass `public_paths=[]`.
    """
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    data: dict[str, Any] = {
        "server": {"listen": f"127.0.0.1:{port}", "public_url": public_url},
        "management": {"listen": f"127.0.0.1:{free_port()}"},
        "oidc": (idp or shared_idp()).oidc_section(public_url),
        "session": {
            "store": "memory",
            "cookie_name": "sidecar",
            "cookie_secure": False,
            "encryption_keys": [TEST_KEY],
        },
        "upstreams": [{"path": "/", "url": upstream_url}],
        "public_paths": ["/"],
        "logging": {"level": "info"},
    }
    data.update(sections)
    return data


def replica_configs(data: dict[str, Any], replicas: int) -> list[dict[str, Any]]:
    """`replicas` copies of one replica's configuration: the first listens where `data` says
    (its public URL), each other on listeners of its own, all else shared."""
    configs = []
    for i in range(replicas):
        config = copy.deepcopy(data)
        if i:
            config["server"]["listen"] = f"127.0.0.1:{free_port()}"
            config["management"]["listen"] = f"127.0.0.1:{free_port()}"
        configs.append(config)
    return configs


def make_config(
    upstream_url: str = "http://127.0.0.1:9", *, idp: ThreadedIdP | None = None, **sections: Any
) -> Config:
    """`config_dict`, validated: what the in-process sidecar (`sidecars.Sidecar`) takes."""
    return Config.model_validate(config_dict(upstream_url, idp=idp, **sections))


def upstream_config(url: str, timeout: str = "0.5s", connect_timeout: str = "0.5s") -> Config:
    """One upstream with short timeouts, so the tests of a slow or dead upstream end fast."""
    return make_config(
        upstreams=[
            {"path": "/", "url": url, "timeout": timeout, "connect_timeout": connect_timeout}
        ]
    )


def fixed_config(**sections: Any) -> dict[str, Any]:
    """A small valid configuration of fixed values (no IdP, nothing listens on its ports):
    what the configuration and CLI tests parse and compare. Keyword arguments replace whole
    sections."""
    data: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:4180", "public_url": "https://app.example.com"},
        "management": {"listen": "127.0.0.1:9180"},
        "oidc": {"issuer": "https://idp.example.com", "client_id": "app"},
        "session": {
            "store": "redis",
            "cookie_name": "__Host-sidecar",
            "cookie_secure": True,
            "encryption_keys": [TEST_KEY],
        },
        "upstreams": [{"path": "/", "url": "http://127.0.0.1:8080"}],
        "logging": {"level": "info"},
    }
    data.update(sections)
    return data
