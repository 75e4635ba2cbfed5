"""`${ENV}`, `${ENV:-default}` and `${file:/path}` in configuration values.

Expansion runs on string scalars after YAML parsing, so a secret that contains `:` or `#`
cannot change the document's structure. `$${` writes a literal `${`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["expand", "key_path"]

_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def key_path(loc: tuple[str | int, ...]) -> str:
    """`("upstreams", 0, "timeout")` → `upstreams[0].timeout`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def expand(
    value: Any,
    env: Mapping[str, str],
    problems: list[str],
    loc: tuple[str | int, ...] = (),
) -> Any:
    """Return `value` with every reference in its strings replaced; problems are appended."""
    if isinstance(value, str):
        return _expand_string(value, env, problems, loc)
    if isinstance(value, dict):
        return {k: expand(v, env, problems, (*loc, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, env, problems, (*loc, i)) for i, v in enumerate(value)]
    return value


def _expand_string(
    text: str, env: Mapping[str, str], problems: list[str], loc: tuple[str | int, ...]
) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        ref = match.group(1)
        if ref.startswith("file:"):
            return _read_file(ref[5:], problems, loc)
        name, has_default, default = ref.partition(":-")
        if not _ENV_NAME.fullmatch(name):
            problems.append(
                f"{key_path(loc)}: ${{{ref}}} is not a valid reference "
                "(expected ${NAME}, ${NAME:-default} or ${file:/path})"
            )
            return ""
        if name in env:
            return env[name]
        if has_default:
            return default
        problems.append(f"{key_path(loc)}: environment variable {name} is not set")
        return ""

    return _REF.sub(replace, text)


def _read_file(path: str, problems: list[str], loc: tuple[str | int, ...]) -> str:
    # Kubernetes mounts secrets as files ending in a newline that is never part of the secret.
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        problems.append(f"{key_path(loc)}: cannot read {path}: {reason}")
        return ""
