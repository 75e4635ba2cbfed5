"""Scalar types of the configuration: durations, listen addresses, signing algorithms."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, NamedTuple

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "DURATION_PATTERN",
    "Address",
    "Duration",
    "ListenAddress",
    "format_duration",
    "parse_address",
    "parse_duration",
]

# The JWS algorithms the sidecar ever verifies: asymmetric only. `none` and HMAC (which would
# make a client secret a signing key) are refused whatever an IdP advertises.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_NUMBER = re.compile(r"\s*-?\d+(?:\.\d+)?\s*")
# What a duration looks like in the JSON Schema (`config-schema`).
DURATION_PATTERN = rf"^(0|{_DURATION.pattern})$"


def parse_duration(value: Any) -> float:
    """Turn `500ms`, `30s`, `5m`, `24h`, `1h30m` or `0` into seconds.

    Bare numbers other than 0 are refused: `timeout: 30` could mean seconds or
    milliseconds, and a silent guess is worse than an error.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration like 500ms, 30s, 5m or 24h")
    if isinstance(value, int | float) and value == 0:
        return 0.0
    if isinstance(value, str):
        text = value.strip()
        if text == "0":
            return 0.0
        if _DURATION.fullmatch(text):
            return sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER.fullmatch(value)):
        raise ValueError(
            f"expected a duration with a unit like 500ms, 30s, 5m or 24h, got {value!r} "
            "(a bare number is ambiguous)"
        )
    raise ValueError(f"expected a duration like 500ms, 30s, 5m or 24h, got {value!r}")


def format_duration(seconds: float) -> str:
    """Seconds as a duration the validator accepts: `500ms`, `60s`."""
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "duration: 500ms, 30s, 5m, 24h, 1h30m",
        }
    ),
]
"""Seconds, written in YAML with a unit."""


class Address(NamedTuple):
    """A `host:port` to listen on; host `""` would mean every interface."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(value: Any) -> Address:
    """Parse `0.0.0.0:4180`, `127.0.0.1:9180`, `[::]:4180` or `localhost:4180`."""
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected host:port, got {value!r}")
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected host:port such as 0.0.0.0:4180, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"write IPv6 addresses in brackets, as [::1]:4180, got {value!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port must be between 1 and 65535, got {port}")
    return Address(host, port)


ListenAddress = Annotated[
    Address,
    BeforeValidator(parse_address),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "description": "host:port, e.g. 0.0.0.0:4180"}),
]
"""A listen address, written in YAML as `host:port`."""
