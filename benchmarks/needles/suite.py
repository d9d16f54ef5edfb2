"""Multimodal needle-in-a-haystack prompts: the answer lives in the text, in an image, or needs both.

A prompt is a haystack of filler sentences with images interleaved among them (one image every few sentences,
so the images' share of the context is a parameter), then a question. Tasks:

- ``text``: one sentence "The key is WORD." sits at depth d of the text; the question asks for the key.
- ``image``: exactly one image, at depth d among the images, shows a saturated shape of a named colour on the
  noisy background every image has; the question asks for the shape's colour.
- ``mixed``: both needles at once, the key sentence at depth d of the text and the coloured shape at depth d among
  the images; the question asks for the key and the colour, and the answer ("apple red") is right only when both
  words are, so it needs a text token and an image token to survive eviction together. (A two-hop variant, "red
  means apple" in the text and the answer the meaning of the shape's colour, was not learnable by a model of
  <= 20 MB trained on 2 CPU cores: it stayed at chance, 1 in 4, for thousands of steps; see the model card.)
- ``absent``: the haystack alone, with the text task's question; the answer is "none" (a model that always
  names a key fails it).

Everything is drawn from ``random.Random(seed)``: the same :class:`NeedleConfig` and seed give the same sample,
images included. The suite is ours (no dataset can be downloaded here); the tasks follow MM-NIAH's retrieval
tasks and RULER's "repeat" haystack (without its colour words).
"""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from PIL import Image

from benchmarks.needles.images import COLOURS, SHAPES, background, draw_shape

Task = Literal["text", "image", "mixed", "absent"]
TASKS: tuple[Task, ...] = ("text", "image", "mixed", "absent")
ABSENT_ANSWER = "none"
KEYS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "piano",
    "rocket",
    "candle",
    "forest",
    "silver",
    "garden",
    "window",
    "dragon",
    "pepper",
    "violin",
)
# RULER's "repeat" haystack names colours ("The grass is green. The sky is blue. ..."); the image task's answers are
# colours, so ours keeps its rhythm without them.
FILLER = ("The grass is tall.", "The sky is wide.", "The sun is warm.", "Here we go.", "There and back again.")
_KEY_QUESTION = "What is the key? Answer with one word."
QUESTIONS = {
    "text": _KEY_QUESTION,
    "image": "What color is the shape in the images? Answer with one word.",
    "mixed": "What is the key, and what color is the shape in the images? Answer with two words.",
    "absent": _KEY_QUESTION,  # the same question as the text task, so only the needle's presence differs
}


@dataclass(frozen=True)
class NeedleConfig:
    """One cell of the benchmark grid.

    Attributes:
        task: which needle (module docstring).
        sentences: filler sentences in the haystack (about 5 tokens each with a word-level tokenizer).
        images: images in the haystack (64 tokens each in the tiny Qwen2-VL); ``image`` and ``mixed`` need >= 1.
        depth: where the needle sits, 0 (start) .. 1 (end), as a fraction of the text or of the images.
    """

    task: Task
    sentences: int = 40
    images: int = 4
    depth: float = 0.5

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r}: expected one of {TASKS}")
        if self.sentences < 1 or self.images < 0:
            raise ValueError("a haystack needs at least one sentence and a non-negative image count")
        if self.task in ("image", "mixed") and self.images < 1:
            raise ValueError(f"the {self.task} task hides its needle in an image: images must be >= 1")
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth {self.depth} is outside [0, 1]")


class SampleConfig(Protocol):
    """What a sample's config tells its users: the task, the haystack's size and the needle's depth
    (:class:`NeedleConfig` here, ``smol.SmolConfig`` for smol-vl's tasks)."""

    @property
    def task(self) -> str: ...

    @property
    def sentences(self) -> int: ...

    @property
    def images(self) -> int: ...

    @property
    def depth(self) -> float: ...


