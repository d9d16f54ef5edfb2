"""Train the needle suite's tiny Qwen2-VL from scratch on CPU, so accuracy-vs-budget runs measure something real.

    python -m benchmarks.train_needle_vlm --out benchmarks/models/needle-vl

A :class:`~transformers.Qwen2VLForConditionalGeneration` (the architecture of ``madakv_sglang.checkpoints``, a
little larger: text hidden 128, 4 layers, 4 query / 2 KV heads; a 2-block vision tower) learns the four tasks of
``benchmarks/needles`` (text, image, mixed, absent). Every training prompt is rendered exactly as serving renders
it: the checkpoint's chat template over one user message (text and images interleaved, then the question), the
processor's image tokens (a 224x224 image is 64 tokens), and the assistant's answer, one word then
``<|im_end|>``. The loss is the cross-entropy of the answer tokens only (``<|im_end|>`` included), averaged per
sample, so the four tasks weigh the same whatever their answers' lengths.

The curriculum grows the haystack in three stages (:data:`STAGES`); every batch holds one haystack size and an
equal share of each task, drawn from seeds ``TRAIN_SEED_BASE + i``. The held-out evaluation (:func:`eval_samples`)
uses seeds ``0 .. per_cell - 1``, below every training seed, so no evaluation prompt was trained on. It runs the
project's HF path with the full cache (``madakv_sglang.hf.generate``, policy ``full``) and scores with the suite's
``is_correct``.

The checkpoint is written by ``save_pretrained`` plus the helpers of ``madakv_sglang.checkpoints`` (its tokenizer,
processor and config patches), so SGLang serves it like the other tiny checkpoints; ``README.md`` beside the
weights is the model card, written from the run's own numbers.

Reproducibility: the weights start from ``torch.manual_seed(seed)`` and every batch is a function of the seed and
the step, so the same seed and thread count replay the same run. CPU kernels may sum in another order on other
hardware or thread counts, so the weights are equal to float rounding, not bitwise; the accuracy is what is
expected to repeat.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.needles import TASKS, NeedleConfig, NeedleSample, is_correct, make_sample, prompt_inputs, prompt_text
from madakv_sglang import checkpoints, tiny_models
from madakv_sglang.checkpoints import ENDOFTEXT, IM_END
from madakv_sglang.tiny_models import IMAGE_TOKEN, VOCAB

if TYPE_CHECKING:
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

DEFAULT_OUT = Path(__file__).resolve().parent / "models" / "needle-vl"
METRICS_FILE = "training.json"  # the run's numbers, beside the weights; the model card is written from them
TRAIN_SEED_BASE = 1_000_000  # training samples use seeds >= this; held-out evaluation seeds are below it

# Text decoder: hidden 128, 4 layers, 4 query heads / 2 KV heads of 32 dims (GQA, G = 2).
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": checkpoints.MAX_POSITIONS,
    "bos_token_id": None,
    "eos_token_id": IM_END,
    "pad_token_id": ENDOFTEXT,
    # M-RoPE splits the head's 16 frequency pairs over (time, height, width); the sections must sum to head_dim / 2.
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
}
# Vision tower: 14-px patches embedded to 64 dims, 2 blocks, then the 2x2 merge into the text width.
VISION_CONFIG: dict[str, Any] = {
    "depth": 2,
    "embed_dim": 64,
    "hidden_size": 128,
    "num_heads": 2,
    "mlp_ratio": 2,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: ``steps`` batches, each of one haystack size drawn uniformly from the ranges.

    Attributes:
        sentences / images: inclusive (low, high) ranges of the haystack's filler sentences and images.
        mix: prompts of each task per batch, in the order of ``TASKS`` (text, image, mixed, absent).
    """

    steps: int
    sentences: tuple[int, int]
    images: tuple[int, int]
    mix: tuple[int, int, int, int] = (2, 2, 2, 2)

    def __post_init__(self) -> None:
        if self.steps < 0 or len(self.mix) != len(TASKS) or min(self.mix) < 1 or sum(self.mix) > 64:
            raise ValueError(f"a stage needs steps >= 0 and 1..64 prompts per batch, at least one of each of {TASKS}")
        if not 1 <= self.sentences[0] <= self.sentences[1] or not 1 <= self.images[0] <= self.images[1]:
            raise ValueError(f"bad ranges: sentences {self.sentences}, images {self.images} (both start at >= 1)")

    @property
    def batch(self) -> int:
        return sum(self.mix)


