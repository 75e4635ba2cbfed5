"""The real chart tools: helm and checkov, as `.ci/install-helm-tools` installs them.

Both live in the repository's git-ignored `.venv/`: helm as `.venv/bin/helm`, checkov in a venv
of its own, `.venv/checkov/`. A missing tool fails the test when `CI` is set and skips it
otherwise, naming the command that installs it. helm runs with its cache, config and data
directories in a temporary folder, so no repository or plugin of the caller's is used; checkov
runs with its downloads and update check off (the tests reach no network).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import IO

import pytest

from tests.support.repo import REPO_ROOT

__all__ = ["CHECKOV", "HELM", "INSTALL", "checkov", "helm", "run_helm", "start_checkov"]

HELM = REPO_ROOT / ".venv" / "bin" / "helm"
CHECKOV = REPO_ROOT / ".venv" / "checkov" / "bin" / "checkov"
INSTALL = ".ci/install-helm-tools"

_HELM_HOME = Path(tempfile.gettempdir()) / f"auth-sidecar-tests-helm-{os.getuid()}"


def _require(path: Path, name: str) -> Path:
    if path.is_file() and os.access(path, os.X_OK):
        return path
    message = f"{name} is not installed at {path.relative_to(REPO_ROOT)}: run {INSTALL}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must run it before the tests)", pytrace=False)
    pytest.skip(message)


def helm() -> Path:
    """The helm binary; fails under CI when missing, skips otherwise."""
    return _require(HELM, "helm")


def checkov() -> Path:
    """The checkov entry point (in its own venv); fails under CI when missing, skips otherwise."""
    return _require(CHECKOV, "checkov")


def _helm_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        folder = _HELM_HOME / var.removeprefix("HELM_").removesuffix("_HOME").lower()
        folder.mkdir(parents=True, exist_ok=True)
        env[var] = str(folder)
    for var in ("KUBECONFIG", "HELM_NAMESPACE", "HELM_KUBECONTEXT", "HELM_DRIVER"):
        env.pop(var, None)
    return env


def run_helm(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`helm ARGS…`; with check, a non-zero exit fails the test with helm's output."""
    proc = subprocess.run(
        [str(helm()), *map(str, args)],
        capture_output=True,
        text=True,
        env=_helm_env(),
        timeout=120,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"helm {' '.join(map(str, args))} exited {proc.returncode}:\n"
            f"{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def start_checkov(*args: str | Path, stdout: IO[bytes], stderr: Path) -> subprocess.Popen[bytes]:
    """`checkov ARGS…` started offline (no Prisma Cloud download, no update check), writing
    to `stdout` and the file `stderr`; the caller waits for it."""
    env = dict(os.environ)
    env.update(BC_SKIP_MAPPING="TRUE", CKV_SKIP_PACKAGE_UPDATE_CHECK="true", LOG_LEVEL="WARNING")
    with stderr.open("wb") as err:
        return subprocess.Popen(
            [str(checkov()), "--skip-download", *map(str, args)],
            stdout=stdout,
            stderr=err,
            env=env,
        )
