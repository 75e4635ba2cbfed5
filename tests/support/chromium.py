"""Headless Chromium for the browser tests: Debian's /usr/bin/chromium driven by Playwright
for Python (no browser download). A missing piece fails the test; it never skips."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.repo import REPO_ROOT

__all__ = ["CHROMIUM", "chromium_page", "screenshots"]

CHROMIUM = "/usr/bin/chromium"
_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def screenshots(name: str) -> Path:
    """An empty `test-output/<name>/` for one test's screenshots."""
    folder = REPO_ROOT / "test-output" / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    return folder


@contextmanager
def chromium_page(timeout_ms: int = 15_000) -> Iterator[Any]:
    """A Playwright page in a fresh headless Chromium, closed on exit."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the Python package `playwright` is required for the browser tests: "
            "pip install -e '.[test]' (it brings its own driver; no browser download needed)",
            pytrace=False,
        )
    if not Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is None:
        pytest.fail(
            f"{CHROMIUM} is required for the browser tests: apt-get install -y chromium",
            pytrace=False,
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()
