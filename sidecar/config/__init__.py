"""Configuration: YAML with `${ENV}` / `${file:}` references, validated into frozen models."""

from sidecar.config.load import load_config, parse_config
from sidecar.config.models import (
    AccessConfig,
    AdminConfig,
    ClusterConfig,
    Config,
    InjectConfig,
    LoggingConfig,
    LoginConfig,
    ManagementConfig,
    OIDCConfig,
    RedisConfig,
    RefreshConfig,
    SentinelConfig,
    ServerConfig,
    SessionConfig,
    UpstreamConfig,
)
from sidecar.config.types import Address, parse_duration

__all__ = [
    "AccessConfig",
    "Address",
    "AdminConfig",
    "ClusterConfig",
    "Config",
    "InjectConfig",
    "LoggingConfig",
    "LoginConfig",
    "ManagementConfig",
    "OIDCConfig",
    "RedisConfig",
    "RefreshConfig",
    "SentinelConfig",
    "ServerConfig",
    "SessionConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
    "parse_duration",
]
