"""The release: the sdist and the wheel `python -m build` makes, and the wheel installed where
nothing of the repository is around; and CHANGELOG.md, which names the current version.

The build runs on a copy of the files git tracks (`git ls-files`), so nothing untracked (a
.venv, an egg-info, test output) can enter the artifacts, and the work tree is left as it was.
`python -m build` without `--sdist`/`--wheel` builds the sdist and then the wheel *from the
sdist*: that shows the sdist holds everything a build needs. The build backend is the
setuptools of .ci/constraints.txt (PIP_CONSTRAINT reaches build's isolated environment).

The wheel is installed into a fresh venv (`python -m venv --without-pip`, then this venv's pip
with `--python` and `-c .ci/constraints.txt`; the dependencies come from the package index).
No pip, no setuptools and no source tree are in that venv, and the commands run from a
temporary directory. Every `sidecar` module is imported there, `auth-sidecar --version`,
`check-config` and `config-schema` are run, and the demo (`sidecar/dev`) logs a user in.

Building takes about 10 s and the venv about 10 s (from the pip cache). The timings are
printed in the terminal report.
"""

from __future__ import annotations

import ast
import asyncio
import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import aiohttp
import pytest
import yaml
from packaging.requirements import Requirement

from sidecar import __version__
from tests.support.configs import fixed_config
from tests.support.environment import CALLER_ENVIRONMENT
from tests.support.login import NAVIGATE, browser, local, login
from tests.support.ports import free_ports_in_a_row
from tests.support.processes import stop_process
from tests.support.repo import REPO_ROOT

CONSTRAINTS = REPO_ROOT / ".ci" / "constraints.txt"
CHANGELOG = REPO_ROOT / "CHANGELOG.md"
DIST_NAME = "auth_sidecar"  # the project name as file names spell it
BUILD_TIMEOUT = 300
INSTALL_TIMEOUT = 300
# Imported only when configured, from an optional extra the fresh venv (the base install)
# leaves out: the package's top-level name, and the extra.
OPTIONAL_IMPORTS = {"opentelemetry": "otel"}

# The variables that would point a child Python at the wrong place (or at this venv).
_PYTHON_VARIABLES = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")
# What setuptools writes into an sdist beside the tracked files.
_SDIST_GENERATED = {"PKG-INFO", "setup.cfg"}
_LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")
# Never in an artifact, at any depth.
_JUNK_PARTS = {
    "tests",
    ".venv",
    "venv",
    "node_modules",
    "__pycache__",
    ".git",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "test-output",
    "build",
    "dist",
}


# --- helpers ---------------------------------------------------------------------------------


