"""mypy passes over what ``[tool.mypy]`` in pyproject.toml names, and ruff over the repository,
as ``make lint`` runs them.

CI runs ``make test`` only: this is what makes a broken interface between modules (a
changed signature, a store that no longer fits its protocol) fail CI, not only the lint.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_mypy_passes_on_the_configured_packages() -> None:
    # The default cache (.mypy_cache in the checkout, git-ignored): warm, the run takes seconds.
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"mypy found type errors:\n{result.stdout}{result.stderr}"


def test_ruff_passes_on_the_repository() -> None:
    # The other half of ``make lint``: without it an unsorted import in a test reached main
    # (a990b95), as nothing in make test ran ruff.
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"ruff found problems:\n{result.stdout}{result.stderr}"
