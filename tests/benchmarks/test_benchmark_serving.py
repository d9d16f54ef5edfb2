"""``python -m benchmarks.serving``: the log parser, the ratios and the report on made-up inputs, then one real run
on CPU (tiny Qwen2-VL, ``full`` and ``madakv:0.2`` servers on the same small pool, SGLang's own client)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import serving
from benchmarks.serving import CLIENT_METRICS, SERVER_METRICS, LogStats, PolicySpec, parse_server_log
from madakv_sglang.config import ConfigError
from madakv_sglang.log_lines import format_batch
from tests.sglang_server import run_benchmark

ROOT = Path(__file__).resolve().parents[2]

# Lines as SGLang 0.5.23 writes them (shortened where the parser does not look), and madakv's from its formatter.
LOG = f"""\
[t] max_total_num_tokens=1000, chunked_prefill_size=4096, max_prefill_tokens=16384
[t] Prefill batch, #new-seq: 1, #new-token: 48, #cached-token: 0, token usage: 0.05, #running-req: 0, #queue-req: 0
[t] {format_batch(reclaimed=150, since_start=150, available=700, capacity=1000, state_rows=1, state_bytes=4096)}
[t] Prefill batch, #new-seq: 3, #new-token: 600, #cached-token: 0, token usage: 0.30, #running-req: 2, #queue-req: 4
[t] Decode batch, #running-req: 5, #token: 310, token usage: 0.31, cpu graph: False, gen throughput (token/s): 9.0
[t] KV cache pool is full. Retract requests. #retracted_reqs: 2, #new_tokens_gained: 40
[t] Decode batch, #running-req: 3, #token: 420, token usage: 0.42, cpu graph: False, gen throughput (token/s): 9.0
[t] [http_server] Error: No data iterator found for token: <|video_pad|>
"""


@pytest.mark.parametrize(
    ("text", "policy", "budget", "label"),
    [
        ("full", "full", None, "full"),
        ("madakv:0.1", "madakv", "0.1", "madakv:0.1"),
        ("snapkv:512", "snapkv", "512", "snapkv:512"),
        ("madakv", "madakv", "0.2", "madakv:0.2"),  # the server's default budget
        ("pyramidkv:0.1:per-layer", "pyramidkv", "0.1", "pyramidkv:0.1:per-layer"),
        ("madakv:0.1:chunk", "madakv", "0.1", "madakv:0.1:chunk"),
        ("madakv:0.1:chunk:per-layer", "madakv", "0.1", "madakv:0.1:per-layer:chunk"),
        ("madakv:0.1:chunk-keep4", "madakv", "0.1", "madakv:0.1:chunk-keep4"),
        ("madakv:0.1:radix-off", "madakv", "0.1", "madakv:0.1:radix-off"),
    ],
)
def test_policy_spec_parses_policy_and_budget(text: str, policy: str, budget: str | None, label: str) -> None:
    spec = PolicySpec.parse(text)
    assert (spec.policy, spec.budget, spec.label) == (policy, budget, label)
    assert spec.server_args()[:2] == ["--kv-policy", policy]
    assert ("--kv-layout" in spec.server_args()) == (":per-layer" in label)
    assert ("--kv-prefill-evict" in spec.server_args()) == (":chunk" in label)
    assert ("--kv-prefill-keep" in spec.server_args()) == ("-keep" in label)
    assert ("--kv-radix" in spec.server_args()) == (":radix-off" in label)


@pytest.mark.parametrize(
    "text",
    [
        "nope:0.1",
        "madakv:1.5",
        "madakv:abc",
        "full:0.1",
        "madakv:0.1:paged",
        "full::shared",
        "madakv:0.1:chunk:chunk",
        "madakv:0.1:chunk:chunk-keep2",
        "madakv:0.1:chunk-keep0.5",
        "madakv:0.1:chunk-keep",
        "streamingllm:0.1:chunk",
        "madakv:0.1:radix-off:radix-off",
        "full:radix-off",
    ],
)
def test_policy_spec_refuses_bad_values(text: str) -> None:
    with pytest.raises(ConfigError):
        PolicySpec.parse(text)


def test_policies_must_include_full() -> None:
    with pytest.raises(SystemExit, match="include full"):
        serving.main(["--policies", "madakv:0.1", "--print-gpu-commands"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--print-gpu-commands", "--repeats", "2"], "one round"),
        (["--summarize", "unused", "--repeats", "3"], "one round"),
        (["--repeats", "0"], "at least 1"),
        (["--num-prompts", "0"], "at least 1"),
    ],
)
def test_bad_run_settings_are_refused(args: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        serving.main(args)


def test_a_median_of_two_counts_keeps_its_half() -> None:
    assert serving._median([4, 5]) == 4.5 and serving._median([4, 5, 9]) == 5
    assert serving._median([4, None]) is None
    assert (serving._fmt(4.5, 0), serving._fmt(5, 0), serving._fmt(1347.0, 0)) == ("4.5", "5", "1347")


def test_log_parser_takes_the_peaks() -> None:
    stats = parse_server_log(LOG)
    assert stats == LogStats(
        pool_slots=1000,
        peak_running_requests=5,  # decode 5; prefill 2 running + 3 new = 5
        peak_kv_slots=450,  # madakv before returning its 150 slots: 1000 - 700 + 150
        peak_held_kv_slots=420,
        reclaimed_slots=150,
        retracted_requests=2,
        failed_requests=1,
        first_error="No data iterator found for token: <|video_pad|>",
    )
    assert parse_server_log("", pool_slots=10) == LogStats(10, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="max_total_num_tokens"):
        parse_server_log("no pool line")


def test_a_failed_request_stops_the_measurement() -> None:
    """SGLang's client counts a streamed error as completed; the server log's error line must stop the report."""
    failed = parse_server_log(LOG)
    with pytest.raises(RuntimeError, match="1 of 8 requests failed.*video_pad"):
        serving.check_all_served("full-in64", {"completed": 8}, failed, num_prompts=8)
    clean = parse_server_log(LOG.replace("[http_server] Error", "[http_server] Note"))
    serving.check_all_served("full-in64", {"completed": 8}, clean, num_prompts=8)
    with pytest.raises(RuntimeError, match="7 completed"):  # an HTTP error the client did see
        serving.check_all_served("full-in64", {"completed": 7}, clean, num_prompts=8)


def test_rounds_alternate_their_order() -> None:
    full, madakv = PolicySpec.parse("full"), PolicySpec.parse("madakv:0.1")
    order = serving.measurement_order([full, madakv], [64, 256], repeats=3)
    assert [(r, n, spec.label) for r, n, spec in order] == [
        (0, 64, "full"),
        (0, 64, "madakv:0.1"),
        (0, 256, "full"),
        (0, 256, "madakv:0.1"),
        (1, 256, "madakv:0.1"),
        (1, 256, "full"),
        (1, 64, "madakv:0.1"),
        (1, 64, "full"),
        (2, 64, "full"),
        (2, 64, "madakv:0.1"),
        (2, 256, "full"),
        (2, 256, "madakv:0.1"),
    ]


def _run(policy: str, budget: str | None, input_len: int, scale: float, round_index: int = 0) -> dict[str, Any]:
    metrics = {key: 10.0 * scale for key in CLIENT_METRICS} | {key: int(4 * scale) for key in SERVER_METRICS}
    return {
        "config": policy if budget is None else f"{policy}:{budget}",
        "policy": policy,
        "budget": budget,
        "input_len": input_len,
        "round": round_index,
        "metrics": metrics,
        "server": {"retracted_requests": 0},
    }


def test_ratios_are_against_full_at_the_same_prompt_length() -> None:
    runs = [
        _run("full", None, 64, 1.0),
        _run("madakv", "0.1", 64, 2.0),
        _run("full", None, 256, 0.5),
        _run("madakv", "0.1", 256, 3.0),
    ]
    runs[1]["metrics"]["median_itl_ms"] = None  # a metric SGLang did not give has no ratio
    serving.add_ratios(runs)
    assert runs[0]["ratios"]["request_throughput"] == 1.0
    assert runs[1]["ratios"]["request_throughput"] == 2.0
    assert runs[1]["ratios"]["peak_running_requests"] == 2.0
    assert runs[1]["ratios"]["median_itl_ms"] is None
    assert runs[3]["ratios"]["output_throughput"] == 6.0
    with pytest.raises(ValueError, match="no full run"):
        serving.add_ratios([_run("madakv", "0.1", 64, 1.0)])


def test_ratios_are_taken_within_a_round_then_their_median() -> None:
    """Round 1 ran on a machine twice as slow, so its ratio (3x) differs from the ratio of the medians (2x)."""
    runs = [
        _run("full", None, 64, 1.0, 0),
        _run("madakv", "0.1", 64, 2.0, 0),
        _run("full", None, 64, 0.5, 1),
        _run("madakv", "0.1", 64, 1.5, 1),
        _run("full", None, 64, 1.0, 2),
        _run("madakv", "0.1", 64, 3.0, 2),
    ]
    runs[3]["metrics"]["median_itl_ms"] = None
    serving.add_ratios(runs)
    full, madakv = serving.summarize_rounds(runs)
    assert (full["config"], full["rounds"], madakv["config"]) == ("full", 3, "madakv:0.1")
    assert full["metrics"]["request_throughput"] == 10.0  # median of 10, 5, 10
    assert madakv["metrics"]["request_throughput"] == 20.0  # median of 20, 15, 30
    assert madakv["ratios"]["request_throughput"] == 3.0  # median of 2, 3, 3 (the ratio of medians is 2)
    assert madakv["ratio_range"]["request_throughput"] == [2.0, 3.0]
    assert madakv["metrics"]["median_itl_ms"] is None and madakv["ratio_range"]["median_itl_ms"] is None
    assert "20.00 (3.00x, 2.00-3.00)" in serving._cell(madakv, "request_throughput", 2)


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
    args = [
        "--model",
        str(model),
        "--policies",
        "full",
        "madakv:0.2",
        "--input-lens",
        "64",
        "--num-prompts",
        "8",
        "--image-count",
        "1",
        "--output-len",
        "4",
        "--repeats",
        "2",
        "--max-total-tokens",
        str(POOL),
        "--out",
        str(out / "serving.json"),
        "--log-dir",
        str(out / "logs"),
    ]
    # ~150-token prompts: the benchmark's servers inherit the test servers' floor-off default (NO_FLOOR_ENV).
    stdout = run_benchmark("benchmarks.serving", args)
    return json.loads((out / "serving.json").read_text()), stdout, out


def test_report_has_every_metric_for_every_configuration(report: tuple[dict[str, Any], str, Path]) -> None:
    data, _, out = report
    assert data["command"].startswith("python -m benchmarks.serving ")
    assert data["setting"]["max_total_tokens"] == POOL
    assert [(run["round"], run["config"]) for run in data["runs"]] == [
        (0, "full"),
        (0, "madakv:0.2"),
        (1, "madakv:0.2"),
        (1, "full"),
    ]  # the second round runs backwards
    for run in data["runs"]:
        assert run["completed"] == 8 and run["server"]["failed_requests"] == 0
        assert run["total_input_vision_tokens"] > 0  # the images reached the server
        assert set(run["metrics"]) == {*CLIENT_METRICS, *SERVER_METRICS}
        assert set(run["ratios"]) == set(run["metrics"])
        for key in ("request_throughput", "output_throughput", "mean_ttft_ms", "mean_itl_ms"):
            assert run["metrics"][key] > 0, key
        assert run["server"]["pool_slots"] == POOL
        assert 0 < run["metrics"]["peak_kv_slots"] <= POOL
        assert run["client_command"].startswith("python -m sglang.benchmark.serving --backend sglang")
        name = serving.config_name(PolicySpec.parse(run["config"]), 64, run["round"])
        assert (out / "logs" / f"{name}.log").is_file()
    assert [(row["config"], row["rounds"]) for row in data["summary"]] == [("full", 2), ("madakv:0.2", 2)]


def _rounds(data: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(full, madakv) of each round."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for run in data["runs"]:
        by_round.setdefault(run["round"], {})[run["policy"]] = run
    return [(runs["full"], runs["madakv"]) for _, runs in sorted(by_round.items())]


def test_ratios_come_from_the_full_run_of_the_same_round(report: tuple[dict[str, Any], str, Path]) -> None:
    for full, madakv in _rounds(report[0]):
        assert all(ratio in (1.0, None) for ratio in full["ratios"].values())  # None: full's value was 0
        for key, ratio in madakv["ratios"].items():
            if full["metrics"][key]:
                # abs: the report rounds ratios to 4 decimals, more than 1e-3 of a small one (0.0254 for 0.02544)
                assert ratio == pytest.approx(madakv["metrics"][key] / full["metrics"][key], rel=1e-3, abs=5e-5), key
    summary = report[0]["summary"][1]
    throughput = sorted(madakv["ratios"]["request_throughput"] for _, madakv in _rounds(report[0]))
    assert summary["ratio_range"]["request_throughput"] == throughput


def test_compression_runs_at_least_as_many_requests_at_once(report: tuple[dict[str, Any], str, Path]) -> None:
    for full, madakv in _rounds(report[0]):
        assert full["server"]["reclaimed_slots"] == 0 and madakv["server"]["reclaimed_slots"] > 0
        assert full["metrics"]["peak_running_requests"] < 8, "the pool should make full queue requests"
        assert madakv["metrics"]["peak_running_requests"] >= full["metrics"]["peak_running_requests"]


def test_markdown_table_is_printed(report: tuple[dict[str, Any], str, Path]) -> None:
    data, stdout, _ = report
    assert data["command"] in stdout
    assert "Medians over 2 rounds" in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| config | input len | req/s | out tok/s |")
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| full", "| madakv:0.2"]
    assert "x, " in rows[2]  # madakv's cells carry their median ratio against full and its range


def test_summarize_rebuilds_the_report_from_the_logs(report: tuple[dict[str, Any], str, Path]) -> None:
    """``--summarize`` (the GPU path, one round) reads the same server logs and client JSON back into the same
    numbers: here, round 0's files under the names the GPU commands write."""
    data, _, out = report
    gpu_dir = out / "gpu"
    gpu_dir.mkdir()
    for spec in (PolicySpec.parse("full"), PolicySpec.parse("madakv:0.2")):
        for suffix in (".log", ".jsonl"):
            source = out / "logs" / f"{serving.config_name(spec, 64, 0)}{suffix}"
            (gpu_dir / f"{serving.config_name(spec, 64)}{suffix}").write_bytes(source.read_bytes())
    serving.main(
        [
            "--summarize",
            str(gpu_dir),
            "--policies",
            "full",
            "madakv:0.2",
            "--input-lens",
            "64",
            "--num-prompts",
            "8",
            "--out",
            str(out / "summary.json"),
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    first_round = [run for run in data["runs"] if run["round"] == 0]
    assert [run["metrics"] for run in summary["runs"]] == [run["metrics"] for run in first_round]
    assert [run["ratios"] for run in summary["runs"]] == [run["ratios"] for run in first_round]
    assert [run["server"] for run in summary["runs"]] == [run["server"] for run in first_round]
