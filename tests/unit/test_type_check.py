"""mypy passes on app/ and worker/ with the configuration in pyproject.toml (strict)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_passes() -> None:
    # The configured files and flags ([tool.mypy]); the cache (.mypy_cache) makes reruns fast.
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
