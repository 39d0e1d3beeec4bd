"""What a test needs from the machine (chromium, namespaces, a way to refuse writes to root): where it is missing the
test is skipped with the reason, except under ``CI=true``, where the suite must run every test: there it fails,
naming what is missing (a green CI run never hides a test that did not run)."""

from __future__ import annotations

import os

import pytest


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """Stop the test: ``what`` (the missing part, and how to get it) is not on this machine."""
    if on_ci():
        pytest.fail(f"CI=true and this test cannot run: {what}", pytrace=False)
    pytest.skip(what)
