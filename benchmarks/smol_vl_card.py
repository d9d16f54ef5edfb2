"""The model card of smol-vl's trained vision side (``README.md`` beside ``vision.safetensors``), written from
the numbers of the training run (``training.json``), so the card never says what the run did not measure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.build_smol_vl import VISION_CONFIG
from benchmarks.needles.smol import SMOL_TASKS

GOOD = 0.9  # the bar for a task the policy comparison may use


def write_card(out_dir: Path, metrics: dict[str, Any]) -> None:
    """``README.md`` in ``out_dir``: model, data, schedule, held-out full-cache accuracy, limits."""
    cfg, run, ev, grid = metrics["train_config"], metrics["run"], metrics["eval"], metrics["eval_grid"]
    weights_mb = (out_dir / "vision.safetensors").stat().st_size / 1e6
    stages = _stage_rows([(n, r["train_config"]) for n, r in enumerate(_runs(metrics), start=1)])
    tasks = [t for t in SMOL_TASKS if t in ev["accuracy"]]
    accuracy = "\n".join(f"| {t} | {ev['accuracy'][t]:.3f} | {ev['count'][t]} |" for t in tasks)
    by_images = "\n".join(
        f"| {t} | " + " | ".join(f"{_cell(ev, t, n):.2f}" for n in grid["images"]) + " |" for t in tasks
    )
    wrong = "\n".join(
        f"- {t}: " + "; ".join(f"expected {w['expected']!r}, said {w['reply']!r}" for w in ev["wrong_examples"][t])
        for t in tasks
        if ev["wrong_examples"].get(t)
    )
    card = f"""# smol-vl vision side: a vision tower trained for SmolLM2-135M-Instruct, the language model frozen

`vision.safetensors` holds the `model.visual.*` tensors (patch embedding, {VISION_CONFIG["depth"]} vision blocks,
the 2x2 merger) of smol-vl, a Qwen2-VL checkpoint whose language model is SmolLM2-135M-Instruct unchanged
(`benchmarks/build_smol_vl.py`). The servable checkpoint is assembled from this file and the SmolLM2 weights that
`make setup-smollm2` converts:

    python -m benchmarks.build_smol_vl --out .models/smol-qwen2-vl

{_lineage(metrics)}

## Model

- Vision side: {metrics["vision_parameters"]:,} parameters, fp32, {weights_mb:.1f} MB. 14-px patches, a 224x224
  image is 256 patches, merged 2x2 into 64 tokens of SmolLM2's width (576).
- Language model: SmolLM2-135M-Instruct's weights, not trained here (text logits equal SmolLM2's own:
  `tests/benchmarks/test_build_smol_vl.py`).

## Training

- Only `model.visual.*` is updated (AdamW, betas 0.9 / 0.98, weight decay {cfg["weight_decay"]}, peak lr and
  warm-up steps by run {_schedules(metrics)}, cosine to {cfg["final_lr_ratio"]} x peak, gradient clip {cfg["clip"]});
  forward autocast to bfloat16: {cfg["bf16"]}.
{_warm_start(metrics)}
- Data: `benchmarks.needles.smol` prompts drawn fresh every step (seeds >= 1,000,000), each rendered as served:
  the chat template over one user message (numbered images among sentences, then the question), the
  assistant's reply, a short sentence naming the answer ("The shape is red.") and `<|im_end|>`; the loss is the
  reply tokens' cross-entropy. {run["samples"]:,} prompts in the last run.
- Curriculum (haystack size drawn per batch; `filler` is the needle suite's repeated sentences, `prose` the
  narrative haystack of `benchmarks.needles.prose`):

| run | stage | steps | prompts per batch | sentences | images | haystack |
|---|---|---|---|---|---|---|
{stages}

- Wall time of the last run: {run["train_s"] / 60:.1f} min of training
  ({run.get("total_s", run["train_s"]) / 60:.1f} min with evaluation) on {metrics["machine"]}, shared with other
  work; {_total_minutes(metrics):.0f} min of training over all runs.

## Held-out accuracy, full cache

Seeds 0..{grid["per_cell"] - 1} (never trained on) of every task x images {grid["images"]} x sentences
{grid["sentences"]}, depths uniform in [0, 1]; greedy replies from `madakv_sglang.hf.generate` with policy `full`
(fp32), scored by the needle suite's `is_correct` (every word of the answer appears in the reply).

| task | accuracy | prompts |
|---|---|---|
{accuracy}

By number of images ({" / ".join(map(str, grid["images"]))}):

| task | {" | ".join(f"{n} images" for n in grid["images"])} |
|---|{"---|" * len(grid["images"])}
{by_images}

{"Wrong answers (the first few per task):" if wrong else ""}
{wrong}

{_long_contexts(metrics)}

## What it can and cannot show

- Can: {_can(ev["accuracy"])}
- Cannot (yet): {_cannot(ev["accuracy"])}. The vision side trained for {_total_minutes(metrics):.0f} minutes in all;
  every step through SmolLM2 costs about half a second per prompt on this machine, and these tasks need more of
  them, or a language model that reads text facts better than a 135M one (SmolLM2 alone, given the image as
  text, already fails the lookup and which-image questions).
- Long contexts: {_long_verdict(metrics)}
{_versus_previous(metrics)}
- Cannot: natural images. The vision side has seen only the suite's noisy backgrounds with saturated shapes and
  digits. Nor can it stand in for Qwen2-VL or LLaVA: the language model has 135M parameters, and its attention
  is its own (nothing in it was tuned here).
