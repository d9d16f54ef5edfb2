"""``python -m benchmarks.text_needle`` on a tiny setting: SmolLM2-135M (real weights, `make setup-smollm2`) served by
SGLang answers pass-key prompts for two policies; the JSON and table are written and kept slots follow the budget.
The answers are not asserted (the full benchmark measures them); the prompt is checked to hold its key once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import text_needle

pytestmark = pytest.mark.skipif(
    not (text_needle.MODEL / "config.json").exists(), reason="needs `make setup-smollm2` (make test runs it first)"
)


def test_passkey_prompt_states_its_key_and_primes_the_answer() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_needle.MODEL)
    prompt, key = text_needle.passkey_prompt(tokenizer, 20, 0.5, seed=3)
    assert prompt.count(f"The pass key is {key}.") == 1 and prompt.endswith(text_needle.PRIME)
    assert (prompt, key) == text_needle.passkey_prompt(tokenizer, 20, 0.5, seed=3)


def test_text_needle_benchmark_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert (
        text_needle.main(
            [
                "--policies",
                "full",
                "madakv",
                "--budgets",
                "0.2",
                "--sentences",
                "30",
                "--samples",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads((out / "results.json").read_text())
    cells = {c["policy"]: c for c in record["summary"]["cells"]}
    assert set(cells) == {"full", "madakv"} and all(c["samples"] == 2 for c in cells.values())
    assert cells["full"]["slot_fraction"] == 1.0 and cells["madakv"]["slot_fraction"] < 0.4
    assert "| madakv | 0.2 |" in (out / "table.md").read_text()