# Short haystacks first: the retrieval heads form cheaply at ~100-300 tokens, then the haystack grows past the
# evaluated sizes (up to ~1.3k tokens) so that positions and distractors of the evaluation have been seen.
STAGES: tuple[Stage, ...] = (
    Stage(steps=1400, sentences=(2, 12), images=(1, 2), mix=(3, 1, 3, 1)),
    Stage(steps=1000, sentences=(8, 40), images=(1, 4), mix=(3, 1, 3, 1)),
    Stage(steps=1400, sentences=(16, 84), images=(1, 6), mix=(3, 1, 3, 1)),
)


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule. AdamW, linear warm-up, cosine decay to ``final_lr_ratio * lr`` over all stages."""

    seed: int = 0
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    final_lr_ratio: float = 0.05
    clip: float = 1.0
    threads: int = 1
    stages: tuple[Stage, ...] = STAGES

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup < 0 or not 0 <= self.final_lr_ratio <= 1 or self.threads < 1:
            raise ValueError(f"invalid training config: {self}")

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.lr, self.warmup, self.final_lr_ratio)


def warmup_cosine(step: int, total_steps: int, peak: float, warmup: int, final_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``peak`` to ``final_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------------------------
# The held-out evaluation set
# ---------------------------------------------------------------------------------------------------------------

EVAL_SENTENCES = (24, 48, 72)
EVAL_IMAGES = (2, 4, 6)
EVAL_PER_CELL = 4  # 3 x 3 cells x 4 = 36 prompts per task, 144 in all


def eval_samples(
    per_cell: int = EVAL_PER_CELL,
    tasks: tuple[str, ...] = TASKS,
    sentences: tuple[int, ...] = EVAL_SENTENCES,
    images: tuple[int, ...] = EVAL_IMAGES,
) -> list[NeedleSample]:
    """The held-out prompts: every task x sentences x images cell, seeds ``0 .. per_cell - 1`` (never trained on,
    training seeds start at :data:`TRAIN_SEED_BASE`), each at its own depth drawn uniformly in [0, 1]."""
    if per_cell > TRAIN_SEED_BASE:
        raise ValueError("evaluation seeds would overlap the training seeds")
    out = []
    for task in tasks:
        for n_sentences in sentences:
            for n_images in images:
                for seed in range(per_cell):
                    depth = round(random.Random(f"needle-vl eval|{task}|{n_sentences}|{n_images}|{seed}").random(), 3)
                    config = NeedleConfig(task, n_sentences, n_images, depth)  # type: ignore[arg-type]
                    out.append(make_sample(config, seed))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Model, processor, prompts
# ---------------------------------------------------------------------------------------------------------------


def build_model(seed: int) -> Qwen2VLForConditionalGeneration:
    """A freshly initialised model (transformers' own init, drawn after ``torch.manual_seed(seed)``)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, **tiny_models.qwen_vl_ids())
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).float()


def build_processor() -> Qwen2VLProcessor:
    """The checkpoint's processor: ``checkpoints``' byte-level BPE tokenizer, image size limits and chat template."""
    return checkpoints.build_processor("qwen2_vl")


def answer_ids(processor: Qwen2VLProcessor, answer: str) -> list[int]:
    """The assistant turn's tokens: the word (no leading space: it follows ``assistant\\n``) then ``<|im_end|>``
    (whichever id the processor's tokenizer gives it)."""
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [*processor.tokenizer.encode(answer, add_special_tokens=False), im_end]


def reply(sample: NeedleSample) -> str:
    """The assistant turn a sample trains on: ``meta["reply"]`` where the suite writes one (smol-vl's sentences),
    else the answer itself (the needle suite's one-word replies)."""
    return str(sample.meta.get("reply", sample.answer))


