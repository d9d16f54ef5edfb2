"""``python -m benchmarks.accuracy`` on a tiny setting: both paths run, the JSON, table and plots are written, and
the HF path and the engine give the same answers on the same prompts (random weights: the answers are noise, but
the same noise, which is what the agreement check needs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import accuracy
from benchmarks.needles.suite import FILLER
from madakv_sglang.checkpoints import write_checkpoint


def test_accuracy_benchmark_writes_results_and_the_paths_agree(tmp_path: Path) -> None:
    model = write_checkpoint("qwen2_vl", tmp_path / "model", seed=0)
    out = tmp_path / "out"
    code = accuracy.main(
        [
            "--model",
            str(model),
            "--policies",
            "full",
            "madakv",
            "madakv-chunk",
            "h2o",
            "--budgets",
            "0.2",
            "--samples",
            "2",
            "--sentences",
            "16",
            "--images",
            "2",
            "--path",
            "both",
            # one request at a time: random weights leave near-ties that another batch shape's
            # float sums could flip, and this test wants exact agreement
            "--concurrency",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    record = json.loads((out / "results.json").read_text())
    cells = record["summary"]["cells"]
    assert {(c["path"], c["policy"]) for c in cells} == {
        ("hf", "full"),
        ("hf", "madakv"),
        ("hf", "h2o"),
        ("engine", "full"),
        ("engine", "madakv"),
        ("engine", "madakv-chunk"),
    }  # h2o: HF only; madakv-chunk: engine only
    assert all(0.0 <= c["accuracy"] <= 1.0 and c["samples"] == 2 for c in cells)
    madakv = [c for c in cells if c["policy"] in ("madakv", "madakv-chunk")]
    full = [c for c in cells if c["policy"] == "full"]
    assert all(c["slot_fraction"] < 0.5 for c in madakv) and all(c["slot_fraction"] == 1.0 for c in full)
    # The engine (shared layout, the default) holds what the HF path computes for shared from the same kept
    # sets; per-layer, measured in the HF path only, never holds less.
    hf = {(c["policy"], c["task"]): c for c in cells if c["path"] == "hf"}
    for c in cells:
        if c["path"] == "engine" and c["policy"] != "madakv-chunk":
            assert c["layout"] == "shared" and c["slot_fraction"] == hf[(c["policy"], c["task"])]["slot_fraction"]
        elif c["path"] == "hf":
            assert c["slot_fraction_per_layer"] >= c["slot_fraction"]
    agreement = record["summary"]["agreement"]
    # 2 prompts x 4 tasks x (full, madakv): every engine run of a policy both paths run is paired with the HF run of
    # the same prompt
    assert agreement["pairs"] == 16 and agreement["differences"] == [], agreement
    assert (out / "accuracy_vs_budget.png").stat().st_size > 0 and (out / "accuracy_vs_slots.png").exists()
    assert (out / "accuracy_vs_slots_per_layer.png").exists()
    assert "| madakv | 0.2 |" in (out / "table.md").read_text()


def test_engine_only_policies_are_refused_on_the_hf_path(tmp_path: Path) -> None:
    model = write_checkpoint("qwen2_vl", tmp_path / "model", seed=0)
    with pytest.raises(SystemExit, match="madakv-chunk: these run in the engine only"):
        accuracy.main(["--model", str(model), "--policies", "madakv-chunk", "--path", "hf", "--out", str(tmp_path)])


@pytest.mark.parametrize("haystack", ["filler", "prose"])
def test_smol_samples_take_the_haystack_asked_for(haystack: str) -> None:
    args = argparse.Namespace(
        suite="smol", tasks=["colour"], contexts=["2x6", "3x9"], images=4, sentences=80, samples=2, seed=10_000
    )
    samples = accuracy.suite_samples(argparse.Namespace(**vars(args), haystack=haystack), argparse.ArgumentParser())
    assert [(s.config.images, s.config.sentences) for s in samples] == [(2, 6), (2, 6), (3, 9), (3, 9)]
    assert {s.config.haystack for s in samples} == {haystack}
    has_filler = [any(sentence in s.text() for sentence in FILLER) for s in samples]
    assert has_filler == [haystack == "filler"] * len(samples)


def test_the_needle_suite_refuses_a_prose_haystack() -> None:
    args = argparse.Namespace(
        suite="needle", tasks=["text"], contexts=None, images=1, sentences=3, samples=1, seed=1, haystack="prose"
    )
    with pytest.raises(SystemExit):
        accuracy.suite_samples(args, argparse.ArgumentParser())
