"""Train smol-vl's vision side (patch embedding, vision blocks, merger) with SmolLM2's language model frozen.

    python -m benchmarks.train_smol_vl --out benchmarks/models/smol-vl-vision

The model is ``benchmarks.build_smol_vl``'s: SmolLM2-135M-Instruct as the language model of a Qwen2-VL, with a
vision side drawn from ``--seed``. Only ``model.visual.*`` is updated; every language-model weight (embeddings,
decoder, head) stays SmolLM2's, so whatever the model does with text, retrieval over long contexts included, is a
real pretrained LM's. The vision side learns to turn an image into 64 embeddings that SmolLM2 reads as what the
image shows.

Data: the prompts of ``benchmarks.needles.smol`` (colour, shape, digit, count, which image, the text key among
distractor images, the colour-to-fact lookup, and the absent control), rendered as served (the chat template over
one user message, the processor's image tokens) with the assistant's reply and ``<|im_end|>``. The reply is a
short sentence in SmolLM2's own manner that names the answer ("The shape is red.", ``smol.REPLIES``); the loss is
the cross-entropy of the reply tokens only, averaged per prompt. A first run trained one-word replies ("red"),
which SmolLM2 never gives by itself (asked for one word it starts "The color of the shape in the images is"): after
180 steps it named colours at 0.40 (teacher-forced) and digits at chance; a second one with these replies was
not faster (colours 0.35 after 160 steps). Every step through SmolLM2 costs ~0.5 s per prompt here, and a
random vision side gives SmolLM2 tokens it ignores, so little gradient reaches it. Hence a warm start
(:func:`warm_start`) first, without the language model: the vision side learns to emit SmolLM2's input embedding
of the object's colour word on the tokens that show the object and of the word for what it is ("circle", "7",
"three", "nothing") on the others, which SmolLM2 reads as words. (Two other targets were tried: one mean caption
embedding on all 64 tokens, which SmolLM2 did not read as words, and the caption sentence token by token, which
the vision side could not learn: its 2-D RoPE is relative, so it cannot tell token 0 from token 5.) The
curriculum (:data:`STAGES`) then starts from one image and a few sentences and grows to several images among
more text.

``--curriculum long --init FILE`` trains given weights further (:data:`LONG_STAGES`): the colour needle in one of
6-16 images among prose (:mod:`benchmarks.needles.prose`), where the first curriculum's weights fail (a reply
such as "The shape in the images is a square"), then a short refresh on every task. The committed weights are the
first curriculum followed by this one. It bought the colour needle at 1.2k tokens and cost the text key among
distractor images (0.83 to 0.12 held out): the images seem to draw SmolLM2 away from the text (model card).

Training seeds start at ``TRAIN_SEED_BASE``; the held-out evaluation uses seeds below it. Besides the card's
short prompts, :func:`long_eval_samples` measures the long contexts among prose.

Writes ``vision.safetensors`` (the trained ``model.visual.*`` tensors, fp32), ``training.json`` (config, loss
log, held-out accuracy) and ``README.md`` (the model card) into ``--out``. ``build_smol_vl --vision`` assembles
the servable checkpoint from them.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from benchmarks import build_smol_vl
from benchmarks.needles import is_correct
from benchmarks.needles.images import COLOURS, SHAPES, background, draw_shape
from benchmarks.needles.smol import MAX_COUNT, SMOL_TASKS, SmolConfig, draw_count, draw_digit, make_smol_sample
from benchmarks.needles.suite import NeedleSample
from benchmarks.train_needle_vlm import TRAIN_SEED_BASE, answer, answer_losses, training_batch, warmup_cosine
from madakv_sglang import checkpoints

if TYPE_CHECKING:
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

DEFAULT_OUT = Path(__file__).resolve().parent / "models" / "smol-vl-vision"
VISION_FILE = "vision.safetensors"
METRICS_FILE = "training.json"
VISION_PREFIX = "model.visual."


@dataclass(frozen=True)
class SmolStage:
    """``steps`` batches, each of one haystack size drawn uniformly from the inclusive ranges, with ``mix[task]``
    prompts of each task, among ``haystack`` sentences (``smol.HAYSTACKS``)."""

    steps: int
    sentences: tuple[int, int]
    images: tuple[int, int]
    mix: dict[str, int]
    haystack: str = "filler"

    def __post_init__(self) -> None:
        if self.steps < 0 or set(self.mix) - set(SMOL_TASKS) or min(self.mix.values()) < 1:
            raise ValueError(f"bad stage: {self}")
        if not 0 <= self.sentences[0] <= self.sentences[1] or not 1 <= self.images[0] <= self.images[1]:
            raise ValueError(f"bad ranges: sentences {self.sentences}, images {self.images}")

    @property
    def batch(self) -> int:
        return sum(self.mix.values())


_PERCEPTION = {"colour": 1, "shape": 1, "digit": 2, "count": 2, "lookup": 1, "absent": 1}
_ALL = dict.fromkeys(SMOL_TASKS, 1)
STAGES: tuple[SmolStage, ...] = (
    SmolStage(steps=60, sentences=(0, 4), images=(1, 1), mix=_PERCEPTION),
    SmolStage(steps=130, sentences=(2, 16), images=(1, 4), mix=_ALL),
    SmolStage(steps=30, sentences=(8, 30), images=(4, 8), mix=_ALL),
)
# ``--curriculum long``, a continuation (``--init``) for the long contexts: the colour needle in one of 6-16 images
# among 16-48 prose sentences (0.6k-1.7k tokens; a prompt costs ~6 s per step there), then a short refresh on
# every task at the first curriculum's sizes, so the short-context tasks are not forgotten.
LONG_STAGES: tuple[SmolStage, ...] = (
    SmolStage(steps=48, sentences=(16, 48), images=(6, 16), mix={"colour": 4}, haystack="prose"),
    SmolStage(steps=16, sentences=(2, 16), images=(1, 6), mix=_ALL),
)
CURRICULA = {"base": STAGES, "long": LONG_STAGES}


@dataclass(frozen=True)
class SmolTrainConfig:
    """AdamW on the vision side only; linear warm-up, cosine decay to ``final_lr_ratio * lr``."""

    seed: int = 0
    lr: float = 1.5e-3
    weight_decay: float = 0.01
    warmup: int = 40
    final_lr_ratio: float = 0.05
    clip: float = 1.0
    threads: int = 2
    warm_steps: int = 250  # vision-only steps of :func:`warm_start` before the curriculum
    warm_batch: int = 32
    resumed_warmup: int = 5  # warm-up steps of a continuation (``--init``): its weights are trained already
    bf16: bool = True  # autocast the forward to bfloat16: 1.9x faster here (AMX), same loss to 3 digits
    stages: tuple[SmolStage, ...] = field(default=STAGES)

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)


# ---------------------------------------------------------------------------------------------------------------
# Warm start: image tokens that read as a caption, without running the language model
# ---------------------------------------------------------------------------------------------------------------


NUMBER_WORDS = ("zero", "one", "two", "three", "four")
_MERGED = 28  # pixels per side of one merged image token (2 x 2 patches of 14)
_OBJECT_SHARE = 0.1  # a token "shows the object" when this share of its pixels has the object's colour


def captioned_image(rng: random.Random) -> tuple[Image.Image, str | None, str]:
    """One image of the tasks' kinds (nothing, a shape, a digit, 1-4 shapes): the image, the colour of what it
    shows (None for nothing), and the word for what it shows ("circle", "7", "three", or "nothing")."""
    image = background(rng)
    kind = rng.choice(("nothing", "shape", "digit", "count"))
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    if kind == "shape":
        return draw_shape(image, shape, colour, rng), colour, f" {shape}"
    if kind == "digit":
        digit = rng.randrange(10)
        return draw_digit(image, digit, colour, rng), colour, str(digit)
    if kind == "count":
        count = rng.randint(1, MAX_COUNT)
        return draw_count(image, count, shape, colour, rng), colour, f" {NUMBER_WORDS[count]}"
    return image, None, " nothing"


def caption_targets(
    table: torch.Tensor, tokenizer: Any, image: Image.Image, colour: str | None, word: str
) -> torch.Tensor:
    """``[tokens, hidden]``, one row per merged image token in the processor's raster order: the input embedding
    of the colour word where the token shows the object, of ``word`` elsewhere. SmolLM2 then reads a red circle
    as "circle circle red red circle ...": both words, with no position to learn (which the vision side's
    relative 2-D RoPE cannot give: a warm start towards a caption sentence, token by token, stalled at a loss of
    0.51)."""
    pixels = torch.from_numpy(np.asarray(image).copy())
    side = pixels.shape[0] // _MERGED
    word_id = tokenizer.encode(word, add_special_tokens=False)[0]
    ids = torch.full((side * side,), word_id)
    if colour is not None:
        mask = (pixels == torch.tensor(COLOURS[colour], dtype=torch.uint8)).all(-1).float()
        share = mask.reshape(side, _MERGED, side, _MERGED).mean((1, 3)).flatten()
        ids[share >= _OBJECT_SHARE] = tokenizer.encode(f" {colour}", add_special_tokens=False)[0]
    return table[ids]


def warm_start(
    model: Qwen2VLForConditionalGeneration, processor: Qwen2VLProcessor, cfg: SmolTrainConfig
) -> dict[str, Any]:
    """Train the vision side alone to emit the input embeddings of :func:`caption_targets`, so that SmolLM2 reads
    an image as words from the first step through it on. A mean-squared error in the embedding space, scaled by
    the embeddings' mean square; the language model is not run, so a step costs the vision side only."""
    params = freeze_language_model(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    table = model.get_input_embeddings().weight.detach()
    scale = table.pow(2).sum(-1).mean()
    started, history = time.monotonic(), []
    model.train()
    for step in range(cfg.warm_steps):
        rng = random.Random(f"smol-vl warm|{cfg.seed}|{step}")
        drawn = [captioned_image(rng) for _ in range(cfg.warm_batch)]
        vision = processor.image_processor(images=[item[0] for item in drawn], return_tensors="pt")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            tokens = model.model.visual(vision["pixel_values"], grid_thw=vision["image_grid_thw"]).pooler_output
        per_image = tokens.float().reshape(len(drawn), -1, tokens.shape[-1])
        targets = torch.stack([caption_targets(table, processor.tokenizer, *item) for item in drawn])
        loss = (per_image - targets).pow(2).sum(-1).mean() / scale
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, cfg.warm_steps, cfg.lr, cfg.warmup, cfg.final_lr_ratio)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        optimizer.step()
        if (step + 1) % 25 == 0 or step + 1 == cfg.warm_steps:
            elapsed = time.monotonic() - started
            print(
                f"warm-start step {step + 1}/{cfg.warm_steps} loss {float(loss.detach()):.4f} {elapsed:.0f}s",
                flush=True,
            )
            history.append({"step": step + 1, "loss": round(float(loss.detach()), 5), "elapsed_s": round(elapsed, 1)})
    return {"warm_s": round(time.monotonic() - started, 1), "warm_history": history}


