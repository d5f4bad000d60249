"""One rule for tests that need something outside Python: skip with a reason on a
developer machine, fail in CI (``CI=true``), where nothing the suite needs may be missing."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(available: bool, reason: str) -> None:
    """Call at the start of a test or fixture."""
    if available:
        return
    if in_ci():
        pytest.fail(f"required in CI but missing: {reason}", pytrace=False)
    pytest.skip(reason)
