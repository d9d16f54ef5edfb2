"""The engine tests' SGLang server: :class:`madakv_sglang.server_process.Server` with the strict checks on.

One implementation serves the demo and the tests (``madakv_sglang/server_process.py``); here it only defaults to
``strict=True``, so SGLang checks the pool's accounting after every batch and madakv poisons freed cells, and
turns the short-prompt floor off (``--kv-min-prompt 0``, as the environment default every ``--kv-*`` flag still
overrides): the engine tests compress prompts of 40-400 tokens on tiny models to exercise the machinery, which
the default floor would serve uncompressed. ``short_prompt_floor=True`` keeps the shipped default.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from madakv_sglang import server_process
from madakv_sglang.server_process import CPU_ARGS, CPU_ENV, STRICT_ENV, free_port

NO_FLOOR_ENV = {"MADAKV_KV_MIN_PROMPT": "0"}
ROOT = Path(__file__).resolve().parents[1]


class Server(server_process.Server):
    def __init__(
        self,
        model: Path | str,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        startup_timeout: float = 240.0,
        strict: bool = True,
        port: int | None = None,
        short_prompt_floor: bool = False,
    ) -> None:
        env = {**({} if short_prompt_floor else NO_FLOOR_ENV), **(env or {})}
        super().__init__(model, args, log_path, env=env, startup_timeout=startup_timeout, strict=strict, port=port)


def run_benchmark(module: str, args: list[str], timeout: float = 900.0) -> str:
    """``python -m module args`` from the repository root, offline, its servers with the tests' floor-off default;
    its stdout, once it exited 0."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **NO_FLOOR_ENV},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


__all__ = ["CPU_ARGS", "CPU_ENV", "NO_FLOOR_ENV", "STRICT_ENV", "Server", "free_port", "run_benchmark"]
