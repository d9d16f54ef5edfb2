"""``python -m benchmarks.prefix_cache``: the traces and the per-turn metrics on made-up inputs, then one real run
on CPU (tiny Qwen2-VL, two image chats of two turns through SGLang's multi-turn client) with ``full``,
``madakv:0.2`` and ``madakv:0.2:radix-off``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import prefix_cache
from tests.sglang_server import run_benchmark

ROOT = Path(__file__).resolve().parents[2]


def _args(**overrides: Any) -> argparse.Namespace:
    values = {
        "seed": 3,
        "conversations": 2,
        "turns": 3,
        "documents": 2,
        "questions": 3,
        "images": 1,
        "first_words": 12,
        "question_words": 4,
        "output_len": 5,
    }
    return argparse.Namespace(**(values | overrides))


def test_a_chat_trace_sends_its_images_in_the_first_turn_only(tmp_path: Path) -> None:
    rows, cold = prefix_cache.chat_trace(_args(), tmp_path)
    assert cold == [True, False, False, True, False, False]  # the client's order: each chat's turns in turn
    assert len(rows) == 2
    for row in rows:
        first, *later = row["rounds"]
        assert [part["type"] for part in first[0]["content"]] == ["image_url", "text"]
        assert first[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert len(later) == 2 and all(isinstance(turn, str) for turn in later)
        assert row["output_len"] == 5
    assert rows[0]["rounds"][0] != rows[1]["rounds"][0]  # the chats do not share a prefix


def test_a_document_trace_asks_question_major(tmp_path: Path) -> None:
    rows, cold = prefix_cache.document_trace(_args(), tmp_path)
    assert cold == [True, True, False, False, False, False]
    assert all(len(row["rounds"]) == 1 for row in rows)
    texts = [row["rounds"][0][0]["content"][-1]["text"] for row in rows]
    documents = [text.split("\n\nQuestion: ")[0] for text in texts]
    assert documents[0::2] == [documents[0]] * 3 and documents[1::2] == [documents[1]] * 3
    assert documents[0] != documents[1]
    assert len(set(texts)) == 6  # every question differs


def test_the_same_seed_makes_the_same_trace(tmp_path: Path) -> None:
    first = prefix_cache.chat_trace(_args(), tmp_path / "a")
    assert prefix_cache.chat_trace(_args(), tmp_path / "b") == first
    assert prefix_cache.chat_trace(_args(seed=4), tmp_path / "c") != first


def _run(config: str, round_index: int, ttfts: list[float], cached: list[int]) -> dict[str, Any]:
    client = {
        "ttfts": ttfts,
        "cached_tokens": cached,
        "input_lens": [100] * len(ttfts),
        "cache_report": {"cache_hit_rate_pct": 50.0},
        "generated_texts": ["x"] * len(ttfts),
    }
    return {"config": config, "round": round_index, "sglang": client, "server": {"retracted_requests": 2}}


def test_turn_metrics_split_cold_and_warm_requests() -> None:
    run = _run("full", 0, [0.4, 0.1, 0.3, 0.2], [0, 90, 0, 70])
    metrics = prefix_cache.turn_metrics(run, [True, False, True, False])
    assert metrics == {
        "cold_ttft_ms": 350.0,
        "warm_ttft_ms": 150.0,
        "cache_hit_pct": 50.0,
        "warm_hit_pct": 80.0,
        "retracted_requests": 2,
    }
    assert "ttfts" not in run["sglang"] and "generated_texts" not in run["sglang"]


def test_turn_metrics_refuse_a_run_that_lost_requests() -> None:
    with pytest.raises(RuntimeError, match="3 TTFTs for 4 requests"):
        prefix_cache.turn_metrics(_run("full", 0, [0.1, 0.2, 0.3], [0, 0, 0]), [True] * 4)


def test_summary_ratios_are_within_a_round() -> None:
    runs = []
    for round_index, (full, madakv) in enumerate([(100.0, 50.0), (200.0, 150.0)]):
        for config, ttft in (("full", full), ("madakv:0.1", madakv)):
            runs.append({"config": config, "round": round_index, "metrics": {"warm_ttft_ms": ttft}})
    summary = {row["config"]: row for row in prefix_cache.summarize(runs)}
    assert summary["madakv:0.1"]["warm_ttft_ms"] == 100.0
    assert summary["madakv:0.1"]["warm_ttft_ms_ratio"] == (0.625, 0.5, 0.75)
    assert summary["full"]["cold_ttft_ms"] is None and summary["full"]["cold_ttft_ms_ratio"] is None


POOL = 4000  # roomy: both chats' prompts stay in the tree, so the warm turns can hit it


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from madakv_sglang import checkpoints

    model = checkpoints.write_checkpoint("qwen2_vl", tmp_path_factory.mktemp("ckpt") / "tiny-qwen2-vl", seed=0)
    out = tmp_path_factory.mktemp("prefix-cache")
    stdout = run_benchmark(
        "benchmarks.prefix_cache",
        [
            *("--model", str(model), "--policies", "full", "madakv:0.2", "madakv:0.2:radix-off"),
            *("--conversations", "2", "--turns", "2", "--images", "1", "--first-words", "60"),
            *("--question-words", "8", "--output-len", "4", "--max-total-tokens", str(POOL)),
            *("--out", str(out / "report.json"), "--log-dir", str(out / "logs")),
        ],
    )
    return {"data": json.loads((out / "report.json").read_text()), "stdout": stdout}


def test_the_warm_turns_hit_the_tree_unless_radix_is_off(report: dict[str, Any]) -> None:
    runs = {run["config"]: run for run in report["data"]["runs"]}
    assert list(runs) == ["full", "madakv:0.2", "madakv:0.2:radix-off"]
    for run in runs.values():
        assert run["completed"] == 4 and run["server"]["failed_requests"] == 0
        assert run["metrics"]["cold_ttft_ms"] > 0 and run["metrics"]["warm_ttft_ms"] > 0
    # A second turn re-sends the first turn's image and text: most of its prompt is in the tree. Not all of it:
    # the previous answer (not cached by madakv, which inserts prompts only) and the new question are prefilled.
    assert runs["full"]["metrics"]["warm_hit_pct"] > 50
    assert runs["madakv:0.2"]["metrics"]["warm_hit_pct"] > 50
    assert runs["madakv:0.2:radix-off"]["metrics"]["warm_hit_pct"] == 0
    assert runs["madakv:0.2:radix-off"]["metrics"]["cache_hit_pct"] == 0
    assert runs["madakv:0.2"]["server"]["reclaimed_slots"] > 0


def test_the_table_has_every_configuration(report: dict[str, Any]) -> None:
    rows = [line for line in report["stdout"].splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| config | req/s | cold TTFT ms | warm TTFT ms | cache hit % | warm hit %")
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| full", "| madakv:0.2", "| madakv:0.2:radix-off"]


def test_the_client_sends_all_at_once_unless_told_a_concurrency() -> None:
    def workload(limit: int | None) -> prefix_cache.TraceWorkload:
        return prefix_cache.TraceWorkload(
            dataset="openai", num_prompts=4, output_len=4, image_count=1, image_resolution="224x224", seed=0,
            trace_path="t.jsonl", rows=2, cold=(True, False, True, False), max_concurrency=limit,
        )  # fmt: skip

    assert "--max-concurrency" not in workload(None).client_args(0)
    args = workload(1).client_args(0)
    assert args[args.index("--max-concurrency") + 1] == "1" and args[args.index("--request-rate") + 1] == "inf"
    assert args[args.index("--num-prompts") + 1] == "2"  # the client counts conversations, not requests
