"""``python -m benchmarks.latency`` end to end on the tiny shape (CPU), and the prompts it builds.

The timings it prints on CPU mean nothing; these tests check the prompt layout, the byte accounting against the
policy's selection and that the JSON holds every row with its ratios against ``full``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import latency


def test_prompt_holds_whole_images_at_the_visual_share_and_ends_in_text() -> None:
    shape = latency.SHAPES["tiny"]  # 16 tokens per image
    ids = latency.prompt_ids(shape, 512, 0.8, 32, torch.Generator().manual_seed(1))[0]
    visual = ids == shape.image_token_id
    assert ids.shape == (512,) and int(visual.sum()) == (int(0.8 * 512) // 16) * 16
    assert not bool(visual[-32:].any())  # the observation window is text, as a question is
    runs = torch.diff(torch.nonzero(torch.diff(visual.int())).flatten())[::2]  # lengths of the image runs
    assert bool((runs == 16).all())


def test_prompt_that_cannot_hold_the_images_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        latency.prompt_ids(latency.SHAPES["tiny"], 40, 0.9, 32, torch.Generator())


def test_tiny_run_writes_every_row_with_bytes_from_the_selection(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    latency.main(
        [
            "--shapes",
            "tiny",
            "--contexts",
            "256",
            "--policies",
            "madakv",
            "snapkv",
            "--budgets",
            "0.2",
            "--decode-tokens",
            "3",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    record = json.loads(out.read_text())
    rows = {(r["policy"], r["budget"]): r for r in record["rows"]}
    assert set(rows) == {("full", 1.0), ("madakv", 0.2), ("snapkv", 0.2)}
    full = rows[("full", 1.0)]
    # tiny: 2 layers x 2 KV heads x 256 cells x (K + V) x 16 dims x 4 bytes (fp32 on CPU)
    assert full["kv_bytes_full"] == full["kv_bytes_kept"] == full["kv_bytes_padded"] == 2 * 2 * 256 * 2 * 16 * 4
    for name in ("madakv", "snapkv"):
        row = rows[(name, 0.2)]
        # B = ceil(0.2 n) per head on average; madakv's HCC may move cells between layers, never past the total.
        assert row["kv_bytes_kept"] <= 0.2 * full["kv_bytes_full"] + 2 * 2 * 2 * 16 * 4
        assert row["kv_bytes_kept"] <= row["kv_bytes_padded"] < full["kv_bytes_full"]
        assert row["kv_ratio"] == pytest.approx(row["kv_bytes_kept"] / full["kv_bytes_full"])
        assert row["decode_ms"] > 0 and row["speedup"] == pytest.approx(full["decode_ms"] / row["decode_ms"])
        assert row["visual_tokens"] == (int(0.8 * 256) // 16) * 16