def training_batch(
    processor: Qwen2VLProcessor, samples: list[NeedleSample]
) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """Prompts plus answers, right-padded (a real token never sees a pad: positions match the unpadded prompt).

    Returns the model inputs and, per row, the ``(start, end)`` token span of its :func:`reply` (``<|im_end|>``
    included).
    """
    texts = [prompt_text(processor, s) + reply(s) + "<|im_end|>" for s in samples]
    images = [image for s in samples for image in s.images]
    inputs = dict(processor(text=texts, images=images or None, return_tensors="pt", padding=True))
    spans = []
    for row, sample in enumerate(samples):
        end = int(inputs["attention_mask"][row].sum())
        target = answer_ids(processor, reply(sample))
        start = end - len(target)
        if inputs["input_ids"][row, start:end].tolist() != target:  # the reply must tokenize on its own
            raise RuntimeError(f"reply {reply(sample)!r} does not end row {row} as {target}")
        spans.append((start, end))
    return inputs, spans


def answer_losses(
    logits: torch.Tensor, input_ids: torch.Tensor, spans: list[tuple[int, int]]
) -> tuple[list[torch.Tensor], list[bool]]:
    """Per row, the mean cross-entropy of its answer span and whether every answer token is the argmax
    (teacher-forced exact match)."""
    losses, exact = [], []
    for row, (start, end) in enumerate(spans):
        target = input_ids[row, start:end]
        predicted = logits[row, start - 1 : end - 1].float()  # position t predicts token t + 1
        losses.append(torch.nn.functional.cross_entropy(predicted, target))
        exact.append(bool((predicted.argmax(-1) == target).all()))
    return losses, exact


