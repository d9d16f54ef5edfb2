"""``python -m madakv_sglang.engine.offline_throughput``: SGLang's offline benchmark with the ``--kv-*`` flags.

The real run uses ``sglang.Engine`` in-process on CPU (tiny Qwen2, SGLang's strict memory checks on). Its
requests come from a ShareGPT-format file that the test writes: SGLang's script always samples its warm-up
prompts from ShareGPT, and no dataset can be downloaded here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from madakv_sglang.log_lines import request_lines
from madakv_sglang.server_process import CPU_ARGS, CPU_ENV, STRICT_ENV

ROOT = Path(__file__).resolve().parents[2]
MODULE = "madakv_sglang.engine.offline_throughput"
SENTENCES = (
    "Tell me a story about a robot who wants to learn how to paint flowers in the garden of an old castle.",
    "Once upon a time, there was a little girl who lived in a village by the sea with her grandmother.",
    "Every morning she walked to the market to buy bread, milk, eggs and fresh fruit for breakfast.",
)


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **CPU_ENV, **STRICT_ENV}
    env.pop("MADAKV_KV_POLICY", None)  # only the flags may configure the run
    return subprocess.run(
        [sys.executable, "-m", MODULE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_the_kv_flags() -> None:
    done = _run(["--help"], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--kv-policy" in done.stdout and "--kv-budget" in done.stdout
    assert "--num-prompts" in done.stdout  # SGLang's own flags are still there


def test_a_bad_budget_exits_2_before_the_engine_starts() -> None:
    """The model path does not exist: only a refusal before the engine starts can give exit 2 and this message."""
    done = _run(["--model-path", "unused", "--kv-policy", "madakv", "--kv-budget", "1.5"], timeout=300)
    assert done.returncode == 2
    assert f"python -m {MODULE}: error: argument --kv-budget" in done.stderr


def test_a_setting_refused_at_resolution_exits_2_with_the_plugins_message() -> None:
    done = _run(
        ["--model-path", "unused", "--device", "cpu", "--kv-policy", "madakv", "--enable-mixed-chunk"], timeout=300
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: madakv: --enable-mixed-chunk is not supported" in done.stderr


def test_madakv_compresses_every_request_of_the_benchmark(tmp_path: Path) -> None:
    from madakv_sglang import checkpoints

    model = checkpoints.write_checkpoint("qwen2", tmp_path / "tiny-qwen2", seed=0)
    sharegpt = tmp_path / "sharegpt.json"
    conversations = [
        {
            "id": str(i),
            "conversations": [{"from": "human", "value": SENTENCES[i % 3] * 3}, {"from": "gpt", "value": "Sure."}],
        }
        for i in range(24)
    ]
    sharegpt.write_text(json.dumps(conversations))
    result = tmp_path / "result.jsonl"
    done = _run(
        [
            "--model-path",
            str(model),
            *CPU_ARGS,
            "--kv-policy",
            "madakv",
            "--kv-budget",
            "0.2",
            "--kv-window",
            "8",
            "--kv-min-prompt",
            "0",
            "--dataset-name",
            "random",
            "--dataset-path",
            str(sharegpt),
            "--random-input-len",
            "200",
            "--random-range-ratio",
            "1.0",
            "--random-output-len",
            "8",
            "--num-prompts",
            "8",
            "--result-filename",
            str(result),
        ]
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = json.loads(result.read_text().splitlines()[-1])
    assert output["successful_requests"] == 8
    assert output["total_input_tokens"] == 8 * 200
    log = done.stdout + done.stderr
    assert "policy madakv, budget 0.2, window 8" in log  # the engine's scheduler got the flags
    kept = [line.kept_slots for line in request_lines(log) if line.compressed and line.prompt_slots == 200]
    assert len(kept) == 8, "each of the 8 benchmark prompts (200 tokens) was compressed"
    # B = 40 slots; HCC spends exactly L*H*B cells, and the shared layout (the default) holds their mean over
    # layers: ceil(L*H*B / (L*H)) = B.
    assert kept == [40] * 8, kept
