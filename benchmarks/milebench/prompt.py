"""A MileBench sample as the prompt MileBench gives a model: text and images, interleaved.

As ``MileBenchDataset.__getitem__`` (MileBench's ``utils.py``) builds it: the task instruction, a newline, then
the context with each ``{image#i}`` / ``{table#i}`` replaced by image i; for multiple-choice samples the context
ends with ``"\\nChoice list: \\nA. ...\\nB. ...\\nYour answer is: "`` (GPR1200 lists its choices without
letters). The result is a list of text pieces and image paths, in order, which the runner turns into OpenAI
content parts.

Middle truncation (optional, :class:`Truncation`): MileBench keeps the instruction and the end of the context
and drops the context's beginning, walking back from the end one text fragment and one image at a time until
``max_context_tokens`` (instruction included, ``tokens_per_image`` per image) would be exceeded; a first
fragment too long on its own keeps its last tokens. Differences: fragments kept whole keep their original text
(MileBench decodes its tokens, which for byte-level BPE tokenizers is the same text); a budget left at zero or
below keeps nothing of that fragment (MileBench's ``ids[-0:]`` would keep all of it). MileBench's LLaVA worker
also puts a newline after each of two adjacent images (for CLEVR-Change); that is model glue and not done here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from benchmarks.milebench.data import Sample
from benchmarks.milebench.scoring import option_letter

PLACEHOLDER = "<ImageHere>"
Part = str | Path  # a text piece or an image file


class Tokenizer(Protocol):
    """The two calls truncation needs (a Hugging Face tokenizer has them)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Truncation:
    """MileBench's ``max_context_len`` and ``n_tokens_per_image``, counted with the model's tokenizer."""

    tokenizer: Tokenizer
    max_context_tokens: int
    tokens_per_image: int

    def __post_init__(self) -> None:
        if self.max_context_tokens <= 0 or self.tokens_per_image < 0:
            raise ValueError(
                f"max_context_tokens must be > 0 and tokens_per_image >= 0, got "
                f"{self.max_context_tokens} and {self.tokens_per_image}"
            )

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def keep_last(self, text: str, tokens: int) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.decode(ids[-tokens:]) if tokens > 0 else ""


def milebench_context(sample: Sample, dataset: str) -> str:
    """The context with the choice list appended and every placeholder replaced by :data:`PLACEHOLDER`."""
    context = sample.context
    if sample.choices is not None:
        lettered = dataset != "GPR1200"  # MileBench: its 100+ choices would break the letter matching
        listed = [(f"{option_letter(i)}. " if lettered else "") + choice for i, choice in enumerate(sample.choices)]
        context += "\nChoice list: \n" + "\n".join(listed) + "\nYour answer is: "
    for i in range(1, len(sample.images) + 1):
        context = context.replace(f"{{image#{i}}}", PLACEHOLDER).replace(f"{{table#{i}}}", PLACEHOLDER)
    return context


def interleave(
    instruction: str, context: str, images: Sequence[Path], truncation: Truncation | None = None
) -> list[Part]:
    """``instruction + "\\n" + context`` with the images at the placeholders, truncated as MileBench does.

    Images are matched to placeholders from the end, as in MileBench. Raises ValueError when the kept context
    has more placeholders than there are images. Empty text pieces are left out.
    """
    budget = math.inf if truncation is None else truncation.max_context_tokens - truncation.count(instruction)
    per_image = 0 if truncation is None else truncation.tokens_per_image
    pending = list(images)
    chunks: list[str] = []  # kept text fragments, last first
    kept: list[Path] = []  # kept images, last first
    used = 0
    image_first = False  # the kept context starts with an image
    for fragment in reversed(context.split(PLACEHOLDER)):
        size = 0 if truncation is None else truncation.count(fragment)
        if used + size > budget:
            if not chunks and truncation is not None:
                chunks.append(truncation.keep_last(fragment, int(budget - used)))
            break
        image_first = False
        chunks.append(fragment)
        used += size
        if used + per_image > budget:
            break
        if pending:
            image_first = True
            kept.append(pending.pop())
            used += per_image
    chunks.reverse()
    kept.reverse()
    if len(kept) != len(chunks) - 1 + image_first:
        raise ValueError(
            f"the context has {len(chunks) - 1 + image_first} image placeholders to fill but "
            f"{len(kept)} images are left"
        )
    texts = [instruction + "\n" + ("" if image_first else chunks[0])] + chunks[(0 if image_first else 1) :]
    parts: list[Part] = [texts[0]]
    for image, text in zip(kept, texts[1:], strict=True):
        parts += [image, text]
    return [part for part in parts if part != ""]


def build_prompt(sample: Sample, dataset: str, truncation: Truncation | None = None) -> list[Part]:
    """The sample's prompt as MileBench builds it (module docstring)."""
    return interleave(sample.instruction, milebench_context(sample, dataset), sample.images, truncation)
