"""The layout's promises that an import can break: development code stays out of the
production process (docs/architecture.md, "Layout")."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.support.repo import REPO_ROOT

# What `auth-sidecar run` imports: the command line, the server and the app it wires.
_PRODUCTION = ("sidecar.cli", "sidecar.server", "sidecar.app", "sidecar.supervisor")


def _modules_after(imports: tuple[str, ...]) -> set[str]:
    """The `sidecar` modules a fresh interpreter holds after importing `imports`."""
    code = (
        "import importlib, sys\n"
        f"for name in {list(imports)!r}:\n"
        "    importlib.import_module(name)\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith('sidecar')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return set(done.stdout.split())


def test_the_production_app_does_not_import_the_dev_package() -> None:
    """Neither the demo nor the dev IdP is loaded by `auth-sidecar run`: a production image
    could ship without them and nothing on the request path can reach them."""
    loaded = _modules_after(_PRODUCTION)
    assert "sidecar.app" in loaded and "sidecar.web.proxy" in loaded  # the probe works
    assert not {m for m in loaded if m == "sidecar.dev" or m.startswith("sidecar.dev.")}


def test_the_demo_does_import_it() -> None:
    """The other side of the check above: `sidecar.dev` is what the probe would see."""
    assert "sidecar.dev.idp" in _modules_after(("sidecar.dev.demo",))


def test_tests_share_helpers_only_through_tests_support() -> None:
    """No test module imports another test module or a conftest: what tests share lives in
    tests/support, so moving or deleting one test never breaks another."""
    offenders = []
    for path in sorted((REPO_ROOT / "tests").rglob("*.py")):
        if "node_modules" in path.parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                last = name.rsplit(".", 1)[-1]
                if name.startswith("tests") and (last.startswith("test_") or last == "conftest"):
                    offenders.append(f"{path.relative_to(REPO_ROOT)}: {name}")
    assert offenders == []
