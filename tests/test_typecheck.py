"""The package type-checks (STYLE §7): mypy over madakv_sglang, kernels and launch with the settings in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_package_typechecks():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "madakv_sglang", "kernels", "launch", "--no-incremental"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
