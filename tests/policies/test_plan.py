"""The plan CLI: its JSON contract, and that MadaKV moves budget to the modality a head attends to."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from madakv_sglang.plan import main


def plan_json(capsys, *args: str) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("layout", ["shared", "per-layer"])
def test_json_contract_and_budget(capsys, layout):
    report = plan_json(
        capsys,
        "--layers",
        "8",
        "--heads",
        "4",
        "--prompt",
        "600",
        "--budget",
        "0.1",
        "--policy",
        "madakv",
        "--layout",
        layout,
    )
    assert {
        "policy",
        "layout",
        "budget_tokens",
        "total_kept",
        "slots_kept",
        "slots_reclaimed",
        "packing_waste",
        "layers",
    } <= report.keys()
    B, L, H = report["budget_tokens"], 8, 4
    assert B == 60 and report["layout"] == layout
    assert report["total_kept"] <= L * H * B
    cap_cells = math.floor(1.25 * H * B)
    assert all(row["total"] <= cap_cells for row in report["layers"]), "no layer above its cap"
    if layout == "per-layer":  # the fullest layer sets the slots of all
        assert report["slots_kept"] == max(math.ceil(row["total"] / H) for row in report["layers"])
        assert report["slots_kept"] <= math.ceil(1.25 * B)
    else:  # the mean over layers does
        assert report["slots_kept"] == math.ceil(sum(row["total"] for row in report["layers"]) / (L * H)) <= B
    assert report["slots_reclaimed"] == 600 - report["slots_kept"]
    assert report["packing_waste"] == report["slots_kept"] * L * H - report["total_kept"]
    for row in report["layers"]:
        assert [v + t for v, t in zip(row["kept_visual"], row["kept_text"], strict=True)] == row["kept"]


def test_shared_layout_holds_the_budget_at_the_issue_setting(capsys):
    """The setting of the shared-cells issue: 13,120 cells = L*H*B kept; per-layer held 257 slots (the 1.25 cap
    on a 205-token budget), shared holds ceil(13,120 / 64) = 205."""
    args = (
        "--policy",
        "madakv",
        "--layers",
        "8",
        "--heads",
        "8",
        "--prompt",
        "2048",
        "--visual-frac",
        "0.6",
        "--budget",
        "0.1",
    )
    shared = plan_json(capsys, *args, "--layout", "shared")
    per_layer = plan_json(capsys, *args, "--layout", "per-layer")
    assert shared["total_kept"] == per_layer["total_kept"] == 8 * 8 * 205
    assert (shared["slots_kept"], shared["packing_waste"]) == (205, 0)
    assert per_layer["slots_kept"] == 257


def test_madakv_moves_budget_to_the_visual_heads(tmp_path, capsys):
    # Head 0 attends to the image, head 1 to the text; with MPA head 0 keeps more visual tokens than head 1,
    # without MPA (snapkv-like ranking over all tokens) the split follows raw scores only.
    n, W = 200, 8
    visual = torch.zeros(n, dtype=torch.bool)
    visual[20:140] = True
    gen = torch.Generator().manual_seed(0)
    psi = torch.rand(2, 2, n, generator=gen) * 0.01
    psi[:, 0, 20:140] += 0.05  # head 0: mass on visual
    psi[:, 1, :20] += 0.2  # head 1: mass on text
    psi[:, 1, 140 : n - W] += 0.2
    path = tmp_path / "scores.pt"
    torch.save({"scores": psi, "visual": visual}, path)
    report = plan_json(
        capsys,
        "--scores",
        str(path),
        "--budget",
        "0.2",
        "--window",
        str(W),
        "--hcc",
        "off",
        "--sink",
        "0",
        "--min-prompt",
        "0",
    )
    for row in report["layers"]:
        assert row["kept_visual"][0] > 0.8 * (row["kept"][0] - W), "visual-preferring head keeps mostly visual"
        assert row["kept_text"][1] > 0.8 * (row["kept"][1] - W), "text-preferring head keeps mostly text"
        assert sum(row["kept"]) == 2 * report["budget_tokens"]


def test_bad_values_exit_2_with_a_message():
    result = subprocess.run(
        [sys.executable, "-m", "madakv_sglang.plan", "--budget", "0"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "budget" in result.stderr


@pytest.mark.parametrize("policy", ["full", "snapkv", "streamingllm", "random"])
def test_text_report_runs_for_every_policy(capsys, policy):
    assert main(["--layers", "3", "--heads", "2", "--prompt", "300", "--policy", policy, "--budget", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "slots held M=" in out


def test_report_says_why_a_prompt_is_not_compressed(capsys):
    short = plan_json(capsys, "--prompt", "120", "--layers", "2")
    assert short["skipped"] == "short prompt" and short["slots_kept"] == 120
    small = plan_json(capsys, "--prompt", "300", "--layers", "2", "--budget", "280")
    assert small["skipped"] == "small saving" and small["slots_reclaimed"] == 0
    assert main(["--prompt", "120", "--layers", "2"]) == 0
    assert "not compressed: short prompt (n=120 < min_prompt 256)" in capsys.readouterr().out
    # Above the floor, at 10% of 400 tokens: B = 40 < S + 2W = 68, so the window shrinks to (40 - 4) // 2 = 18.
    kept = plan_json(capsys, "--prompt", "400", "--layers", "2", "--budget", "0.1")
    assert (kept["skipped"], kept["sinks"], kept["kept_window"]) == (None, 4, 18)