def stage_batch(stage: SmolStage, stage_index: int, step: int, seed: int) -> list[NeedleSample]:
    """The prompts of global ``step``: one haystack size, ``stage.mix`` prompts of each task, uniform depths."""
    rng = random.Random(f"smol-vl train|{seed}|{stage_index}|{step}")
    n_sentences, n_images = rng.randint(*stage.sentences), rng.randint(*stage.images)
    base = TRAIN_SEED_BASE + step * 64  # batches hold at most 64 prompts: seeds never repeat across steps
    out: list[NeedleSample] = []
    for task, count in stage.mix.items():
        for _ in range(count):
            config = SmolConfig(task, n_sentences, n_images, rng.random(), stage.haystack)
            out.append(make_smol_sample(config, base + len(out)))
    return out


def freeze_language_model(model: Qwen2VLForConditionalGeneration) -> list[torch.nn.Parameter]:
    """Turn off gradients outside ``model.visual``; returns the vision side's parameters."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(VISION_PREFIX))
        if param.requires_grad:
            trainable.append(param)
    if not trainable:
        raise RuntimeError(f"the model has no {VISION_PREFIX}* parameters")
    return trainable


def train(
    model: Qwen2VLForConditionalGeneration, processor: Qwen2VLProcessor, cfg: SmolTrainConfig, log_every: int = 20
) -> dict[str, Any]:
    """Every stage in order; returns wall time and the loss log (teacher-forced accuracy per task per window)."""
    params = freeze_language_model(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    model.train()
    started = time.monotonic()
    history: list[dict[str, Any]] = []
    step = 0
    for stage_index, stage in enumerate(cfg.stages):
        window: dict[str, list[tuple[float, bool]]] = defaultdict(list)
        for _ in range(stage.steps):
            samples = stage_batch(stage, stage_index, step, cfg.seed)
            inputs, spans = training_batch(processor, samples)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(**inputs).logits
            losses, exact = answer_losses(logits, inputs["input_ids"], spans)
            for sample, row_loss, row_exact in zip(samples, losses, exact, strict=True):
                window[sample.config.task].append((float(row_loss.detach()), row_exact))
            lr = warmup_cosine(step, cfg.total_steps, cfg.lr, cfg.warmup, cfg.final_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            torch.stack(losses).mean().backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            optimizer.step()
            step += 1
            if step % log_every == 0 or step == cfg.total_steps:
                summary = {t: (sum(l for l, _ in v) / len(v), sum(a for _, a in v) / len(v)) for t, v in window.items()}
                elapsed = time.monotonic() - started
                print(
                    f"step {step}/{cfg.total_steps} stage {stage_index} S{inputs['input_ids'].shape[1]} lr {lr:.2e} "
                    f"{elapsed:.0f}s  " + "  ".join(f"{t} {l:.3f}/{a:.2f}" for t, (l, a) in summary.items()),
                    flush=True,
                )
                history.append(
                    {
                        "step": step,
                        "stage": stage_index,
                        "elapsed_s": round(elapsed, 1),
                        **{
                            t: {"loss": round(l, 4), "teacher_forced_acc": round(a, 3)} for t, (l, a) in summary.items()
                        },
                    }
                )
                window.clear()
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    samples = sum(stage.steps * stage.batch for stage in cfg.stages)
    return {"train_s": round(time.monotonic() - started, 1), "steps": step, "samples": samples, "history": history}


def vision_state(model: Qwen2VLForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The ``model.visual.*`` tensors, as ``build_smol_vl.build_model(vision=...)`` takes them."""
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items() if k.startswith(VISION_PREFIX)}
    if not state:
        raise RuntimeError(f"the model has no {VISION_PREFIX}* tensors")
    return state


