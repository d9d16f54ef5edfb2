"""The CPU import shims (madakv_sglang/_cpu_shims) in the set-up made by scripts/setup.sh.

Every check runs in a fresh subprocess of .venv's python, because the shims act at interpreter
start (the .pth file) and on first import, which an in-process test cannot redo.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
SETUP_HINT = "run scripts/setup.sh (or `make setup`) to create .venv with SGLang and the CPU shims"


def run(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MADAKV_DISABLE_CPU_SHIMS")}
    full_env.update(env)
    # cwd is a temp dir so nothing in the repo root shadows an installed module.
    return subprocess.run(
        [str(VENV_PYTHON), "-c", textwrap.dedent(code)],
        check=False,
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module", autouse=True)
def venv_with_sglang() -> None:
    # Fail, never skip: without this venv the CPU engine is untested.
    if not VENV_PYTHON.exists():
        pytest.fail(f"{VENV_PYTHON} does not exist: {SETUP_HINT}", pytrace=False)
    proc = subprocess.run(
        [str(VENV_PYTHON), "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('sglang') is None)"],
        check=False,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"sglang is not installed in .venv: {SETUP_HINT}\n{proc.stderr}", pytrace=False)


def test_activation_is_cheap_and_installs_the_finder(tmp_path: Path) -> None:
    out = ok(
        run(
            """
        import sys
        print("torch" in sys.modules, any(type(f).__name__ == "CpuShimFinder" for f in sys.meta_path))
    """,
            tmp_path,
        )
    )
    assert out.split() == ["False", "True"]


def test_sglang_cpu_engine_modules_import(tmp_path: Path) -> None:
    out = ok(
        run(
            """
        import sglang.srt.server_args
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
        import sglang.srt.models.qwen3_5  # binds torch.ops.sgl_kernel.*_cpu at import time on CPU
        import sgl_kernel, torch
        print(sgl_kernel.__madakv_stub__)
        # Probes for ops that are not *_cpu must keep answering "absent" (AMX check, register_fake_if_exists).
        ops = torch.ops.sgl_kernel
        print(hasattr(ops, "convert_weight_packed"), hasattr(ops, "gptq_marlin_repack"))
        try:
            torch.ops.sgl_kernel.fused_sigmoid_mul_cpu(torch.zeros(1), torch.zeros(1))
        except RuntimeError as e:
            print(e)
    """,
            tmp_path,
            SGLANG_USE_CPU_ENGINE="1",
        )
    )
    lines = out.splitlines()
    assert lines[:2] == ["True", "False False"], out
    assert "torch.ops.sgl_kernel.fused_sigmoid_mul_cpu was called" in lines[2], out


def test_torchvision_transforms_import(tmp_path: Path) -> None:
    out = ok(
        run(
            """
        import torchvision.transforms
        from torchvision.transforms import InterpolationMode
        print(InterpolationMode.BICUBIC.value)
    """,
            tmp_path,
        )
    )
    assert out.strip() == "bicubic"


def test_stub_function_raises_a_clear_error(tmp_path: Path) -> None:
    proc = run(
        """
        from sgl_kernel import copy_all_layer_kv_cache_cpu
        copy_all_layer_kv_cache_cpu()
    """,
        tmp_path,
    )
    assert proc.returncode != 0
    assert "RuntimeError: sgl_kernel.copy_all_layer_kv_cache_cpu was called" in proc.stderr, proc.stderr
    assert "CPU import stub" in proc.stderr


def test_real_sgl_kernel_wins_over_the_stub(tmp_path: Path) -> None:
    pkg = tmp_path / "real" / "sgl_kernel"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("REAL = True\n")
    out = ok(
        run(
            """
        import sgl_kernel
        print(sgl_kernel.REAL, sgl_kernel.__file__)
    """,
            tmp_path,
            PYTHONPATH=str(tmp_path / "real"),
        )
    )
    assert out.split() == ["True", str(pkg / "__init__.py")]


def test_disable_env_turns_the_shims_off(tmp_path: Path) -> None:
    proc = run(
        """
        import sys
        assert "madakv_sglang" not in sys.modules, "the .pth must not even import the package"
        import sgl_kernel
    """,
        tmp_path,
        MADAKV_DISABLE_CPU_SHIMS="1",
    )
    assert proc.returncode != 0
    assert "ModuleNotFoundError: No module named 'sgl_kernel'" in proc.stderr, proc.stderr
