"""MadaKV serving real weights on CPU: SmolLM2-135M-Instruct (``make setup-smollm2``), fp32, strict memory checks
and NaN poisoning on, the server at its default settings (``--kv-policy madakv`` and nothing else).

- A chat prompt of a few hundred tokens (facts, then a question about them): with the budget overridden to the
  whole prompt the server answers exactly as stock SGLang; at the default budget of 0.2 it reclaims 80% of the
  prompt's slots and still answers with finite log-probabilities.
- Short factual chats (``benchmarks.short_prompts``) that stock SGLang answers right: madakv, snapkv and adakv
  answer them token for token as stock does, because the default ``--kv-min-prompt`` keeps them whole, and say
  so in ``meta_info`` and the metrics.
- Above the floor, the HF path keeps the very cells the engine kept (sinks included).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.short_prompts import QUESTIONS, answered, prompt_ids
from madakv_sglang.config import PolicyConfig
from madakv_sglang.log_lines import request_lines
from tests.mm_inputs import reclaim_lines
from tests.sglang_server import Server

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / ".models" / "smollm2-135m-instruct"
MAX_NEW = 40
# An idle SGLang scheduler busy-polls a whole core unless told to sleep.
BASE_ARGS = ["--max-total-tokens", "4096"]

FACTS = """\
Here are some facts about the town of Millbrook.
Millbrook lies on the east bank of the Silver River, about forty kilometres north of the capital.
The town was founded in 1732 by a group of millers, which is where its name comes from.
About twelve thousand people live in Millbrook today. Most of them work in farming, in the old paper mill,
or in the small hospital on Oak Street. The mayor of Millbrook is a retired teacher named Helen Carter,
who was elected in 2019 and re-elected in 2023. The town has two schools, a public library with a famous
collection of old maps, and a stone bridge that was built in 1850 and still carries cars today.
Every September the town holds an apple festival in the main square, where farmers sell cider, pies and
fresh apples, and a brass band plays in the evening. The local football team is called the Millbrook Otters
and plays in green shirts. The nearest train station is in Riverton, a larger town ten kilometres to the south.
Winters in Millbrook are cold and snowy, and summers are warm with frequent thunderstorms in July.
The oldest building in town is the mill itself, which is now a museum about the history of paper making.
"""
QUESTION = "Who is the mayor of Millbrook, and when was she first elected?"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    if not (MODEL / "model.safetensors").exists():
        pytest.skip(f"SmolLM2 weights not converted at {MODEL}: run `make setup-smollm2`")
    return MODEL


@pytest.fixture(scope="module")
def prompt(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = [{"role": "user", "content": FACTS + "\n" + QUESTION}]
    text = str(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert 200 <= len(ids) <= 600, len(ids)
    return ids


@pytest.fixture(scope="module")
def stock(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("logs") / "stock.log"
    with Server(model_dir, [*BASE_ARGS, "--attention-backend", "torch_native"], log) as server:
        yield server


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dumps")


@pytest.fixture(scope="module")
def madakv(model_dir: Path, dump_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("logs") / "madakv.log"
    with Server(
        model_dir,
        [*BASE_ARGS, "--kv-policy", "madakv", "--enable-metrics"],
        log,
        env={"MADAKV_DEBUG_DUMP_DIR": str(dump_dir)},
        short_prompt_floor=True,
    ) as server:
        yield server


def _generate(server: Server, ids: list[int], rid: str, custom: dict[str, Any] | None = None) -> dict[str, Any]:
    sampling: dict[str, Any] = {"temperature": 0, "max_new_tokens": MAX_NEW}
    if custom:
        sampling["custom_params"] = custom
    return dict(
        server.post("/generate", {"input_ids": ids, "rid": rid, "sampling_params": sampling, "return_logprob": True})
    )


def _logprobs(output: dict[str, Any]) -> list[float]:
    return [entry[0] for entry in output["meta_info"]["output_token_logprobs"]]


@pytest.fixture(scope="module")
def stock_answer(stock: Server, prompt: list[int]) -> dict[str, Any]:
    return _generate(stock, prompt, "stock")


def test_full_budget_override_answers_like_stock(
    madakv: Server, stock_answer: dict[str, Any], prompt: list[int]
) -> None:
    got = _generate(madakv, prompt, "full-budget", custom={"kv_budget": "1.0"})
    assert got["output_ids"] == stock_answer["output_ids"]
    # Same kernels on both sides for the prompt; decode runs the base backend too when nothing was evicted.
    assert _logprobs(got) == pytest.approx(_logprobs(stock_answer), abs=1e-4)
    assert "full-budget" not in reclaim_lines(madakv.log())
    assert got["meta_info"]["madakv"] == [
        {
            "prompt_slots": len(prompt),
            "kept_slots": len(prompt),
            "reclaimed_slots": 0,
            "packing_waste_cells": 0,
            "compress_ms": 0.0,
            "layout": "shared",
            "skipped": "small saving",
            "prompt_cached": True,  # served whole: SGLang's radix tree caches it as stock
        }
    ]


def test_budget_02_reclaims_and_answers(madakv: Server, stock_answer: dict[str, Any], prompt: list[int]) -> None:
    got = _generate(madakv, prompt, "budget-02")
    values = _logprobs(got)
    assert got["text"].strip() and values and all(math.isfinite(v) for v in values)
    prompt_slots, kept_slots = reclaim_lines(madakv.log())["budget-02"]
    assert prompt_slots == len(prompt)
    assert kept_slots < 0.3 * prompt_slots, (prompt_slots, kept_slots)
    # Not asserted (a 135M model at 20% of its cache may rephrase): shown with `pytest -s` for the record.
    print(
        f"\nSmolLM2 n={prompt_slots} -> M={kept_slots}\n  full: {stock_answer['text']!r}\n  0.2:  {got['text']!r}"
        f"\n  same tokens: {got['output_ids'] == stock_answer['output_ids']}"
    )


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_short_chats_are_answered_exactly_as_stock(madakv: Server, stock: Server, tokenizer: Any) -> None:
    assert len(QUESTIONS) >= 20
    default = PolicyConfig()
    for index, question in enumerate(QUESTIONS):
        ids = prompt_ids(tokenizer, question, 0)
        assert len(ids) < default.min_prompt, (question, len(ids))
        reference = _generate(stock, ids, f"short-stock-{index}")
        assert answered(reference["text"], question), (question, reference["text"])
        for policy in ("madakv", "snapkv", "adakv"):
            got = _generate(madakv, ids, f"short-{policy}-{index}", custom={"kv_policy": policy})
            assert got["output_ids"] == reference["output_ids"], (policy, question, got["text"])
            assert got["meta_info"]["madakv"][0]["skipped"] == "short prompt"
            assert got["meta_info"]["madakv"][0]["kept_slots"] == len(ids)
    log = madakv.log()
    assert any(line.skip_reason == "short prompt" for line in request_lines(log))
    assert not any(rid.startswith("short-") for rid in reclaim_lines(log)), "a short chat was compressed"
    metrics = madakv.get("/metrics")
    skipped = [
        line
        for line in metrics.splitlines()
        if line.startswith("madakv_skipped_requests_total") and 'reason="short prompt"' in line
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in skipped) >= 3 * len(QUESTIONS), skipped


def test_hf_path_keeps_the_cells_the_engine_kept(
    madakv: Server, model_dir: Path, tokenizer: Any, dump_dir: Path
) -> None:
    """Above the floor (4 context paragraphs, ~600 tokens) at the defaults: budget 0.2, 4 sinks, window 32."""
    import torch
    from transformers import AutoModelForCausalLM

    from madakv_sglang import hf

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for index, question in enumerate(QUESTIONS[:3]):
        ids = prompt_ids(tokenizer, question, 4)
        rid = f"hf-agree-{index}"
        got = _generate(madakv, ids, rid)
        assert got["meta_info"]["madakv"][0]["skipped"] is None
        engine = torch.load(dump_dir / f"{rid}.pt", weights_only=True)
        config = PolicyConfig()
        inputs = {"input_ids": torch.tensor([ids])}
        selection = hf.select_tokens(hf.prefill(model, inputs, config), config)
        keep = selection.keep[0]
        assert keep[..., : config.sink].all(), "every head keeps the sinks"
        assert torch.equal(keep, engine["keep"]), (rid, int((keep != engine["keep"]).sum()))
