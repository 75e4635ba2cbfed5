"""Session encryption keys of the tests: fixed, so a failure is reproducible."""

from __future__ import annotations

import base64

__all__ = ["KEY_A", "KEY_B", "TEST_KEY"]

TEST_KEY = base64.b64encode(b"k" * 32).decode()  # the key of every sidecar a test configures
KEY_A = base64.b64encode(b"a" * 32).decode()  # two more, for rotation and wrong-key cases
KEY_B = base64.b64encode(b"b" * 32).decode()