# ---------------------------------------------------------------------------------------------------------------
# Held-out evaluation, full cache
# ---------------------------------------------------------------------------------------------------------------

EVAL_IMAGES = (1, 3, 6)
EVAL_SENTENCES = (6, 24)
EVAL_PER_CELL = 4
# The long contexts, among prose: (images, sentences) of ~1.2k, ~2.3k and ~4k tokens.
LONG_EVAL_CONTEXTS = ((8, 40), (12, 100), (16, 200))
LONG_EVAL_TASKS = ("colour", "key", "absent")


def eval_samples(
    per_cell: int = EVAL_PER_CELL,
    tasks: tuple[str, ...] = SMOL_TASKS,
    images: tuple[int, ...] = EVAL_IMAGES,
    sentences: tuple[int, ...] = EVAL_SENTENCES,
) -> list[NeedleSample]:
    """Every task x images x sentences cell, seeds ``0 .. per_cell - 1`` (below every training seed), each at a
    depth drawn uniformly in [0, 1]."""
    if per_cell > TRAIN_SEED_BASE:
        raise ValueError("evaluation seeds would overlap the training seeds")
    out = []
    for task in tasks:
        for n_images in images:
            for n_sentences in sentences:
                for seed in range(per_cell):
                    depth = round(random.Random(f"smol-vl eval|{task}|{n_images}|{n_sentences}|{seed}").random(), 3)
                    out.append(make_smol_sample(SmolConfig(task, n_sentences, n_images, depth), seed))
    return out


