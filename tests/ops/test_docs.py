"""The documentation matches the repository: every relative link in README.md,
CONTRIBUTING.md, docs/ and the chart's README leads to a file that exists, and every
`auth-sidecar …` command the README shows is one the command line accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from sidecar import cli
from tests.support.repo import REPO_ROOT

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_COMMAND = re.compile(r"(?:^|[\s/])auth-sidecar(?=\s|$)((?:[ \t]+[^\s&|;#`<>]+)*)")


def _documents() -> list[Path]:
    return [
        REPO_ROOT / "README.md",
        REPO_ROOT / "CONTRIBUTING.md",
        REPO_ROOT / "helm" / "auth-sidecar" / "README.md",
        REPO_ROOT / "examples" / "keycloak" / "README.md",
        *sorted((REPO_ROOT / "docs").glob("*.md")),
    ]


@pytest.mark.parametrize("document", _documents(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_lead_somewhere(document: Path) -> None:
    broken = []
    for target in _LINK.findall(document.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # another site, or an anchor in the same page
        path = (document.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert broken == []


def _readme_commands() -> list[list[str]]:
    """The arguments of each `auth-sidecar …` in the README's code blocks."""
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, re.DOTALL)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            for match in _COMMAND.finditer(line):
                commands.append(shlex.split(match.group(1)))
    return commands


def test_the_readme_shows_commands() -> None:
    """The check below has something to check."""
    assert any(args[:1] == ["demo"] for args in _readme_commands())


@pytest.mark.parametrize("args", _readme_commands(), ids=" ".join)
def test_readme_commands_parse(args: list[str]) -> None:
    try:
        parsed = cli._parser().parse_args(args)
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"`auth-sidecar {' '.join(args)}` is refused by the command line: {exc}")
    assert parsed.command is not None, args


_BROKEN_CONFIG = """\
server:
  listen: 0.0.0.0:4180
  public_url: https://app.example.com
  workres: 2
oidc:
  issuer: https://idp.example.com
  client_id: app
  client_secret: s3cret
session:
  encryption_keys: [short]
redis:
  url: redis://r:6379/0
refresh:
  idp_timeout: 10s
  lock_ttl: 500ms
upstreams:
  - path: /
    url: http://x:8080
    timeout: 30
"""


def test_the_sample_error_in_the_configuration_guide_is_the_real_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/configuration.md shows what `check-config` prints for a config with four
    mistakes; the same mistakes, checked now, print exactly that."""
    guide = (REPO_ROOT / "docs" / "configuration.md").read_text()
    section = guide[guide.index("## Validation") :]
    shown = re.search(r"```\n(auth-sidecar: invalid configuration.*?)```", section, re.DOTALL)
    assert shown is not None
    monkeypatch.chdir(tmp_path)
    Path("sidecar.yaml").write_text(_BROKEN_CONFIG)
    assert cli.main(["check-config", "--config", "sidecar.yaml"]) == 1
    assert capsys.readouterr().err == shown.group(1)
