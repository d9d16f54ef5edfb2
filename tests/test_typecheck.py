"""The code type-checks, lints and is formatted: mypy over madakv_sglang, kernels and launch, and ruff over the
whole repository, with the settings in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_package_typechecks():
    result = _run("mypy", "madakv_sglang", "kernels", "launch", "--no-incremental")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("command", [("check", "."), ("format", "--check", ".")], ids=["lint", "format"])
def test_code_passes_ruff(command: tuple[str, ...]):
    result = _run("ruff", *command)
    assert result.returncode == 0, result.stdout + result.stderr