def _report(config: pytest.Config, line: str) -> None:
    """A line in the terminal output even when output is captured (the timings)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_line(line)


def _env(*, network: bool) -> dict[str, str]:
    """The environment of a child process. None of the caller's Python or sidecar variables;
    proxy variables stay only for steps that reach the package index."""
    dropped = set(_PYTHON_VARIABLES)
    dropped.update(n for n in CALLER_ENVIRONMENT if not network or "proxy" not in n.lower())
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def _run(
    command: list[str], *, cwd: Path, timeout: float, network: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=cwd,
        env=_env(network=network),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _tracked_files() -> list[str]:
    """The files git tracks, as they are in the work tree (deleted ones left out)."""
    if shutil.which("git") is None:
        pytest.fail("git is required: the release is built from the files git tracks")
    done = subprocess.run(
        ["git", "ls-files", "-z"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, f"git ls-files failed: {done.stderr.decode(errors='replace')}"
    names = [n for n in done.stdout.decode().split("\0") if n]
    assert "pyproject.toml" in names, "git ls-files did not list the repository"
    return [n for n in names if (REPO_ROOT / n).is_file()]


def _module_name(path: str) -> str:
    """`sidecar/dev/idp/__init__.py` → `sidecar.dev.idp`; `sidecar/cli.py` → `sidecar.cli`."""
    parts = PurePosixPath(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _pinned(name: str) -> str:
    """The version .ci/constraints.txt pins `name` to."""
    for line in CONSTRAINTS.read_text().splitlines():
        pin, sep, version = line.partition("==")
        if sep and pin.strip().lower() == name:
            return version.strip()
    raise AssertionError(f"{name} is not pinned in {CONSTRAINTS}")


@dataclass(frozen=True)
class Release:
    source: Path  # the copy of the tracked files the artifacts were built from
    tracked: tuple[str, ...]  # the files git tracks, relative to the repository
    sdist: Path
    wheel: Path

    @property
    def package_files(self) -> set[str]:
        """The tracked files of the `sidecar` package."""
        return {n for n in self.tracked if n.startswith("sidecar/") and n.endswith(".py")}

    @property
    def modules(self) -> list[str]:
        return sorted(_module_name(n) for n in self.package_files)


@dataclass(frozen=True)
class Installed:
    venv: Path
    workdir: Path  # an empty directory the commands run in

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def script(self) -> Path:
        return self.venv / "bin" / "auth-sidecar"

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return _run([*args], cwd=self.workdir, timeout=timeout)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Release:
    """The sdist and the wheel, built from a copy of the tracked files."""
    root = tmp_path_factory.mktemp("release")
    source, dist = root / "source", root / "dist"
    started = time.monotonic()
    tracked = _tracked_files()
    for name in tracked:
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    copied = time.monotonic()

    command = [sys.executable, "-m", "build", "--outdir", str(dist), str(source)]
    env = _env(network=True)
    env["PIP_CONSTRAINT"] = str(CONSTRAINTS)
    built = subprocess.run(
        command,
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert built.returncode == 0, f"python -m build failed:\n{built.stdout}\n{built.stderr}"
    done = time.monotonic()
    _report(
        request.config,
        f"release: copied {len(tracked)} tracked files in {copied - started:.1f}s, "
        f"built the sdist and the wheel in {done - copied:.1f}s",
    )
    sdists = sorted(dist.glob("*.tar.gz"))
    wheels = sorted(dist.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    return Release(source, tuple(tracked), sdists[0], wheels[0])


@pytest.fixture(scope="module")
def installed(
    release: Release, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Installed:
    """The wheel in a fresh venv, its dependencies pinned by .ci/constraints.txt."""
    root = tmp_path_factory.mktemp("installed")
    venv, workdir = root / "venv", root / "work"
    workdir.mkdir()
    started = time.monotonic()
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root, timeout=120)
    assert made.returncode == 0, made.stderr
    created = time.monotonic()
    pip = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-compile",
            "-c",
            str(CONSTRAINTS),
            str(release.wheel),
        ],
        cwd=root,
        timeout=INSTALL_TIMEOUT,
        network=True,
    )
    assert pip.returncode == 0, f"pip install of the wheel failed:\n{pip.stdout}\n{pip.stderr}"
    done = time.monotonic()
    _report(
        request.config,
        f"release: fresh venv in {created - started:.1f}s, wheel and dependencies installed "
        f"in {done - created:.1f}s",
    )
    return Installed(venv, workdir)


# --- the artifacts ---------------------------------------------------------------------------


def test_twine_check_strict_passes(release: Release) -> None:
    """Both artifacts' metadata passes `twine check --strict` (the README renders, the
    metadata is what PyPI accepts)."""
    done = _run(
        [
            sys.executable,
            "-m",
            "twine",
            "check",
            "--strict",
            str(release.sdist),
            str(release.wheel),
        ],
        cwd=release.source.parent,
        timeout=120,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert done.stdout.count("PASSED") == 2, done.stdout


def test_sdist_holds_what_a_build_needs_and_nothing_else(release: Release) -> None:
    """The sdist has pyproject.toml, README.md, every module of the package and any license
    file; everything else in it is metadata setuptools wrote, never tests or local junk."""
    top = f"{DIST_NAME}-{__version__}"
    assert release.sdist.name == f"{top}.tar.gz"
    with tarfile.open(release.sdist) as sdist:
        members = [m for m in sdist.getmembers() if m.isfile()]
    names = set()
    for member in members:
        path = PurePosixPath(member.name)
        assert path.parts[0] == top, member.name
        names.add(str(PurePosixPath(*path.parts[1:])))

    needed = {"pyproject.toml", "README.md", *release.package_files}
    needed |= {n for n in release.tracked if "/" not in n and n.startswith(_LICENSE_PREFIXES)}
    assert needed <= names, f"missing from the sdist: {sorted(needed - names)}"

    generated = {
        n for n in names if n in _SDIST_GENERATED or n.startswith(f"{DIST_NAME}.egg-info/")
    }
    extra = names - set(release.tracked) - generated
    assert not extra, f"in the sdist but not tracked by git: {sorted(extra)}"
    junk = sorted(n for n in names if _JUNK_PARTS & set(PurePosixPath(n).parts))
    assert not junk, f"junk in the sdist: {junk}"
    assert not [n for n in names if n.endswith((".pyc", ".pyo"))]


def test_wheel_holds_the_package_and_its_metadata(release: Release) -> None:
    """The wheel holds exactly the tracked modules of `sidecar` (with `sidecar/dev`, which
    `auth-sidecar demo` runs) and metadata that matches pyproject.toml: the version, the
    dependencies, the console script; built by the setuptools .ci/constraints.txt pins."""
    assert release.wheel.name == f"{DIST_NAME}-{__version__}-py3-none-any.whl"
    info = f"{DIST_NAME}-{__version__}.dist-info"
    with zipfile.ZipFile(release.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = email.parser.Parser().parsestr(wheel.read(f"{info}/METADATA").decode())
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
        top_level = wheel.read(f"{info}/top_level.txt").decode().split()
        generator = wheel.read(f"{info}/WHEEL").decode()

    package = {n for n in names if not n.startswith(f"{info}/")}
    assert package == release.package_files, (
        f"missing: {sorted(release.package_files - package)}; "
        f"unexpected: {sorted(package - release.package_files)}"
    )
    assert "sidecar/dev/demo.py" in package and "sidecar/dev/idp/provider.py" in package
    assert top_level == ["sidecar"]

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert metadata["Name"] == project["name"]
    assert metadata["Version"] == __version__
    assert metadata["Requires-Python"] == project["requires-python"]
    assert metadata.get("License-Expression") == project["license"]
    assert metadata["Description-Content-Type"].startswith("text/markdown")
    assert "auth-sidecar" in (metadata.get_payload() or "")  # the README is the description
    runtime = {
        str(Requirement(r)) for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r
    }
    assert runtime == {str(Requirement(r)) for r in project["dependencies"]}
    assert "auth-sidecar = sidecar.cli:main" in entry_points
    assert f"Generator: setuptools ({_pinned('setuptools')})" in generator, generator


Imported = tuple[str, str | None]  # `import m`: (m, None); `from m import n`: (m, n)


def _imports(source: Path, package_files: set[str]) -> tuple[dict[str, set[Imported]], set[str]]:
    """What the package's modules import, at any depth (function-level imports included):
    per file, the `sidecar` modules and names it imports; and the top-level names of every
    other package imported."""
    internal: dict[str, set[Imported]] = {}
    external: set[str] = set()
    for name in sorted(package_files):
        module = _module_name(name)
        package = module if name.endswith("__init__.py") else module.rpartition(".")[0]
        tree = ast.parse((source / name).read_text(), name)
        for node in ast.walk(tree):
            pairs: list[Imported] = []
            if isinstance(node, ast.Import):
                pairs = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                pairs = [(base, alias.name) for alias in node.names]
            for target, imported in pairs:
                if target == "sidecar" or target.startswith("sidecar."):
                    internal.setdefault(name, set()).add((target, imported))
                elif target != "__future__":
                    external.add(target.partition(".")[0])
    return internal, external - set(sys.stdlib_module_names)


def _bound_names(text: str) -> set[str]:
    """The names a module binds (anywhere in it: a generous reading, enough to tell a typo
    or a missing module from a name it defines or imports)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names.update(a.asname or a.name.partition(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def test_what_the_package_imports_is_in_the_wheel(release: Release) -> None:
    """Every `sidecar` import of any module (at module level or inside a function, as the
    command line's are) finds its module in the wheel, and `from m import n` finds `n` as a
    module of the wheel or a name `m` binds."""
    with zipfile.ZipFile(release.wheel) as wheel:
        modules = {
            _module_name(n): _bound_names(wheel.read(n).decode())
            for n in wheel.namelist()
            if n.startswith("sidecar/") and n.endswith(".py")
        }
    internal, _ = _imports(release.source, release.package_files)
    missing = set()
    for name, pairs in internal.items():
        for target, imported in pairs:
            if target not in modules:
                missing.add(f"{name}: {target}")
            elif not (
                imported in (None, "*")
                or f"{target}.{imported}" in modules
                or imported in modules[target]
            ):
                missing.add(f"{name}: {target}.{imported}")
    assert not missing, f"imported but not in the wheel: {sorted(missing)}"


# --- the installed wheel ---------------------------------------------------------------------


def test_every_module_imports_from_the_fresh_venv(release: Release, installed: Installed) -> None:
    """In the fresh venv every `sidecar` module imports (so its dependencies are installed),
    from the venv's site-packages and not from the repository; so does every third-party
    package any module imports, function-level imports included."""
    modules = [m for m in release.modules if m != "sidecar.__main__"]  # __main__ runs main()
    _, imported = _imports(release.source, release.package_files)
    external = imported - set(OPTIONAL_IMPORTS)
    code = (
        "import importlib, importlib.util, json, sys\n"
        "modules, external = json.loads(sys.argv[1])\n"
        "files, failed = {}, {}\n"
        "for name in modules:\n"
        "    try:\n"
        "        files[name] = importlib.import_module(name).__file__\n"
        "    except Exception as exc:\n"
        "        failed[name] = repr(exc)\n"
        "for name in external:\n"
        "    if importlib.util.find_spec(name) is None:\n"
        "        failed[name] = 'not installed'\n"
        "print(json.dumps({'files': files, 'failed': failed}))\n"
    )
    done = installed.run(
        str(installed.python), "-I", "-c", code, json.dumps([modules, sorted(external)])
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert not answer["failed"], answer["failed"]
    site = (installed.venv / "lib").resolve()
    outside = {
        m: f for m, f in answer["files"].items() if not Path(f).resolve().is_relative_to(site)
    }
    assert not outside, f"imported from outside the fresh venv: {outside}"
    assert len(answer["files"]) == len(modules)


def test_version_from_the_fresh_venv(installed: Installed) -> None:
    """The console script and `python -m sidecar` print `auth-sidecar <__version__>`."""
    for command in ([str(installed.script)], [str(installed.python), "-I", "-m", "sidecar"]):
        done = installed.run(*command, "--version")
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"auth-sidecar {__version__}\n", done.stdout


def test_check_config_and_schema_from_the_fresh_venv(installed: Installed) -> None:
    """`check-config` accepts a small valid configuration and names the key of a broken one;
    `config-schema` prints the JSON Schema."""
    config = installed.workdir / "sidecar.yaml"
    config.write_text(yaml.safe_dump(fixed_config()))
    done = installed.run(str(installed.script), "check-config", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{config}: configuration is valid\n"

    data = fixed_config()
    data["upstreams"][0]["timeout"] = 30
    broken = installed.workdir / "broken.yaml"
    broken.write_text(yaml.safe_dump(data))
    done = installed.run(str(installed.script), "check-config", "--config", str(broken))
    assert done.returncode == 1, done.stdout
    assert "upstreams[0].timeout: expected a duration with a unit" in done.stderr
    assert "Traceback" not in done.stderr

    done = installed.run(str(installed.script), "config-schema")
    assert done.returncode == 0, done.stderr
    schema = json.loads(done.stdout)
    assert {"server", "oidc", "session", "upstreams"} <= set(schema["properties"])


def test_tracing_without_its_extra_names_the_key(installed: Installed) -> None:
    """The base install has no opentelemetry; a configuration that turns tracing on is
    refused by `check-config`, naming `telemetry.otlp_endpoint` and the extra to install."""
    done = installed.run(
        str(installed.python),
        "-I",
        "-c",
        "import importlib.util as u; print(u.find_spec('opentelemetry'))",
    )
    assert done.stdout == "None\n", (done.stdout, done.stderr)
    config = installed.workdir / "traced.yaml"
    telemetry = {"otlp_endpoint": "http://127.0.0.1:4318/v1/traces"}
    config.write_text(yaml.safe_dump(fixed_config(telemetry=telemetry)))
    done = installed.run(str(installed.script), "check-config", "--config", str(config))
    assert done.returncode == 1, done.stdout
    assert "telemetry.otlp_endpoint: " in done.stderr, done.stderr
    assert f"auth-sidecar[{OPTIONAL_IMPORTS['opentelemetry']}]" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def demo(installed: Installed) -> Iterator[tuple[int, Path]]:
    """`auth-sidecar demo --port P` of the fresh venv: P, and the file its output goes to."""
    port = free_ports_in_a_row(4)
    log = installed.workdir / f"demo-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(installed.script), "demo", "--port", str(port)],
            cwd=installed.workdir,
            env=_env(network=False),
            stdout=out,
            stderr=out,
        )
    try:
        yield port, log
    finally:
        stop_process(proc, 15)


async def test_demo_logs_in_from_the_fresh_venv(demo: tuple[int, Path]) -> None:
    """The demo of the installed wheel (dev IdP, echo app and sidecar: `sidecar/dev`) becomes
    ready, logs alice in through the dev IdP, and shows her the echo app's page."""
    port, log = demo
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    async with browser() as s:
        while True:
            try:
                async with s.get(f"http://127.0.0.1:{port + 3}/readyz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo never became ready:\n{log.read_text(errors='replace')}")
            await asyncio.sleep(0.1)
        landing = await login(s, base, "/", "alice", headers=NAVIGATE)
        async with s.get(local(base, landing), headers=NAVIGATE, allow_redirects=False) as r:
            assert r.status == 200, (landing, r.status)
            assert "alice" in await r.text()


# --- CHANGELOG.md ----------------------------------------------------------------------------


def _changelog_versions() -> list[str]:
    """The versions of CHANGELOG.md's `## [X] - date` headings, in order."""
    return [
        line[len("## [") :].partition("]")[0]
        for line in CHANGELOG.read_text().splitlines()
        if line.startswith("## [")
    ]


def test_changelog_has_a_section_for_the_current_version() -> None:
    """CHANGELOG.md (Keep a Changelog) opens with Unreleased, then a dated section for
    `sidecar.__version__` and older ones, newest first."""
    text = CHANGELOG.read_text()
    versions = _changelog_versions()
    assert versions[:1] == ["Unreleased"], versions
    assert __version__ in versions, f"CHANGELOG.md has no section for {__version__}"
    assert re.search(
        rf"^## \[{re.escape(__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, re.MULTILINE
    ), f"the {__version__} section has no `## [{__version__}] - YYYY-MM-DD` heading"
    released = [tuple(int(p) for p in v.split(".")) for v in versions[1:]]
    assert released == sorted(released, reverse=True), versions
    assert versions.count(__version__) == 1
