"""The canonical path (sidecar/forwarding/paths.py): one reading of a path for routing, rules
and upstream."""

from __future__ import annotations

import posixpath
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.forwarding.paths import BadPath, CanonicalPath, canonical_path
from sidecar.forwarding.upstream import PathPrefixes, path_matches


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/a/b/", "/a/b/"),
        ("/public/../admin/x", "/admin/x"),
        ("/public/%2e%2e/admin/x", "/admin/x"),
        ("/public/%2E%2e/admin/x", "/admin/x"),
        ("//admin/x", "/admin/x"),
        ("/./admin/x", "/admin/x"),
        ("/x/../admin/x", "/admin/x"),
        ("/%61dmin/x", "/admin/x"),
        ("/admin/%7e/%7E", "/admin/~/~"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/..", "/"),
        ("/../../..", "/"),
        ("/a//b///", "/a/b/"),
        ("/a%7cb", "/a%7Cb"),  # not unreserved: kept, hex upper-cased
        ("/a%20b", "/a%20b"),
        ("/%252e%252e/x", "/%252e%252e/x"),  # %25 stays: no second round of decoding
        ("/.well-known/openid-configuration", "/.well-known/openid-configuration"),
        ("/a..b/c.", "/a..b/c."),
    ],
)
def test_canonical_forms(raw: str, canonical: str) -> None:
    assert canonical_path(raw) == CanonicalPath(canonical)


@pytest.mark.parametrize(
    "raw",
    [
        "/admin\\x",
        "/admin%00/x",
        "/a%zz",
        "/a%2",
        "/a%",
        "/..;/admin",
        "/public/..;x/admin",
        "/.;x/admin",
        "/a#b",
        "/a b",
        "/\u00e9",
        "/a\x00b",
        "/a\r\nb",
        "http://evil.example/admin",
        "*",
        "evil.example:443",
        "",
    ],
)
def test_ambiguous_paths_refused(raw: str) -> None:
    """Forms that common servers read differently never get a canonical form."""
    with pytest.raises(BadPath):
        canonical_path(raw)


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/public%2F..%2Fadmin/x", CanonicalPath("/public%2F..%2Fadmin/x", encoded_slash=True)),
        ("/a%2fb", CanonicalPath("/a%2Fb", encoded_slash=True)),
        ("/a%5cb", CanonicalPath("/a%5Cb", encoded_slash=True)),
        ("/admin;x/y", CanonicalPath("/admin;x/y", params=True)),
        ("/a;x/../b", CanonicalPath("/b")),  # the parameters went with their segment
    ],
)
def test_opt_in_forms_are_reported(raw: str, canonical: CanonicalPath) -> None:
    """Encoded slashes and `;` parameters are flagged: only an upstream that opted in gets them."""
    assert canonical_path(raw) == canonical


def test_prefixes_match_whole_segments_and_case() -> None:
    """`/admin` covers `/admin` and below, never `/administrator` nor `/Admin`."""
    assert path_matches("/admin", "/admin")
    assert path_matches("/admin/x", "/admin")
    assert not path_matches("/administrator", "/admin")
    assert not path_matches("/Admin/x", "/admin")
    public = PathPrefixes(["/public"])
    assert "/public/x" in public
    assert "/publicity" not in public


_SEGMENT_CHARS = st.sampled_from(
    [
        "a",
        "b",
        "Z",
        "0",
        "-",
        "_",
        "~",
        ".",
        "..",
        "%2e",
        "%2E",
        "%61",
        "%41",
        "%7e",
        "%20",
        "%C3%A9",
    ]
)
_SEGMENTS = st.lists(st.lists(_SEGMENT_CHARS, max_size=4).map("".join), max_size=8)
_PATHS = st.tuples(_SEGMENTS, st.booleans()).map(
    lambda parts: "/" + "/".join(parts[0]) + ("/" if parts[1] else "")
)
_SLASH_RUNS = re.compile(r"/{2,}")


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(_PATHS)
def test_canonical_is_a_fixed_point_without_dot_segments(raw: str) -> None:
    """The canonical path reads the same to every normaliser: canonicalising it again, or
    resolving it like nginx (merge slashes, then dot segments), changes nothing."""
    path = canonical_path(raw).path
    assert canonical_path(path) == CanonicalPath(path)
    assert "//" not in path
    segments = path.split("/")
    assert "." not in segments and ".." not in segments
    # What an nginx-like server would do with the raw path, decoding unreserved escapes.
    decoded = re.sub(r"%(2[eE]|6[1-9a-fA-F]|4[1-9a-fA-F]|7[eE])", lambda m: chr(int(m[1], 16)), raw)
    resolved = posixpath.normpath(_SLASH_RUNS.sub("/", decoded))
    assert (path.rstrip("/") or "/") == (resolved.rstrip("/") or "/")


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=40))
def test_any_input_is_canonical_or_refused(tail: str) -> None:
    """No input raises anything but BadPath, and an accepted one is stable."""
    try:
        result = canonical_path("/" + tail)
    except BadPath:
        return
    assert canonical_path(result.path).path == result.path
    assert all("\x21" <= c <= "\x7e" for c in result.path)
    assert "\\" not in result.path and "%00" not in result.path


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=40))
def test_a_known_path_gets_the_same_answer_again(tail: str) -> None:
    """Recent answers are kept for speed: asked twice, a path is canonicalised or refused
    exactly as the first time, whatever was asked in between."""
    raw = "/" + tail

    def answer() -> CanonicalPath | str:
        try:
            return canonical_path(raw)
        except BadPath as exc:
            return f"refused: {exc}"

    first = answer()
    canonical_path("/x/../" + str(len(tail)))  # something else in between
    assert answer() == first


def test_the_kept_answers_stay_bounded() -> None:
    """A stream of unique paths (a scanner) cannot grow the kept answers without bound."""
    from sidecar.forwarding import paths

    for n in range(3 * paths._KNOWN_MAX):
        canonical_path(f"/scan/{n}")
    canonical_path("/long/" + "a" * 10_000)
    assert len(paths._KNOWN) <= paths._KNOWN_MAX
    assert all(len(raw) <= paths._KNOWN_LENGTH for raw in paths._KNOWN)