"""
    (out_dir / "README.md").write_text(card)


def _warm_start(metrics: dict[str, Any]) -> str:
    """The card's line on how the vision side started: the warm start's numbers, or the weights it resumed."""
    cfg, run = metrics["train_config"], metrics["run"]
    if not run.get("warm_history"):
        first = _runs(metrics)[0]["train_config"]
        return (
            f"- Run 1 began with a warm start ({first['warm_steps']} steps of {first['warm_batch']} images, the"
            " language model not run: each image token pulled onto SmolLM2's input embedding of the object's colour"
            " word or of what the image shows). The last run started from"
            f" `{metrics.get('init')}` and trained those weights further."
        )
    steps, batch = cfg["warm_steps"], cfg["warm_batch"]
    return f"""- Warm start, the language model not run: {steps} steps of {batch} images (nothing, a shape, a digit, or
  1-4 shapes), each image token pulled onto a SmolLM2 input embedding: the object's colour
  word where the token shows the object, the word for what it is (" circle", "7", " three", " nothing") elsewhere;
  a mean-squared error scaled by the embeddings' mean square (final {run["warm_history"][-1]["loss"]:.3f},
  {run["warm_s"] / 60:.1f} min). SmolLM2 then reads an image as those words."""


def _can(accuracy: dict[str, float]) -> str:
    good = [f"{task} ({value:.2f})" for task, value in accuracy.items() if value >= GOOD]
    return "the tasks it answers with the full cache: " + (", ".join(good) if good else "none") + "."


def _cannot(accuracy: dict[str, float]) -> str:
    return ", ".join(f"{task} ({value:.2f})" for task, value in accuracy.items() if value < GOOD) or "none"


def _cell(evaluation: dict[str, Any], task: str, images: int) -> float:
    """Accuracy of one (task, images) cell of ``train_smol_vl.evaluate``'s results."""
    return float(evaluation["cells"][f"{task} i{images}"])


def _runs(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run that made the weights, first to last (a continuation records the run it started from)."""
    chain, record = [], metrics
    while record:
        chain.append(record)
        record = record.get("previous")
    return chain[::-1]


def _lineage(metrics: dict[str, Any]) -> str:
    runs = _runs(metrics)
    commands = "\n".join(f"    {r['command']}" for r in runs)
    lead = (
        "It was trained by" if len(runs) == 1 else f"It was trained in {len(runs)} runs, each from the last's weights:"
    )
    return f"{lead}\n\n{commands}"


def _stage_rows(runs: list[tuple[int, dict[str, Any]]]) -> str:
    """The curriculum table's rows: (run number, that run's train_config) for every run."""
    return "\n".join(
        f"| {run} | {i} | {s['steps']} | {', '.join(f'{t} {n}' for t, n in s['mix'].items())} | "
        f"{s['sentences'][0]}-{s['sentences'][1]} | {s['images'][0]}-{s['images'][1]} | {s.get('haystack', 'filler')} |"
        for run, cfg in runs
        for i, s in enumerate(cfg["stages"])
    )


def _long_contexts(metrics: dict[str, Any]) -> str:
    """The long-context table (``eval_long``): accuracy per task and haystack, among prose."""
    long = metrics.get("eval_long")
    if not long:
        return "Long contexts were not evaluated in this run."
    contexts = long["contexts"]
    header = " | ".join(f"{images} images, {sentences} sentences" for images, sentences in contexts)
    rows = "\n".join(
        f"| {task} | " + " | ".join(f"{_cell(long, task, images):.2f}" for images, _ in contexts) + " |"
        for task in long["accuracy"]
    )
    wrong = "; ".join(
        f"{task}: expected {w['expected']!r}, said {w['reply']!r}"
        for task, examples in long["wrong_examples"].items()
        for w in examples[:1]
    )
    return f"""## Held-out accuracy at long contexts, full cache

{long["per_cell"]} prompts per cell (seeds 0..{long["per_cell"] - 1}, depths spread evenly), the needle among
prose sentences (`benchmarks.needles.prose`); about 1.2k, 2.3k and 4k tokens.

| task | {header} |
|---|{"---|" * len(contexts)}
{rows}

{"First wrong answer per task: " + wrong if wrong else ""}"""


def _long_verdict(metrics: dict[str, Any]) -> str:
    """Which (task, haystack) cells of the long table reach :data:`GOOD`."""
    long = metrics.get("eval_long")
    if not long:
        return "not evaluated here."
    cells = [
        (f"{task} among {images} images", _cell(long, task, images))
        for task in long["accuracy"]
        for images, _ in long["contexts"]
    ]
    good = [f"{name} ({value:.2f})" for name, value in cells if value >= GOOD]
    bad = [f"{name} ({value:.2f})" for name, value in cells if value < GOOD]
    return f"at {GOOD:.0%} or more: {', '.join(good) or 'none'}; below: {', '.join(bad) or 'none'} (the table above)."


def _schedules(metrics: dict[str, Any]) -> str:
    return ", ".join(
        f"{n}: {r['train_config']['lr']} / {r['train_config']['warmup']}" for n, r in enumerate(_runs(metrics), start=1)
    )


def _total_minutes(metrics: dict[str, Any]) -> float:
    """Training minutes over every run, warm starts included."""
    run = metrics["run"]
    last = run["train_s"] + run.get("warm_s", 0.0)
    return (last + sum(r["train_s"] for r in _runs(metrics)[:-1])) / 60


def _versus_previous(metrics: dict[str, Any]) -> str:
    """What a continuation cost or gained on the short held-out set, task by task (empty for a first run)."""
    previous = metrics.get("previous")
    if not previous:
        return ""
    now = metrics["eval"]["accuracy"]
    changes = ", ".join(f"{t} {previous['accuracy'][t]:.2f} -> {now[t]:.2f}" for t in now if t in previous["accuracy"])
    return f"- Against the weights this run started from (the same held-out prompts): {changes}."