def long_eval_samples(per_cell: int = EVAL_PER_CELL) -> list[NeedleSample]:
    """:data:`LONG_EVAL_TASKS` x :data:`LONG_EVAL_CONTEXTS` among prose, seeds ``0 .. per_cell - 1``, depths spread
    evenly over [0, 1] (the accuracy sweep's placement)."""
    if per_cell > TRAIN_SEED_BASE:
        raise ValueError("evaluation seeds would overlap the training seeds")
    return [
        make_smol_sample(SmolConfig(task, sentences, images, (seed + 0.5) / per_cell, "prose"), seed)
        for task in LONG_EVAL_TASKS
        for images, sentences in LONG_EVAL_CONTEXTS
        for seed in range(per_cell)
    ]


def evaluate(
    model: Qwen2VLForConditionalGeneration, processor: Qwen2VLProcessor, samples: list[NeedleSample]
) -> dict[str, Any]:
    """Accuracy per task and per (task, images) cell, with a few wrong answers per task to read."""
    hits: dict[str, list[bool]] = defaultdict(list)
    cells: dict[str, list[bool]] = defaultdict(list)
    wrong: dict[str, list[dict[str, str]]] = defaultdict(list)
    for sample in samples:
        reply = answer(model, processor, sample)
        ok = is_correct(reply, sample.answer)
        hits[sample.config.task].append(ok)
        cells[f"{sample.config.task} i{sample.config.images}"].append(ok)
        if not ok and len(wrong[sample.config.task]) < 3:
            wrong[sample.config.task].append({"expected": sample.answer, "reply": reply})
    return {
        "accuracy": {task: round(sum(v) / len(v), 4) for task, v in hits.items()},
        "count": {task: len(v) for task, v in hits.items()},
        "cells": {cell: round(sum(v) / len(v), 4) for cell, v in cells.items()},
        "wrong_examples": dict(wrong),
    }


