"""``python -m benchmarks.serving``: the log parser, the ratios and the report on made-up inputs, then one real run
on CPU (tiny Qwen2-VL, ``full`` and ``madakv:0.2`` servers on the same small pool, SGLang's own client)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import serving
from benchmarks.serving import CLIENT_METRICS, SERVER_METRICS, LogStats, PolicySpec, parse_server_log
from madakv_sglang.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# Lines as SGLang 0.5.23 and madakv write them (shortened where the parser does not look).
LOG = """\
[t] max_total_num_tokens=1000, chunked_prefill_size=4096, max_prefill_tokens=16384
[t] Prefill batch, #new-seq: 1, #new-token: 48, #cached-token: 0, token usage: 0.05, #running-req: 0, #queue-req: 0
[t] madakv: reclaimed 150 slots in this batch (150 since start); pool available 700 of 1000; backend state 1 rows
[t] Prefill batch, #new-seq: 3, #new-token: 600, #cached-token: 0, token usage: 0.30, #running-req: 2, #queue-req: 4
[t] Decode batch, #running-req: 5, #token: 310, token usage: 0.31, cpu graph: False, gen throughput (token/s): 9.0
[t] KV cache pool is full. Retract requests. #retracted_reqs: 2, #new_tokens_gained: 40
[t] Decode batch, #running-req: 3, #token: 420, token usage: 0.42, cpu graph: False, gen throughput (token/s): 9.0
"""


@pytest.mark.parametrize(("text", "policy", "budget", "label"), [
    ("full", "full", None, "full"),
    ("madakv:0.1", "madakv", "0.1", "madakv:0.1"),
    ("snapkv:512", "snapkv", "512", "snapkv:512"),
    ("madakv", "madakv", "0.2", "madakv:0.2"),  # the server's default budget
])
def test_policy_spec_parses_policy_and_budget(text: str, policy: str, budget: str | None, label: str) -> None:
    spec = PolicySpec.parse(text)
    assert (spec.policy, spec.budget, spec.label) == (policy, budget, label)
    assert spec.server_args()[:2] == ["--kv-policy", policy]


@pytest.mark.parametrize("text", ["nope:0.1", "madakv:1.5", "madakv:abc", "full:0.1"])
def test_policy_spec_refuses_bad_values(text: str) -> None:
    with pytest.raises(ConfigError):
        PolicySpec.parse(text)


def test_policies_must_include_full() -> None:
    with pytest.raises(SystemExit, match="include full"):
        serving.main(["--policies", "madakv:0.1", "--print-gpu-commands"])


def test_log_parser_takes_the_peaks() -> None:
    stats = parse_server_log(LOG)
    assert stats == LogStats(
        pool_slots=1000,
        peak_running_requests=5,  # decode 5; prefill 2 running + 3 new = 5
        peak_kv_slots=450,  # madakv before returning its 150 slots: 1000 - 700 + 150
        peak_held_kv_slots=420,
        reclaimed_slots=150,
        retracted_requests=2,
    )
    assert parse_server_log("", pool_slots=10) == LogStats(10, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="max_total_num_tokens"):
        parse_server_log("no pool line")


def _run(policy: str, budget: str | None, input_len: int, scale: float) -> dict[str, Any]:
    metrics = {key: 10.0 * scale for key in CLIENT_METRICS} | {key: int(4 * scale) for key in SERVER_METRICS}
    return {"config": policy if budget is None else f"{policy}:{budget}", "policy": policy, "budget": budget,
            "input_len": input_len, "metrics": metrics, "server": {"retracted_requests": 0}}


def test_ratios_are_against_full_at_the_same_prompt_length() -> None:
    runs = [_run("full", None, 64, 1.0), _run("madakv", "0.1", 64, 2.0),
            _run("full", None, 256, 0.5), _run("madakv", "0.1", 256, 3.0)]
    runs[1]["metrics"]["median_itl_ms"] = None  # a metric SGLang did not give has no ratio
    serving.add_ratios(runs)
    assert runs[0]["ratios"]["request_throughput"] == 1.0
    assert runs[1]["ratios"]["request_throughput"] == 2.0
    assert runs[1]["ratios"]["peak_running_requests"] == 2.0
    assert runs[1]["ratios"]["median_itl_ms"] is None
    assert runs[3]["ratios"]["output_throughput"] == 6.0
    with pytest.raises(ValueError, match="no full run"):
        serving.add_ratios([_run("madakv", "0.1", 64, 1.0)])


def test_gpu_commands_run_sglangs_client_against_one_server_per_configuration() -> None:
    text = serving.gpu_commands([PolicySpec.parse("full"), PolicySpec.parse("madakv:0.1")])
    servers = [line for line in text.splitlines() if "sglang.launch_server" in line]
    clients = [line for line in text.splitlines() if line.startswith("python -m sglang.benchmark.serving")]
    assert len(servers) == len(clients) == 2 * len(serving.GPU_INPUT_LENS)
    assert all(f"--max-total-tokens {serving.GPU_POOL}" in line for line in servers)
    assert any("--kv-policy madakv --kv-budget 0.1" in line for line in servers)
    assert all("--dataset-name image" in line and "--output-file" in line for line in clients)
    assert "python -m benchmarks.serving --summarize" in text.splitlines()[-1]


# ---- one real run ----

POOL = 800  # a prompt is ~194 tokens (64 text + 64 visual + the chat template): full runs ~3 at a time


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    from madakv_sglang import checkpoints

    # The dir name holds "qwen2-vl" like the demo's: SGLang's frontends pick the chat template by path.
    model = checkpoints.write_checkpoint("qwen2_vl", tmp_path_factory.mktemp("ckpt") / "tiny-qwen2-vl", seed=0)
    out = tmp_path_factory.mktemp("serving")
    command = [sys.executable, "-m", "benchmarks.serving", "--model", str(model), "--policies", "full", "madakv:0.2",
               "--input-lens", "64", "--num-prompts", "8", "--image-count", "1", "--output-len", "4",
               "--max-total-tokens", str(POOL), "--out", str(out / "serving.json"), "--log-dir", str(out / "logs")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "serving.json").read_text()), done.stdout, out


def test_report_has_every_metric_for_every_configuration(report: tuple[dict[str, Any], str, Path]) -> None:
    data, _, out = report
    assert data["command"].startswith("python -m benchmarks.serving ")
    assert data["setting"]["max_total_tokens"] == POOL
    assert [(run["config"], run["input_len"]) for run in data["runs"]] == [("full", 64), ("madakv:0.2", 64)]
    for run in data["runs"]:
        assert run["completed"] == 8
        assert run["total_input_vision_tokens"] > 0  # the images reached the server
        assert set(run["metrics"]) == {*CLIENT_METRICS, *SERVER_METRICS}
        assert set(run["ratios"]) == set(run["metrics"])
        for key in ("request_throughput", "output_throughput", "mean_ttft_ms", "mean_itl_ms"):
            assert run["metrics"][key] > 0, key
        assert run["server"]["pool_slots"] == POOL
        assert 0 < run["metrics"]["peak_kv_slots"] <= POOL
        assert run["client_command"].startswith("python -m sglang.benchmark.serving --backend sglang")
        assert (out / "logs" / f"{serving.config_name(PolicySpec.parse(run['config']), 64)}.log").is_file()


def test_ratios_come_from_the_full_run_of_the_same_invocation(report: tuple[dict[str, Any], str, Path]) -> None:
    full, madakv = report[0]["runs"]
    assert all(ratio in (1.0, None) for ratio in full["ratios"].values())  # None: full's value was 0
    for key, ratio in madakv["ratios"].items():
        if full["metrics"][key]:
            assert ratio == pytest.approx(madakv["metrics"][key] / full["metrics"][key], rel=1e-3), key


def test_compression_runs_at_least_as_many_requests_at_once(report: tuple[dict[str, Any], str, Path]) -> None:
    full, madakv = report[0]["runs"]
    assert full["server"]["reclaimed_slots"] == 0 and madakv["server"]["reclaimed_slots"] > 0
    assert full["metrics"]["peak_running_requests"] < 8, "the pool should make full queue requests"
    assert madakv["metrics"]["peak_running_requests"] >= full["metrics"]["peak_running_requests"]


def test_markdown_table_is_printed(report: tuple[dict[str, Any], str, Path]) -> None:
    data, stdout, _ = report
    assert data["command"] in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| config | input len | req/s | out tok/s |")
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| full", "| madakv:0.2"]
    assert "x)" in rows[2]  # madakv's cells carry their ratio against full


def test_summarize_rebuilds_the_report_from_the_logs(report: tuple[dict[str, Any], str, Path]) -> None:
    """``--summarize`` (the GPU path) reads the same server logs and client JSON back into the same numbers."""
    data, _, out = report
    serving.main(["--summarize", str(out / "logs"), "--policies", "full", "madakv:0.2", "--input-lens", "64",
                  "--out", str(out / "summary.json")])
    summary = json.loads((out / "summary.json").read_text())
    assert [run["metrics"] for run in summary["runs"]] == [run["metrics"] for run in data["runs"]]
    assert [run["ratios"] for run in summary["runs"]] == [run["ratios"] for run in data["runs"]]
    assert [run["server"] for run in summary["runs"]] == [run["server"] for run in data["runs"]]
