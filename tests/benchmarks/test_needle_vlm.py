"""The trained needle checkpoint (``benchmarks/models/needle-vl``): its weights are real, and SGLang serves it.

1. The HF path with the full cache answers a fixed subset of the model card's held-out prompts at least as well as
   the card states, less :data:`MARGIN`.
2. A real SGLang server (``--kv-policy full``, CPU) gives the same greedy replies as the HF path to prompts sent
   through ``/v1/chat/completions`` as ``NeedleSample.openai_content()``, and sees prompts of the same length.
3. The training script's batches: deterministic, the stage's mix, answers where the loss reads them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks import train_needle_vlm as needle_vlm
from benchmarks.needles import TASKS, NeedleSample, is_correct, prompt_inputs
from madakv_sglang.server_process import Server

MODEL_DIR = needle_vlm.DEFAULT_OUT
# Four prompts per task: seed 0 of the corner cells (24 or 72 sentences x 2 or 6 images) of the card's
# evaluation grid, so the shortest and the longest prompts it was scored on, both ways of mixing.
SUBSET = {"per_cell": 1, "sentences": (24, 72), "images": (2, 6)}
# One prompt in four: on 4 prompts a task's accuracy moves in steps of 0.25, and a card at 0.95 may still miss one.
MARGIN = 0.25
SERVED = 4  # prompts sent to SGLang, one per task


@pytest.fixture(scope="module")
def checkpoint() -> tuple[Any, Any]:
    assert (MODEL_DIR / "model.safetensors").is_file(), f"no checkpoint in {MODEL_DIR}: run the training script"
    return needle_vlm.load(MODEL_DIR)


@pytest.fixture(scope="module")
def samples() -> list[NeedleSample]:
    return needle_vlm.eval_samples(SUBSET["per_cell"], sentences=SUBSET["sentences"], images=SUBSET["images"])


@pytest.fixture(scope="module")
def hf_replies(checkpoint: tuple[Any, Any], samples: list[NeedleSample]) -> list[str]:
    model, processor = checkpoint
    return [needle_vlm.answer(model, processor, sample) for sample in samples]


def test_subset_is_held_out_and_matches_the_card_grid(samples: list[NeedleSample]) -> None:
    assert len(samples) == 4 * len(TASKS)
    assert all(s.meta["seed"] < needle_vlm.TRAIN_SEED_BASE for s in samples)
    card_prompts = {(s.config, s.meta["seed"]) for s in needle_vlm.eval_samples()}
    assert {(s.config, s.meta["seed"]) for s in samples} <= card_prompts


def test_full_cache_accuracy_reaches_the_model_card(samples: list[NeedleSample], hf_replies: list[str]) -> None:
    stated = json.loads((MODEL_DIR / needle_vlm.METRICS_FILE).read_text())["eval"]["accuracy"]
    hits: dict[str, list[bool]] = defaultdict(list)
    for sample, reply in zip(samples, hf_replies, strict=True):
        hits[sample.config.task].append(is_correct(reply, sample.answer))
    reached = {task: sum(v) / len(v) for task, v in hits.items()}
    for task in TASKS:
        assert reached[task] >= stated[task] - MARGIN, (task, reached, stated, hf_replies)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("needle-vl") / "server.log"
    with Server(MODEL_DIR, ["--kv-policy", "full", "--max-total-tokens", "8192"], log) as running:
        yield running


def _served(samples: list[NeedleSample]) -> list[int]:
    """One prompt per task, each from another cell of the subset, so every kind of needle and the shortest and
    longest prompts cross the server."""
    cells = len(SUBSET["sentences"]) * len(SUBSET["images"])
    per_task = len(samples) // len(TASKS)
    return [task * per_task + task % cells for task in range(len(TASKS))][:SERVED]


def test_sglang_serves_the_hf_answers(
    server: Server, checkpoint: tuple[Any, Any], samples: list[NeedleSample], hf_replies: list[str]
) -> None:
    _, processor = checkpoint
    for index in _served(samples):
        sample = samples[index]
        chat = server.post(
            "/v1/chat/completions",
            {
                "model": "needle-vl",
                "temperature": 0,
                "max_tokens": 8,
                "messages": [{"role": "user", "content": sample.openai_content()}],
            },
        )
        reply = chat["choices"][0]["message"]["content"]
        prompt_len = prompt_inputs(processor, sample)["input_ids"].shape[1]
        assert chat["usage"]["prompt_tokens"] == prompt_len, sample.config  # the same rendering on both sides
        assert reply == hf_replies[index], (sample.config, sample.answer, reply, hf_replies[index])


def test_training_batches_are_deterministic_and_hold_the_stage_mix() -> None:
    stage = needle_vlm.Stage(steps=1, sentences=(3, 6), images=(1, 2), mix=(2, 1, 2, 1))
    batch = needle_vlm.stage_batch(stage, 0, 5, seed=0)
    again = needle_vlm.stage_batch(stage, 0, 5, seed=0)
    assert [(s.config, s.answer) for s in batch] == [(s.config, s.answer) for s in again]
    assert [s.config.task for s in batch] == ["text", "text", "image", "mixed", "mixed", "absent"]
    assert len({(s.config.sentences, s.config.images) for s in batch}) == 1  # one haystack size per batch
    assert 3 <= batch[0].config.sentences <= 6 and 1 <= batch[0].config.images <= 2
    assert all(s.meta["seed"] >= needle_vlm.TRAIN_SEED_BASE for s in batch)  # never an evaluation prompt
    other_step = needle_vlm.stage_batch(stage, 0, 6, seed=0)
    assert not {s.meta["seed"] for s in batch} & {s.meta["seed"] for s in other_step}


def test_training_batch_puts_each_answer_at_the_end_of_its_row() -> None:
    processor = needle_vlm.build_processor()
    stage = needle_vlm.Stage(steps=1, sentences=(2, 4), images=(1, 1))
    samples = needle_vlm.stage_batch(stage, 0, 0, seed=0)
    inputs, spans = needle_vlm.training_batch(processor, samples)
    for row, ((start, end), sample) in enumerate(zip(spans, samples, strict=True)):
        assert int(inputs["attention_mask"][row].sum()) == end
        decoded = processor.tokenizer.decode(inputs["input_ids"][row, start:end])
        assert decoded == sample.answer + "<|im_end|>", (decoded, sample.answer)