@dataclass
class NeedleSample:
    """A prompt as interleaved segments: ``str`` text, or ``int`` an index into ``images``.

    Attributes:
        meta: ``needle_sentence`` / ``needle_image`` (index into ``images``, or None), ``colour``, ``shape``,
            ``seed`` and the config's fields.
    """

    config: SampleConfig
    segments: list[str | int]
    images: list[Image.Image]
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    def text(self, image_marker: str = "<image>") -> str:
        """The prompt as one string with ``image_marker`` where the images go."""
        return "".join(part if isinstance(part, str) else image_marker for part in self.segments)

    def chat_messages(self) -> list[dict[str, Any]]:
        """The user turn for a processor's chat template: what :meth:`openai_content` sends, images as
        ``{"type": "image"}`` placeholders (the pixels go to the processor separately)."""
        content: list[dict[str, Any]] = [
            {"type": "text", "text": part} if isinstance(part, str) else {"type": "image"} for part in self.segments
        ]
        content.append({"type": "text", "text": "\n" + self.question})
        return [{"role": "user", "content": content}]

    def openai_content(self) -> list[dict[str, Any]]:
        """OpenAI chat content parts (text and PNG data URLs), then the question."""
        parts: list[dict[str, Any]] = []
        for part in self.segments:
            if isinstance(part, str):
                parts.append({"type": "text", "text": part})
            else:
                parts.append({"type": "image_url", "image_url": {"url": png_data_url(self.images[part])}})
        parts.append({"type": "text", "text": "\n" + self.question})
        return parts


def prompt_text(processor: Any, sample: NeedleSample) -> str:
    """The chat template's rendering of ``sample``, up to and including the assistant's turn header."""
    return str(processor.apply_chat_template(sample.chat_messages(), add_generation_prompt=True, tokenize=False))


def prompt_inputs(processor: Any, sample: NeedleSample) -> dict[str, Any]:
    """The processor's tensors for one unpadded prompt (``input_ids`` ``[1, n]``, ``pixel_values``, ...)."""
    inputs = dict(processor(text=[prompt_text(processor, sample)], images=sample.images or None, return_tensors="pt"))
    inputs.pop("attention_mask", None)
    return inputs


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def at_depth(count: int, depth: float) -> int:
    """The index of depth ``depth`` among ``count`` slots (0 -> first, 1 -> last)."""
    return min(count - 1, int(round(depth * (count - 1))))


def make_sample(config: NeedleConfig, seed: int) -> NeedleSample:
    """One prompt of ``config``; deterministic in ``seed``."""
    rng = random.Random(f"{config}|{seed}")
    sentences = [rng.choice(FILLER) for _ in range(config.sentences)]
    images = [background(rng) for _ in range(config.images)]
    meta: dict[str, Any] = {
        "seed": seed,
        "needle_sentence": None,
        "needle_image": None,
        "colour": None,
        "shape": None,
        **{k: getattr(config, k) for k in ("task", "sentences", "images", "depth")},
    }
    answer = ABSENT_ANSWER
    if config.task in ("image", "mixed"):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        where = at_depth(config.images, config.depth)
        images[where] = draw_shape(images[where], shape, colour, rng)
        meta.update(needle_image=where, colour=colour, shape=shape)
        answer = colour
    if config.task in ("text", "mixed"):
        key = rng.choice(KEYS)
        where = at_depth(config.sentences + 1, config.depth)
        sentences.insert(where, f"The key is {key}.")
        meta.update(needle_sentence=where, key=key)
        answer = key if config.task == "text" else f"{key} {meta['colour']}"
    return NeedleSample(config, _interleave(sentences, len(images)), images, QUESTIONS[config.task], answer, meta)


def image_positions(sentences: int, images: int) -> dict[int, list[int]]:
    """Images spread evenly through the text: sentence index -> the images that go before it (image i before
    sentence ``round((i + 0.5) * S / images)``; several at one place when there are more images than sentences)."""
    before: dict[int, list[int]] = {}
    for i in range(images):
        before.setdefault(min(sentences, round((i + 0.5) * sentences / images)), []).append(i)
    return before


def _interleave(sentences: list[str], images: int) -> list[str | int]:
    """Images spread evenly through the text: image i goes before sentence ``round((i + 0.5) * S / images)``
    (several images at one place when there are more images than sentences)."""
    before = image_positions(len(sentences), images)
    segments: list[str | int] = []
    text: list[str] = []
    for index in range(len(sentences) + 1):
        if index in before:
            if text:
                segments.append(" ".join(text) + " ")
                text = []
            segments.extend(before[index])
        if index < len(sentences):
            text.append(sentences[index])
    if text:
        segments.append(" ".join(text))
    return segments


def make_suite(configs: list[NeedleConfig], samples_per_config: int, seed: int = 0) -> list[NeedleSample]:
    """``samples_per_config`` samples of every config, seeds ``seed .. seed + samples_per_config - 1``."""
    return [make_sample(config, seed + i) for config in configs for i in range(samples_per_config)]


def is_correct(prediction: str, answer: str) -> bool:
    """Every word of the answer appears in the prediction as a word (MileBench's needle rule, ``gt in
    pred.split()``, applied to each word), ignoring case and punctuation."""
    words = set(_words(prediction))
    return all(word in words for word in _words(answer))


def _words(text: str) -> list[str]:
    return "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()