def stage_batch(stage: Stage, stage_index: int, step: int, seed: int) -> list[NeedleSample]:
    """The prompts of global ``step``: one haystack size, ``stage.mix`` prompts of each task, uniform depths."""
    rng = random.Random(f"needle-vl train|{seed}|{stage_index}|{step}")
    n_sentences, n_images = rng.randint(*stage.sentences), rng.randint(*stage.images)
    base = TRAIN_SEED_BASE + step * 64  # room for batches of up to 64 prompts: seeds never repeat across steps
    out: list[NeedleSample] = []
    for task, count in zip(TASKS, stage.mix, strict=True):
        for _ in range(count):
            config = NeedleConfig(task, n_sentences, n_images, rng.random())  # type: ignore[arg-type]
            out.append(make_sample(config, base + len(out)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def train(
    model: Qwen2VLForConditionalGeneration, processor: Qwen2VLProcessor, cfg: TrainConfig, log_every: int = 25
) -> dict[str, Any]:
    """Run every stage; returns the wall time and, per stage, the last log window's loss and accuracy per task.

    The accuracy logged is teacher-forced on the training batch (every answer token is the argmax), which equals
    greedy exact match on these fresh prompts; it is a progress signal, not the reported evaluation.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    model.train()
    started = time.monotonic()
    history: list[dict[str, Any]] = []
    step = 0
    for stage_index, stage in enumerate(cfg.stages):
        window: dict[str, list[tuple[float, bool]]] = defaultdict(list)
        for _ in range(stage.steps):
            samples = stage_batch(stage, stage_index, step, cfg.seed)
            inputs, spans = training_batch(processor, samples)
            losses, exact = answer_losses(model(**inputs).logits, inputs["input_ids"], spans)
            for sample, row_loss, row_exact in zip(samples, losses, exact, strict=True):
                window[sample.config.task].append((float(row_loss.detach()), row_exact))
            loss = torch.stack(losses).mean()
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            step += 1
            if step % log_every == 0 or step == cfg.total_steps:
                summary = {
                    task: (sum(l for l, _ in v) / len(v), sum(a for _, a in v) / len(v))
                    for task, v in sorted(window.items())
                }
                print(
                    f"step {step}/{cfg.total_steps} stage {stage_index} S{len(inputs['input_ids'][0])} "
                    f"lr {cfg.lr_at(step - 1):.2e} {time.monotonic() - started:.0f}s  "
                    + "  ".join(f"{t} {l:.3f}/{a:.2f}" for t, (l, a) in summary.items()),
                    flush=True,
                )
                record = {
                    "step": step,
                    "stage": stage_index,
                    "elapsed_s": round(time.monotonic() - started, 1),
                    **{t: {"loss": round(l, 4), "teacher_forced_acc": round(a, 3)} for t, (l, a) in summary.items()},
                }
                history.append(record)
                window.clear()
    model.eval()
    return {
        "train_s": round(time.monotonic() - started, 1),
        "steps": step,
        "history": history,
        "samples": sum(s.steps * s.batch for s in cfg.stages),
    }


# ---------------------------------------------------------------------------------------------------------------
# Evaluation with the project's HF path, full cache
# ---------------------------------------------------------------------------------------------------------------


def answer(
    model: Qwen2VLForConditionalGeneration, processor: Qwen2VLProcessor, sample: NeedleSample, max_new_tokens: int = 8
) -> str:
    """Greedy reply through ``madakv_sglang.hf.generate`` with policy ``full`` (nothing evicted), up to the
    processor's ``<|im_end|>``."""
    from madakv_sglang import hf
    from madakv_sglang.config import PolicyConfig

    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    result = hf.generate(
        model, prompt_inputs(processor, sample), PolicyConfig(policy="full"), max_new_tokens, eos_token_id=eos
    )
    return str(processor.tokenizer.decode(result.tokens, skip_special_tokens=True))


def evaluate(
    model: Qwen2VLForConditionalGeneration, processor: Qwen2VLProcessor, samples: list[NeedleSample]
) -> dict[str, Any]:
    """Accuracy per task (the suite's ``is_correct``) and per (task, sentences, images) cell."""
    hits: dict[str, list[bool]] = defaultdict(list)
    cells: dict[str, list[bool]] = defaultdict(list)
    for sample in samples:
        ok = is_correct(answer(model, processor, sample), sample.answer)
        config = sample.config
        hits[config.task].append(ok)
        cells[f"{config.task} s{config.sentences} i{config.images}"].append(ok)
    return {
        "accuracy": {task: round(sum(v) / len(v), 4) for task, v in hits.items()},
        "count": {task: len(v) for task, v in hits.items()},
        "cells": {cell: round(sum(v) / len(v), 4) for cell, v in cells.items()},
    }


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint and model card
# ---------------------------------------------------------------------------------------------------------------


def save(model: Qwen2VLForConditionalGeneration, out_dir: Path) -> None:
    """Weights, config (with ``checkpoints``' patches for SGLang), generation config, tokenizer and processor."""
    checkpoints.save_model(model, out_dir, "qwen2_vl")


def load(out_dir: Path) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """The saved model (fp32, eval mode, SDPA) and its processor."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoProcessor.from_pretrained(out_dir)


def write_card(out_dir: Path, metrics: dict[str, Any]) -> None:
    """``README.md``: what the model was trained on, for how long, its held-out accuracy, and its limits."""
    train_cfg, run, ev = metrics["train_config"], metrics["run"], metrics["eval"]
    weights_mb = (out_dir / "model.safetensors").stat().st_size / 1e6
    stages = "\n".join(
        f"| {i} | {s['steps']} | {' / '.join(map(str, s['mix']))} | {s['sentences'][0]}-{s['sentences'][1]} | "
        f"{s['images'][0]}-{s['images'][1]} |"
        for i, s in enumerate(train_cfg["stages"])
    )
    accuracy = "\n".join(f"| {task} | {ev['accuracy'][task]:.3f} | {ev['count'][task]} |" for task in TASKS)
    cell_rows = []
    for n_sentences in metrics["eval_grid"]["sentences"]:
        for n_images in metrics["eval_grid"]["images"]:
            row = " | ".join(f"{ev['cells'][f'{t} s{n_sentences} i{n_images}']:.2f}" for t in TASKS)
            cell_rows.append(f"| {n_sentences} | {n_images} | {row} |")
    lengths = metrics["eval_prompt_tokens"]
    card = f"""# needle-vl: a tiny Qwen2-VL trained on the multimodal needle suite

A `Qwen2VLForConditionalGeneration` trained from scratch, on CPU, by

    python -m benchmarks.train_needle_vlm --out benchmarks/models/needle-vl --seed {train_cfg["seed"]}

so that accuracy-vs-KV-budget runs of MadaKV and the baselines measure retrieval that really happens. It is
**tiny and synthetic, not a real VLM**: it knows the four tasks of `benchmarks/needles` and nothing else.

## Model

- Text decoder: vocab 512, hidden 128, 4 layers, 4 query / 2 KV heads of 32 dims (GQA, G = 2), MLP 512,
  M-RoPE sections [4, 6, 6]. Vision tower: 14-px patches, embed 64, 2 blocks of 2 heads, 2x2 merge into 128.
- {metrics["parameters"]:,} parameters, fp32, `model.safetensors` {weights_mb:.1f} MB.
- Tokenizer, processor and chat template: those of `madakv_sglang.checkpoints` (byte-level BPE with Qwen's special
  tokens; a 224x224 image is 64 tokens; Qwen2-VL's chat template with its default system prompt).

## Training

- Data: prompts of `benchmarks/needles` (`make_sample(NeedleConfig(task, sentences, images, depth), seed)`),
  drawn fresh every step from seeds >= {TRAIN_SEED_BASE:,}; each batch has one haystack size and the stage's mix of
  the tasks (table below), at depths uniform in [0, 1]. {run["samples"]:,} prompts in all.
- Rendering: exactly as served: the chat template over one user message (text and images interleaved, then
  `"\\n" + question`, as `NeedleSample.openai_content()` sends it), the processor's image tokens, then the
  assistant's answer (one word, two for mixed) and `<|im_end|>`. Loss: cross-entropy on the answer tokens only
  (`<|im_end|>` included), mean per prompt, mean over the batch.
- Curriculum (haystack sizes drawn uniformly per batch):

| stage | steps | prompts per batch (text / image / mixed / absent) | sentences | images |
|---|---|---|---|---|
{stages}

- AdamW (betas 0.9 / 0.98, weight decay {train_cfg["weight_decay"]}), peak lr {train_cfg["lr"]}, {train_cfg["warmup"]}
  warm-up steps, cosine to {train_cfg["final_lr_ratio"]} x peak; gradient clip {train_cfg["clip"]}; seed
  {train_cfg["seed"]}; torch threads: {train_cfg["threads"]}.
- Wall time: {run["train_s"] / 60:.1f} min of training ({run["total_s"] / 60:.1f} min with evaluation and saving) on
  {metrics["machine"]}, shared with other jobs (so times vary from run to run).

## Held-out accuracy, full cache

{ev_count_sentence(ev)} prompts per task: sentences {metrics["eval_grid"]["sentences"]} x images
{metrics["eval_grid"]["images"]}, {metrics["eval_grid"]["per_cell"]} seeds per cell
(seeds 0..{metrics["eval_grid"]["per_cell"] - 1}, disjoint from training), depth uniform in [0, 1]
(`benchmarks.train_needle_vlm.eval_samples()`); prompts are
{lengths["min"]}-{lengths["max"]} tokens (mean {lengths["mean"]:.0f}), {lengths["visual_share"]:.0%} of them image
tokens on average. Greedy replies from `madakv_sglang.hf.generate` with policy `full`, scored by the suite's
`is_correct`.

| task | accuracy | prompts |
|---|---|---|
{accuracy}

Per cell (accuracy, tasks in the order {" / ".join(TASKS)}):

| sentences | images | {" | ".join(TASKS)} |
|---|---|{"---|" * len(TASKS)}
{chr(10).join(cell_rows)}

`tests/benchmarks/test_needle_vlm.py` checks these weights against this table (a small subset of the same
prompts) and that SGLang serves the same greedy answers as the HF path.

## What it can and cannot show

- Can: whether a KV-cache policy keeps what a retrieval needs. The answers depend on one sentence (text), on a
  few image tokens of one image (image), or on both at once (mixed: the key from the text and the shape's colour
  from an image, both in one answer), and `absent` catches a model (or a policy) that names a key when none is
  there. Because the full cache scores near the ceiling, a drop under eviction is the policy's doing.
- Cannot: two-hop reasoning across modalities. A first version of the mixed task asked for the meaning of the
  shape's colour ("Red means apple. Blue means river. ..." in the text); models of this size trained for up to
  2,500 steps stayed at chance (1 in 4) on it while they solved the other tasks, so the suite asks for both
  needles instead.
- Cannot: stand in for a real VLM. The model is ~1.4M parameters, its vocabulary is a 512-token byte-level BPE, it
  has seen only these filler sentences, four colours, three shapes and sixteen key words, and prompts of at most
  ~1.3k tokens. Its attention patterns are those of a small model trained on one synthetic task family, so
  budgets at which it breaks say little about the budgets at which Qwen2-VL-7B breaks; it says nothing about
  perception, reasoning or language quality, and lengths beyond the trained ones are out of distribution.

## Reproducing

The run is a function of `--seed` (weights from `torch.manual_seed`, batches from the seed and the step). On the
same machine and thread count it replays the same updates; elsewhere CPU kernels may sum in another order, so
the weights agree to float rounding rather than bitwise, and the accuracy, not the bytes, is what repeats.
`training.json` holds the config, the loss log and these numbers.
"""
    (out_dir / "README.md").write_text(card)


def ev_count_sentence(ev: dict[str, Any]) -> str:
    counts = set(ev["count"].values())
    return str(counts.pop()) if len(counts) == 1 else str(ev["count"])


def prompt_stats(processor: Qwen2VLProcessor, samples: list[NeedleSample]) -> dict[str, float]:
    lengths, visual = [], []
    for sample in samples:
        ids = prompt_inputs(processor, sample)["input_ids"][0]
        lengths.append(len(ids))
        visual.append(float((ids == IMAGE_TOKEN).float().mean()))
    return {
        "min": min(lengths),
        "max": max(lengths),
        "mean": sum(lengths) / len(lengths),
        "visual_share": sum(visual) / len(visual),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_needle_vlm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint dir (created if missing)")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="multiply every stage's steps (e.g. 0.1 for a smoke run; the card records it)",
    )
    parser.add_argument("--eval-per-cell", type=int, default=EVAL_PER_CELL)
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate the checkpoint in --out and rewrite its card from training.json",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    samples = eval_samples(args.eval_per_cell)
    grid = {"sentences": list(EVAL_SENTENCES), "images": list(EVAL_IMAGES), "per_cell": args.eval_per_cell}
    if args.eval_only:
        metrics = json.loads((args.out / METRICS_FILE).read_text())
        model, processor = load(args.out)
    else:
        stages = tuple(Stage(max(1, round(s.steps * args.steps_scale)), s.sentences, s.images, s.mix) for s in STAGES)
        cfg = TrainConfig(seed=args.seed, threads=args.threads, stages=stages)
        processor = build_processor()
        model = build_model(cfg.seed)
        metrics = {
            "train_config": asdict(cfg),
            "parameters": sum(p.numel() for p in model.parameters()),
            "machine": f"{platform.machine()} CPU, {args.threads} torch threads, torch {torch.__version__}",
        }
        metrics["run"] = train(model, processor, cfg)
        save(model, args.out)
        model, processor = load(args.out)  # evaluate what was written, as a user will load it
    eval_started = time.monotonic()
    metrics["eval"] = evaluate(model, processor, samples)
    metrics["eval"]["eval_s"] = round(time.monotonic() - eval_started, 1)
    metrics["eval_grid"] = grid
    metrics["eval_prompt_tokens"] = prompt_stats(processor, samples)
    if not args.eval_only:
        metrics["run"]["total_s"] = round(time.monotonic() - started, 1)
    (args.out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    write_card(args.out, metrics)
    print(json.dumps({"accuracy": metrics["eval"]["accuracy"], "train_s": metrics["run"]["train_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
