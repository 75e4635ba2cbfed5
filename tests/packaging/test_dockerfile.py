"""The Dockerfile and .dockerignore follow the image rules of issue 5 (no docker needed).

The Dockerfile is parsed as text: instructions (with `\\` continuations joined), split into
stages at each FROM. A real build is not run here; these checks catch the regressions that
matter in production (an unpinned base, root, a shell-form entrypoint, a compiler shipped).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field

import pytest

from sidecar import cli
from tests.support.repo import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"

COMPILER_PACKAGES = {
    "gcc",
    "g++",
    "cc",
    "clang",
    "make",
    "build-essential",
    "libc6-dev",
    "python3-dev",
    "libffi-dev",
    "libssl-dev",
    "rustc",
    "cargo",
}


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"final stage has no {keyword}"
        return found[-1]


def parse_instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions in order; comments dropped, continuation lines joined."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comment lines may sit inside a continued instruction, too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def parse_stages(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for instruction in parse_instructions(text):
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        else:
            assert stages, f"{instruction.keyword} before the first FROM"
            stages[-1].instructions.append(instruction)
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for word in shlex.split(args):
            key, sep, value = word.partition("=")
            assert sep, f"ENV {args!r}: use the KEY=value form"
            env[key] = value
    return env


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_stages(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_multi_stage_with_a_named_build_stage(stages: list[Stage]) -> None:
    """Wheels are built in a named first stage; the final stage is a separate image."""
    assert len(stages) >= 2
    assert stages[0].name == "build"
    assert any("pip wheel" in run and "/wheels" in run for run in stages[0].all("RUN"))


def test_every_base_image_is_pinned_to_a_patch_version(stages: list[Stage]) -> None:
    """`python:3.11.11-slim-bookworm`, never `python:3.11-slim` or `latest`."""
    for stage in stages:
        if stage.base in {s.name for s in stages if s.name}:
            continue  # FROM an earlier stage
        assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", stage.base), (
            f"base image {stage.base!r} is not pinned to a full Python version and a slim distro"
        )


def test_final_stage_installs_only_the_built_wheels(final: Stage) -> None:
    """pip runs offline against the first stage's wheels; nothing is compiled."""
    installs = [run for run in final.all("RUN") if "pip install" in run]
    assert installs, "the final stage installs nothing"
    for run in installs:
        assert "--no-index" in run
        assert "from=build" in run or "/wheels" in run
    copies = final.all("COPY")
    assert not any(re.search(r"(^|\s)(\.|sidecar)(\s|$)", c) for c in copies), (
        "the final stage must not copy the source tree"
    )


def test_no_compiler_in_the_final_stage(final: Stage) -> None:
    for run in final.all("RUN"):
        for match in re.finditer(r"apt-get\s+install([^&;|]*)", run):
            packages = {w for w in match.group(1).split() if not w.startswith("-")}
            assert not packages & COMPILER_PACKAGES, f"compilers in the final image: {packages}"
        assert "apk add" not in run


def test_runs_as_a_numeric_non_root_user(final: Stage) -> None:
    user = final.last("USER")
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    assert match, f"USER {user!r}: use a numeric UID:GID so runAsNonRoot can verify it"
    uid, gid = int(match.group(1)), int(match.group(2) or match.group(1))
    assert uid >= 1000 and gid >= 1000
    assert uid == 10001 and gid == 10001, "the Helm chart's securityContext assumes 10001:10001"
    # Nothing after USER may switch back to root.
    keywords = [i.keyword for i in final.instructions]
    assert keywords.index("USER") == len(keywords) - 1 - keywords[::-1].index("USER")


def test_read_only_root_filesystem_settings(final: Stage) -> None:
    env = env_of(final)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("TMPDIR") == "/tmp"
    volumes = " ".join(final.all("VOLUME"))
    assert "/tmp" in volumes, "declare the one writable directory"


def test_config_path_comes_from_the_cli_environment_variable(final: Stage) -> None:
    env = env_of(final)
    assert cli._CONFIG_ENV == "AUTH_SIDECAR_CONFIG"
    assert env.get(cli._CONFIG_ENV) == "/etc/auth-sidecar/config.yaml"


def test_exec_form_entrypoint_runs_the_sidecar(final: Stage) -> None:
    """Exec form: the sidecar is PID 1 and receives SIGTERM itself (it drains on it)."""
    assert json.loads(final.last("ENTRYPOINT")) == ["auth-sidecar"]
    assert json.loads(final.last("CMD")) == ["run"]
    assert final.last("STOPSIGNAL") == "SIGTERM"


def test_both_ports_are_exposed(final: Stage) -> None:
    exposed = {p.split("/")[0] for args in final.all("EXPOSE") for p in args.split()}
    assert exposed == {"4180", "9180"}


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: a pattern matches the path or one of its parent
    directories (`**/x` at any depth); the last matching pattern wins; `!` re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes)
        if hit:
            result = not negate
    return result


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "tests/test_smoke.py",
        "tests/e2e/node_modules/x/index.js",
        "node_modules/x/index.js",
        "sidecar/__pycache__/app.cpython-311.pyc",
        "auth_sidecar.egg-info/PKG-INFO",
    ],
)
def test_dockerignore_excludes(path: str) -> None:
    assert ignored(path, dockerignore_patterns()), f"{path} would be sent to the build"


@pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "sidecar/app.py"])
def test_dockerignore_keeps_what_the_build_copies(path: str) -> None:
    """pyproject.toml names README.md as the readme: the wheel build needs it."""
    assert not ignored(path, dockerignore_patterns())
    assert (REPO_ROOT / path).exists()


def test_build_copies_only_files_that_exist(stages: list[Stage]) -> None:
    for copy in stages[0].all("COPY"):
        *sources, _dest = copy.split()
        for source in sources:
            if source.startswith("--"):
                continue
            assert (REPO_ROOT / source).exists(), f"COPY {source}: no such file in the repository"
