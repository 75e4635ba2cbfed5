"""Read a YAML file into a validated `Config`, or raise `ConfigError` naming every bad key."""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sidecar.config.expand import expand, key_path
from sidecar.config.models import Config
from sidecar.errors import ConfigError

__all__ = ["load_config", "parse_config"]

# A model validator names the key it is about: `lock_ttl: ...` or `upstreams[1].path: ...`.
_FIELD_PREFIX = re.compile(r"^([a-z_]+(?:\[\d+\])*(?:\.[a-z_]+(?:\[\d+\])*)*): (.*)$", re.DOTALL)


Overrides = Mapping[str, Mapping[str, Any]]
"""Values that replace keys of the file, by section: `{"server": {"workers": 4}}`."""


def load_config(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    overrides: Overrides | None = None,
) -> Config:
    """Load and validate the configuration file at `path`; `overrides` win over the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"cannot read {path}: {reason}"]) from None
    return parse_config(text, env=env, source=str(path), overrides=overrides)


def parse_config(
    text: str,
    env: Mapping[str, str] | None = None,
    source: str = "",
    overrides: Overrides | None = None,
) -> Config:
    """Validate YAML `text`; `env` defaults to the process environment.

    `overrides` (command-line options) are merged in before validation, so they pass the
    same checks as the file, cross-section rules included.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"line {mark.line + 1}, column {mark.column + 1}: "
        problem = getattr(exc, "problem", None) or str(exc)
        hint = ""
        lines = text.splitlines()
        if mark is not None and mark.line < len(lines) and "${" in lines[mark.line]:
            # `[${KEY}]` is a YAML flow mapping inside a list: the reference needs quotes.
            hint = ' (inside [ ] or { }, quote references: ["${NAME}"])'
        raise ConfigError([f"{where}not valid YAML: {problem}{hint}"], source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping of sections such as server:"], source)

    problems: list[str] = []
    data = expand(data, os.environ if env is None else env, problems)
    if problems:
        raise ConfigError(problems, source)
    for section, values in (overrides or {}).items():
        current = data.get(section)
        if current is None:
            data[section] = dict(values)
        elif isinstance(current, dict):
            data[section] = {**current, **values}
        # Otherwise the section itself is malformed, and validation says so.
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_describe(err) for err in exc.errors()], source) from None


def _describe(err: Any) -> str:
    loc: tuple[str | int, ...] = tuple(err["loc"])
    kind: str = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1])
        hint = ""
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        if close:
            hint = f"; did you mean {close[0]!r}?"
        elif known:
            hint = f"; expected one of: {', '.join(known)}"
        return f"{key_path(loc)}: unknown key{hint}"
    if kind == "missing":
        return f"{key_path(loc)}: required key is missing"
    msg: str = err["msg"].removeprefix("Value error, ")
    if msg.startswith("Input should be "):
        rest = msg.removeprefix("Input should be ")
        msg = ("expected a value " if rest.startswith(("greater", "less")) else "expected ") + rest
    if kind in ("model_type", "dict_type") and not isinstance(err.get("input"), dict):
        msg = f"expected a mapping, got {_shown(err.get('input'))}"
    elif kind == "list_type":
        msg = f"expected a list, got {_shown(err.get('input'))}"
    elif kind == "literal_error" and not isinstance(err.get("input"), str):
        msg = f"{msg}, got {_shown(err.get('input'))}"
    match = _FIELD_PREFIX.match(msg)
    if match and not match.group(1).count(".") and "[" not in match.group(1) and loc:
        loc, msg = (*loc, match.group(1)), match.group(2)
    elif match and not loc:
        return msg
    return f"{key_path(loc)}: {msg}"


def _shown(value: Any) -> str:
    # Values can be secrets; show only their type, never the value itself.
    return type(value).__name__ if value is not None else "nothing"


def _known_keys(loc: tuple[str | int, ...]) -> list[str]:
    model: Any = Config
    for part in loc:
        model = _model_in(model, part)
        if model is None:
            return []
    return list(model.model_fields) if _is_model(model) else []


def _model_in(model: Any, part: str | int) -> Any:
    if isinstance(part, int):
        return model
    if not _is_model(model) or part not in model.model_fields:
        return None
    return _unwrap(model.model_fields[part].annotation)


def _unwrap(annotation: Any) -> Any:
    """Find the model inside `X | None`, `list[X]` and `Annotated[X, ...]`."""
    if _is_model(annotation):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _unwrap(arg)
            if found is not None:
                return found
    return None


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)
