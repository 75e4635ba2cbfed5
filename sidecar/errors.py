"""The one exception tree of the sidecar.

    SidecarError
    ├── ConfigError            bad configuration: names the key; exit 1, no traceback
    └── UpstreamError          the upstream could not be reached or answered too slowly
        ├── UpstreamUnavailable   connection refused, reset, DNS failure   → 502
        └── UpstreamTimeout       connect or read timeout                   → 504

Later layers (session store, IdP) add their kinds here, so that one middleware maps
every failure to the HTTP answer of DESIGN §6.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "SidecarError",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class SidecarError(Exception):
    """Root of every error the sidecar raises on purpose."""


class ConfigError(SidecarError):
    """The configuration cannot be used; the message names each offending key."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        head = f"invalid configuration{f' in {source}' if source else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in problems))


class UpstreamError(SidecarError):
    """Forwarding to the upstream failed before a response could start."""

    status = 502
    code = "upstream_unavailable"


class UpstreamUnavailable(UpstreamError):
    """The upstream refused, reset or could not be resolved."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The upstream did not connect or answer in time."""

    status = 504
    code = "upstream_timeout"
