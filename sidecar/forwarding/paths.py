"""One canonical form of a request path: what routing, rules and the upstream all see.

A proxy that decides on one reading of a path and forwards another can be walked around:
`/public/../admin` is public to a prefix check and `/admin` to nginx. So the path is
canonicalised once (docs/security.md, "One canonical path"):

- percent-escapes of unreserved characters are decoded (`%61` is `a`, `%2E` is `.`), every
  other escape is kept with upper-case hex (RFC 3986 §6.2.2.1-2);
- runs of `/` are merged into one, as nginx and most servers do;
- `.` and `..` segments are removed (RFC 3986 §5.2.4), after the decoding above;
- forms that common servers read differently are refused: a backslash, `#`, an escaped NUL,
  a malformed escape, a dot segment carrying `;` parameters, anything outside printable
  ASCII. Escaped `/` or `\\` (`%2F`, `%5C`) and `;` path parameters are reported, so that
  only an upstream that opted in receives them.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

from aiohttp import web

__all__ = ["PATH", "BadPath", "CanonicalPath", "canonical_path"]

# Anything that can make a path mean something else to another parser; a printable ASCII
# path without any of these is already canonical (the common case: a few substring scans).
_SUSPECT: Final = ("%", "//", "/.", ";", "\\", "#", " ")
_ESCAPE: Final = re.compile(r"%(?:([0-9A-Fa-f]{2})|.{0,2})", re.DOTALL)
_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SLASHES: Final = frozenset({"2F", "5C"})


class BadPath(ValueError):
    """The path cannot be given one meaning; the message says why (safe to show)."""


class CanonicalPath(NamedTuple):
    """The canonical path and the opt-in features it uses."""

    path: str
    encoded_slash: bool = False  # holds %2F or %5C
    params: bool = False  # holds `;` path parameters


# Canonical forms of recent paths, as most traffic repeats a small set of them. Bounded
# (at most about 2 MB): when full it is emptied, so a stream of unique paths costs the
# computation and nothing more.
_KNOWN: dict[str, CanonicalPath] = {}
_KNOWN_MAX: Final = 4096
_KNOWN_LENGTH: Final = 256

# The request's canonical path, set by the front door (sidecar/web/routing.py) before any handler.
PATH: Final = web.RequestKey("canonical_path", CanonicalPath)


def canonical_path(raw: str) -> CanonicalPath:
    """The canonical form of `raw`, a request path without its query; raises `BadPath`."""
    known = _KNOWN.get(raw)
    if known is None:
        known = _canonical(raw)
        if len(raw) <= _KNOWN_LENGTH:
            if len(_KNOWN) >= _KNOWN_MAX:
                _KNOWN.clear()
            _KNOWN[raw] = known
    return known


def _canonical(raw: str) -> CanonicalPath:
    if not raw.startswith("/"):
        raise BadPath("the request target must be a path starting with /")
    if raw.isascii() and raw.isprintable() and not any(s in raw for s in _SUSPECT):
        return CanonicalPath(raw)
    if "\\" in raw:
        raise BadPath("the path holds a backslash")
    if "#" in raw:
        raise BadPath("the path holds a fragment")
    if any(not "\x21" <= c <= "\x7e" for c in raw):
        raise BadPath("the path holds a character that must be percent-encoded")
    encoded_slash = False

    def escape(match: re.Match[str]) -> str:
        nonlocal encoded_slash
        digits = match.group(1)
        if digits is None:
            raise BadPath("the path holds a malformed percent-escape")
        digits = digits.upper()
        if digits == "00":
            raise BadPath("the path holds an escaped NUL")
        char = chr(int(digits, 16))
        if char in _UNRESERVED:
            return char
        encoded_slash = encoded_slash or digits in _SLASHES
        return "%" + digits

    decoded = _ESCAPE.sub(escape, raw) if "%" in raw else raw
    segments: list[str] = []
    parts = decoded.split("/")
    last = len(parts) - 1
    trailing = False
    for index, segment in enumerate(parts):
        if segment in ("", ".", ".."):
            if segment == ".." and segments:
                segments.pop()
            # `/a/` `/a/.` `/a/b/..` all name a directory: the trailing slash stays.
            trailing = index == last and index > 0
            continue
        if segment.partition(";")[0] in (".", ".."):
            raise BadPath("the path holds a dot segment with parameters")
        segments.append(segment)
        trailing = False
    path = "/" + "/".join(segments)
    if trailing and segments:
        path += "/"
    return CanonicalPath(path, encoded_slash, ";" in path)
