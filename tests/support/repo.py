"""Paths into the repository, so that no test depends on the directory pytest runs from."""

from __future__ import annotations

from pathlib import Path

__all__ = ["EXAMPLE_CONFIG", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO_ROOT / "config.example.yaml"
