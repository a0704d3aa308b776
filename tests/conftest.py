"""Shared fixtures. Real parts everywhere: see ../shared/TESTING.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REALWORLD = REPO.parent / "shared" / "realworld"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def realworld() -> Path:
    """The folder of real DBC files and traces beside the repository (../shared/realworld).

    A user's fresh clone may not have it: tests skip then, with the reason. Under CI=true it must
    be there, and its absence fails the test.
    """
    if not REALWORLD.is_dir():
        if IN_CI:
            pytest.fail(f"{REALWORLD} is missing, and CI=true requires it")
        pytest.skip(f"{REALWORLD} is absent (real-world files are kept beside the repository)")
    return REALWORLD


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


pytest_plugins = ["tests.vm.plugin"]