# What the card needs of the run that made ``--init``'s weights (its own lineage included).
_PREVIOUS_KEYS = ("command", "train_config", "previous")
_FIRST_COMMAND = "python -m benchmarks.train_smol_vl --out benchmarks/models/smol-vl-vision --seed 0"


def previous_run(path: Path) -> dict[str, Any] | None:
    """The training record of the weights a continuation starts from: its command, config, wall time and held-out
    accuracy, so the card can say every run that made the weights. None when ``path`` does not exist. (The first
    run wrote no command; it was :data:`_FIRST_COMMAND`.)"""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    out = {key: record.get(key) for key in _PREVIOUS_KEYS}
    out["command"] = out["command"] or _FIRST_COMMAND
    out["train_s"] = record["run"]["train_s"] + record["run"].get("warm_s", 0.0)
    out["accuracy"] = record["eval"]["accuracy"]
    return out


def build_processor() -> Qwen2VLProcessor:
    """smol-vl's processor: SmolLM2's tokenizer with the vision tokens, Qwen2-VL's image processor."""
    tokenizer = build_smol_vl.build_tokenizer()
    return checkpoints.qwen_vl_processor("qwen2_vl", tokenizer, build_smol_vl.CHAT_TEMPLATE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_smol_vl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=SmolTrainConfig.seed)
    parser.add_argument("--threads", type=int, default=SmolTrainConfig.threads)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps (smoke runs)")
    parser.add_argument("--eval-per-cell", type=int, default=EVAL_PER_CELL)
    parser.add_argument(
        "--long-eval-per-cell", type=int, default=EVAL_PER_CELL, help="prompts per long-context cell (0: none)"
    )
    parser.add_argument(
        "--curriculum", choices=sorted(CURRICULA), default="base", help="base: STAGES; long: LONG_STAGES"
    )
    parser.add_argument("--lr", type=float, default=SmolTrainConfig.lr)
    parser.add_argument("--eval-only", action="store_true", help="evaluate --out's vision weights, rewrite the card")
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from these vision weights (a vision.safetensors) and skip the warm start: trains further",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file, save_file

    started = time.monotonic()
    processor = build_processor()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.eval_only:
        metrics = json.loads((args.out / METRICS_FILE).read_text())
        model = build_smol_vl.build_model(vision=load_file(str(args.out / VISION_FILE)))
    else:
        stages = tuple(
            SmolStage(max(1, round(s.steps * args.steps_scale)), s.sentences, s.images, s.mix, s.haystack)
            for s in CURRICULA[args.curriculum]
        )
        resumed = args.init is not None
        warm = 0 if resumed else SmolTrainConfig.warm_steps
        warmup = SmolTrainConfig.resumed_warmup if resumed else SmolTrainConfig.warmup
        cfg = SmolTrainConfig(
            seed=args.seed, threads=args.threads, stages=stages, warm_steps=warm, warmup=warmup, lr=args.lr
        )
        init = None if args.init is None else load_file(str(args.init))
        model = build_smol_vl.build_model(vision=init, seed=cfg.seed)
        metrics = {
            "command": "python -m benchmarks.train_smol_vl " + " ".join(argv if argv is not None else sys.argv[1:]),
            "init": None if args.init is None else str(args.init),
            "previous": None if args.init is None else previous_run(args.init.parent / METRICS_FILE),
            "train_config": asdict(cfg),
            "vision_parameters": sum(p.numel() for n, p in model.named_parameters() if n.startswith(VISION_PREFIX)),
            "machine": f"{platform.machine()} CPU, {args.threads} torch threads, torch {torch.__version__}",
        }
        metrics["run"] = warm_start(model, processor, cfg) | train(model, processor, cfg)
        save_file(vision_state(model), str(args.out / VISION_FILE))
        model = build_smol_vl.build_model(vision=load_file(str(args.out / VISION_FILE)))  # evaluate what was written
    eval_started = time.monotonic()
    metrics["eval"] = evaluate(model, processor, eval_samples(args.eval_per_cell))
    metrics["eval"]["eval_s"] = round(time.monotonic() - eval_started, 1)
    metrics.pop("eval_long", None)  # an --eval-only run must not keep a stale one
    if args.long_eval_per_cell:
        long_started = time.monotonic()
        metrics["eval_long"] = evaluate(model, processor, long_eval_samples(args.long_eval_per_cell))
        metrics["eval_long"] |= {
            "eval_s": round(time.monotonic() - long_started, 1),
            "contexts": [list(c) for c in LONG_EVAL_CONTEXTS],
            "per_cell": args.long_eval_per_cell,
        }
    metrics["eval_grid"] = {
        "images": list(EVAL_IMAGES),
        "sentences": list(EVAL_SENTENCES),
        "per_cell": args.eval_per_cell,
    }
    if not args.eval_only:
        metrics["run"]["total_s"] = round(time.monotonic() - started, 1)
    (args.out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    from benchmarks.smol_vl_card import write_card

    write_card(args.out, metrics)
    print(json.dumps({"accuracy": metrics["eval"]["accuracy"], "train_s": metrics["run"]["train_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
