"""MileBench's on-disk layout: which directory a task lives in, and its samples.

Layout, as MileBench's ``generate.py`` and ``evaluate.py`` read it (their ``eval.sh`` passes ``data/MileBench``
as the data directory)::

    {data_dir}/{Dataset}/{Dataset}.json        # or {Dataset}-adv.json with --adv
    {data_dir}/{Dataset}/images/{images_path[i]}

    {"meta_data": {"task_instruction": [str, ...], "question_type": "open-ended" | "multi-choice"},
     "data": [{"sample_id": 0, "task_instruction_id": 0,
               "task_instance": {"context": "... {image#1} ... {table#2} ...", "images_path": ["a.jpg", ...],
                                 "choice_list": [...]},          # multi-choice only
               "response": "...", "image_quantity_level": "Few" | "Medium" | "Many"}]}

Assumed from MileBench's code, not from the data (which cannot be downloaded here): image paths are relative to
``{Dataset}/images/`` for both the plain and the ``-adv`` JSON (``generate.py`` always joins ``images/``); the
``{image#i}`` / ``{table#i}`` placeholders number ``images_path`` from 1; ``response`` may be a number
(MileBench reads ``str(response)``). ``image_quantity_level`` is not read: MileBench's scorer derives the
level from the image count (:func:`benchmarks.milebench.scoring.image_level`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The MadaKV paper's MileBench subset (its abbreviations) and MileBench's directory names.
TASKS: dict[str, str] = {
    "TN": "TextNeedleInAHaystack",
    "IEdit": "IEdit",
    "MMCoQA": "MMCoQA",
    "STD": "Spot-the-Diff",
    "ALFRED": "ALFRED",
    "CLEVR-C": "CLEVR-Change",
    "DocVQA": "DocVQA",
    "ST": "SceneTransition",
    "OI": "ObjectInteraction",
}


def dataset_dir(task: str) -> str:
    """A paper abbreviation (``TN``) or any MileBench directory name (``TextNeedleInAHaystack``, ``WebQA``)."""
    return TASKS.get(task, task)


@dataclass(frozen=True)
class Sample:
    """One MileBench sample, with image paths resolved (they are not opened here)."""

    sample_id: Any  # an int in MileBench's JSON; kept as given
    instruction: str
    context: str
    images: tuple[Path, ...]
    choices: tuple[str, ...] | None
    response: str


@dataclass(frozen=True)
class Dataset:
    name: str  # the directory name, which also picks the scoring rule
    question_type: str
    samples: tuple[Sample, ...]


def load_dataset(data_dir: Path, task: str, adv: bool = False, limit: int | None = None) -> Dataset:
    """Read ``{task}.json`` (``{task}-adv.json`` with ``adv``), the first ``limit`` samples in file order.

    Raises FileNotFoundError naming the missing file, ValueError for a sample that breaks the layout.
    """
    name = dataset_dir(task)
    root = Path(data_dir) / name
    path = root / (f"{name}-adv.json" if adv else f"{name}.json")
    if not path.is_file():
        raise FileNotFoundError(f"{task}: no {path} (expected MileBench's {{Dataset}}/{{Dataset}}.json layout)")
    raw = json.loads(path.read_text())
    meta = raw["meta_data"]
    instructions: list[str] = meta["task_instruction"]
    samples = []
    for entry in raw["data"][:limit]:
        instance = entry["task_instance"]
        choices = instance.get("choice_list")
        try:
            instruction = instructions[entry["task_instruction_id"]]
        except IndexError:
            raise ValueError(
                f"{path}: sample {entry['sample_id']}: no task_instruction #{entry['task_instruction_id']}"
            ) from None
        samples.append(
            Sample(
                sample_id=entry["sample_id"],
                instruction=instruction,
                context=instance["context"],
                images=tuple(root / "images" / p for p in instance["images_path"]),
                choices=None if choices is None else tuple(str(c) for c in choices),
                response=str(entry["response"]),
            )
        )
    return Dataset(name, meta["question_type"], tuple(samples))
