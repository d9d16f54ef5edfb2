"""The tasks of smol-vl (issue 16): what its vision side is trained on, and the long multi-image retrievals the
accuracy sweep asks of it.

Every prompt is haystack sentences with numbered images among them ("Image 3: <image>"), then a question. The
sentences are the needle suite's repeated filler, or narrative prose (``haystack="prose"``,
:mod:`benchmarks.needles.prose`), which SmolLM2 does not copy into its answers the way it copies the filler at 1k
tokens and more. The images are the needle suite's noisy backgrounds; some show something:

- ``colour`` / ``shape`` / ``digit`` / ``count``: one image, at depth d among the images, shows a coloured
  shape, a large coloured digit, or 1-4 small shapes of one kind; the question asks for its colour, shape, digit
  or count. With one image this is plain perception; with 8-16 it is the needle in one of many images.
- ``which``: one image shows a shape; the question asks for its number ("3"), so the answer binds what an image
  shows to the text just before it.
- ``key``: the text needle "The key is WORD." at depth d of the text, among images that each show a random
  distractor shape (the images draw attention but hold nothing asked for).
- ``lookup``: the text says what the box of each colour holds ("The red box holds apples.", four facts spread
  through the text) and one image shows a box (a square) of one colour; the question asks what that box holds.
  The answer needs the image's colour and the text's fact together.
- ``absent``: the ``colour`` question over images that show nothing; the answer is "none".

The answer is one word ("red", "3", "apples", "none"), scored by the needle suite's ``is_correct``; the reply a
sample trains on (``meta["reply"]``) is a short sentence naming it, in SmolLM2's manner (:data:`REPLIES`).

Everything is drawn from ``random.Random`` of the config and seed, like the needle suite. The samples are
:class:`~benchmarks.needles.suite.NeedleSample`, so the suite's rendering, scoring and request helpers apply.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from benchmarks.needles.images import COLOURS, SHAPES, SIZE, background, draw_in_box, draw_shape
from benchmarks.needles.prose import prose_sentences
from benchmarks.needles.suite import ABSENT_ANSWER, FILLER, KEYS, NeedleSample, at_depth, image_positions

HAYSTACKS = ("filler", "prose")
SMOL_TASKS = ("colour", "shape", "digit", "count", "which", "key", "lookup", "absent")
# Tasks whose answer is in an image (a needle image exists); ``key`` keeps its answer in the text.
_IMAGE_NEEDLE = {"colour", "shape", "digit", "count", "which", "lookup"}
QUESTIONS = {
    "colour": "What color is the shape in the images?",
    "shape": "What shape is in the images?",
    "digit": "What digit is shown in the images?",
    "count": "How many shapes are in the images?",
    "which": "Which image shows a shape?",
    "key": "What is the key?",
    "lookup": "One image shows a box. What does the box of that color hold?",
    "absent": "What color is the shape in the images?",
}
# The reply each task trains on: a short sentence in SmolLM2's own manner (asked for one word, it answers "The key
# is ..."), so training changes what the reply names, not how SmolLM2 phrases it. Scoring reads the answer word.
REPLIES = {
    "colour": "The shape is {answer}.",
    "shape": "The shape is a {answer}.",
    "digit": "The digit is {answer}.",
    "count": "There {be} {answer} shape{s}.",
    "which": "The shape is in image {answer}.",
    "key": "The key is {answer}.",
    "lookup": "The box holds {answer}.",
    "absent": "None of the images shows a shape.",
}
# What a box of each colour may hold (plural nouns SmolLM2 tokenizes as words); four differ per prompt.
CONTENTS = ("apples", "stones", "coins", "books", "shoes", "keys", "cups", "pens", "eggs", "bells", "nails", "seeds")
MAX_COUNT = 4
_DIGIT_FONT_SIZES = (90, 140)


@dataclass(frozen=True)
class SmolConfig:
    """One cell of the smol-vl grid.

    Attributes:
        task: one of :data:`SMOL_TASKS` (module docstring).
        sentences: haystack sentences (SmolLM2 tokenizes a filler sentence as ~5 tokens, a prose one as ~14).
        images: numbered images (64 tokens each); every task needs >= 1.
        depth: where the needle sits, 0 (start) .. 1 (end): among the images for image needles, in the text for
            ``key``.
        haystack: ``filler`` (the needle suite's repeated sentences, what the vision side trained among) or
            ``prose`` (:mod:`benchmarks.needles.prose`, which SmolLM2 reads past at 1k-4k tokens).
    """

    task: str
    sentences: int = 20
    images: int = 1
    depth: float = 0.5
    haystack: str = "filler"

    def __post_init__(self) -> None:
        if self.task not in SMOL_TASKS:
            raise ValueError(f"task {self.task!r}: expected one of {SMOL_TASKS}")
        if self.images < 1 or self.sentences < 0:
            raise ValueError("a smol-vl prompt needs at least one image and a non-negative sentence count")
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth {self.depth} is outside [0, 1]")
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"haystack {self.haystack!r}: expected one of {HAYSTACKS}")

    def seed_key(self) -> str:
        """What the sample's random draws are seeded with: the fields as the config printed before ``haystack``
        existed, so filler samples (the trained weights' held-out set among them) stay what they were."""
        key = f"SmolConfig(task={self.task!r}, sentences={self.sentences}, images={self.images}, depth={self.depth})"
        return key if self.haystack == "filler" else f"{key}|{self.haystack}"


def make_smol_sample(config: SmolConfig, seed: int) -> NeedleSample:
    """One prompt of ``config``; deterministic in ``seed``."""
    rng = random.Random(f"smol-vl|{config.seed_key()}|{seed}")
    if config.haystack == "prose":
        sentences = prose_sentences(rng, config.sentences)
    else:
        sentences = [rng.choice(FILLER) for _ in range(config.sentences)]
    images = [background(rng) for _ in range(config.images)]
    where = at_depth(config.images, config.depth)
    meta: dict[str, object] = {"seed": seed, "needle_image": None, "needle_sentence": None}
    meta |= {k: getattr(config, k) for k in ("task", "sentences", "images", "depth", "haystack")}
    task = config.task
    if task in ("colour", "shape", "which"):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        images[where] = draw_shape(images[where], shape, colour, rng)
        answer = {"colour": colour, "shape": shape, "which": str(where + 1)}[task]
        meta.update(colour=colour, shape=shape)
    elif task == "digit":
        digit = rng.randrange(10)
        images[where] = draw_digit(images[where], digit, rng.choice(sorted(COLOURS)), rng)
        answer = str(digit)
    elif task == "count":
        count = rng.randint(1, MAX_COUNT)
        images[where] = draw_count(images[where], count, rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng)
        answer = str(count)
    elif task == "lookup":
        colours = sorted(COLOURS)
        contents = rng.sample(CONTENTS, len(colours))
        colour = rng.choice(colours)
        images[where] = draw_shape(images[where], "square", colour, rng)
        facts = [f"The {c} box holds {item}." for c, item in zip(colours, contents, strict=True)]
        rng.shuffle(facts)
        for index, fact in enumerate(facts):  # spread through the text, in a random order
            sentences.insert(round((index + 0.5) * (len(sentences) + 1) / len(facts)), fact)
        answer = contents[colours.index(colour)]
        meta.update(colour=colour)
    elif task == "key":
        for index in range(config.images):
            images[index] = draw_shape(images[index], rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng)
        key = rng.choice(KEYS)
        at = at_depth(len(sentences) + 1, config.depth)
        sentences.insert(at, f"The key is {key}.")
        meta.update(needle_sentence=at, key=key)
        answer = key
    else:
        answer = ABSENT_ANSWER
    if task in _IMAGE_NEEDLE:
        meta["needle_image"] = where
    one = answer == "1"
    meta["reply"] = REPLIES[task].format(answer=answer, s="" if one else "s", be="is" if one else "are")
    return NeedleSample(config, _numbered(sentences, len(images)), images, QUESTIONS[task], answer, meta)


def draw_digit(image: Image.Image, digit: int, colour: str, rng: random.Random) -> Image.Image:
    """A copy of ``image`` with ``digit`` in PIL's default font, 90-140 px tall and stroked 4-7 px wide (the
    plain font's strokes are thinner than a 14-px patch), at a random place inside it."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=rng.randint(*_DIGIT_FONT_SIZES))
    stroke = rng.randint(4, 7)
    left, top, right, bottom = (round(v) for v in draw.textbbox((0, 0), str(digit), font=font, stroke_width=stroke))
    x = rng.randint(4 - left, SIZE - 4 - right)
    y = rng.randint(4 - top, SIZE - 4 - bottom)
    fill = COLOURS[colour]
    draw.text((x, y), str(digit), fill=fill, font=font, stroke_width=stroke, stroke_fill=fill)
    return out


def draw_count(image: Image.Image, count: int, shape: str, colour: str, rng: random.Random) -> Image.Image:
    """A copy of ``image`` with ``count`` shapes, 36-48 px wide, one in each of ``count`` distinct cells of a 2 x 2
    grid (so they never overlap)."""
    out = image
    half = SIZE // 2
    for cell in rng.sample(range(4), count):
        width = rng.randint(36, 48)
        x0 = (cell % 2) * half + rng.randint(6, half - width - 6)
        y0 = (cell // 2) * half + rng.randint(6, half - width - 6)
        out = draw_in_box(out, shape, colour, (x0, y0, x0 + width, y0 + width))
    return out


def _numbered(sentences: list[str], images: int) -> list[str | int]:
    """Images placed as the needle suite places them (``image_positions``), each after its label "Image k: "."""
    before = image_positions(len(sentences), images)
    segments: list[str | int] = []
    text = ""
    for index in range(len(sentences) + 1):
        for image in before.get(index, []):
            segments += [text + f"Image {image + 1}: ", image]
            text = " "
        if index < len(sentences):
            text += sentences[index] + " "
    if text.strip():
        segments.append(text.rstrip())
    return segments
