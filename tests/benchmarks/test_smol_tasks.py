"""smol-vl's tasks (``benchmarks.needles.smol``): determinism, where each needle is drawn, and that the answer is
what the image or the text shows; and that every answer ends a training row as its own tokens."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from benchmarks.build_smol_vl import SMOLLM2_DIR
from benchmarks.needles.images import COLOURS, SIZE
from benchmarks.needles.smol import CONTENTS, MAX_COUNT, SMOL_TASKS, SmolConfig, make_smol_sample
from benchmarks.needles.suite import ABSENT_ANSWER, FILLER, KEYS


def _colour_mask(image, colour: str) -> np.ndarray:
    """Pixels of exactly the needle colour (backgrounds are grey noise in 65..185 per channel, never one)."""
    return (np.asarray(image) == np.array(COLOURS[colour], dtype=np.uint8)).all(-1)


def pixels(sample) -> list[bytes]:
    return [np.asarray(image).tobytes() for image in sample.images]


def _needle_colours(image) -> list[str]:
    return [c for c in COLOURS if _colour_mask(image, c).sum() > 50]


@pytest.mark.parametrize("task", SMOL_TASKS)
def test_same_seed_same_sample_other_seed_other_sample(task: str) -> None:
    config = SmolConfig(task, sentences=12, images=3, depth=0.6)
    a, b, c = make_smol_sample(config, 5), make_smol_sample(config, 5), make_smol_sample(config, 6)
    assert (a.segments, a.answer, pixels(a)) == (b.segments, b.answer, pixels(b))
    assert (a.segments, pixels(a)) != (c.segments, pixels(c))


@pytest.mark.parametrize("task", ["colour", "shape", "digit", "count", "which", "lookup"])
@pytest.mark.parametrize(("images", "depth"), [(1, 0.3), (8, 0.0), (8, 1.0), (12, 0.5)])
def test_the_needle_image_sits_at_its_depth_and_only_it_shows_something(task: str, images: int, depth: float) -> None:
    sample = make_smol_sample(SmolConfig(task, sentences=10, images=images, depth=depth), 3)
    where = round(depth * (images - 1))
    assert sample.meta["needle_image"] == where
    shown = [bool(_needle_colours(image)) for image in sample.images]
    assert shown == [i == where for i in range(images)]
    if task == "colour":
        assert _needle_colours(sample.images[where]) == [sample.answer]
    if task == "which":
        assert sample.answer == str(where + 1)
        before = sample.segments[sample.segments.index(where) - 1]
        assert isinstance(before, str) and before.endswith(f"Image {where + 1}: ")


def test_images_are_numbered_in_order_among_the_sentences() -> None:
    sample = make_smol_sample(SmolConfig("key", sentences=20, images=5), 0)
    positions = [i for i, part in enumerate(sample.segments) if isinstance(part, int)]
    assert [sample.segments[i] for i in positions] == list(range(5))
    for number, i in enumerate(positions, start=1):
        assert str(sample.segments[i - 1]).endswith(f"Image {number}: ")
    assert sample.text().count("The key is") == 1


def test_count_draws_that_many_shapes_one_per_quadrant() -> None:
    for seed in range(12):
        sample = make_smol_sample(SmolConfig("count", sentences=2, images=1), seed)
        (colour,) = _needle_colours(sample.images[0])
        mask = _colour_mask(sample.images[0], colour)
        half = SIZE // 2
        quadrants = [mask[y : y + half, x : x + half].any() for y in (0, half) for x in (0, half)]
        assert 1 <= int(sample.answer) <= MAX_COUNT
        assert sum(quadrants) == int(sample.answer), seed


def test_digits_cover_zero_to_nine_and_are_drawn_large() -> None:
    seen = set()
    for seed in range(60):
        sample = make_smol_sample(SmolConfig("digit", sentences=0, images=1), seed)
        (colour,) = _needle_colours(sample.images[0])
        rows, cols = np.nonzero(_colour_mask(sample.images[0], colour))
        assert rows.max() - rows.min() >= 60, "a digit spans several 14-px patches"
        seen.add(sample.answer)
    assert seen == {str(d) for d in range(10)}


def test_lookup_states_every_colours_box_and_asks_for_the_drawn_one() -> None:
    for seed in range(8):
        sample = make_smol_sample(SmolConfig("lookup", sentences=16, images=4, depth=0.5), seed)
        text = sample.text()
        facts = {c: text.split(f"The {c} box holds ")[1].split(".")[0] for c in COLOURS}
        assert len(set(facts.values())) == len(COLOURS) and set(facts.values()) <= set(CONTENTS)
        (drawn,) = _needle_colours(sample.images[sample.meta["needle_image"]])
        assert sample.answer == facts[drawn]


def test_key_hides_the_answer_in_the_text_among_distractor_images() -> None:
    sample = make_smol_sample(SmolConfig("key", sentences=30, images=6, depth=0.25), 2)
    assert sample.answer in KEYS and f"The key is {sample.answer}." in sample.text()
    assert all(_needle_colours(image) for image in sample.images), "every image shows a distractor shape"


def test_absent_shows_nothing_and_answers_none() -> None:
    sample = make_smol_sample(SmolConfig("absent", sentences=8, images=10), 1)
    assert sample.answer == ABSENT_ANSWER
    assert not any(_needle_colours(image) for image in sample.images)
    assert sample.question == make_smol_sample(SmolConfig("colour", images=2), 1).question


@pytest.mark.parametrize(
    "kwargs", [{"task": "passkey"}, {"task": "colour", "images": 0}, {"task": "key", "depth": 1.5}]
)
def test_bad_configs_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SmolConfig(**kwargs)


def test_every_answer_ends_a_training_row_as_its_own_tokens() -> None:
    """``training_batch`` raises when an answer would merge with the template's tokens."""
    if not (SMOLLM2_DIR / "tokenizer.json").exists():
        pytest.skip(f"SmolLM2 not converted at {SMOLLM2_DIR}: run `make setup-smollm2`")
    from benchmarks.train_needle_vlm import training_batch
    from benchmarks.train_smol_vl import build_processor

    processor = build_processor()
    samples = [
        make_smol_sample(SmolConfig(task, sentences=3, images=2), seed) for task in SMOL_TASKS for seed in range(6)
    ]
    inputs, spans = training_batch(processor, samples)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(int(inputs["input_ids"][row, end - 1]) == im_end for row, (_, end) in enumerate(spans))
    assert (inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == 64 * 2 * len(
        samples
    )


# sha256 of the text segments, answers and replies of 3 seeds of every task (9 sentences, 3 images, depth 0.4),
# computed with the code of commit 47b046f, before ``haystack`` existed.
FILLER_DIGEST_BEFORE_HAYSTACK = "b0139f2c8cd8f087d2602386e4133ae34a92b26b49569eb06220f4b58fd1a12a"


def test_filler_samples_are_drawn_as_before_the_haystack_field() -> None:
    """The trained weights' held-out set and every earlier result are filler samples: adding ``haystack`` must not
    redraw them (seed key and order of draws both)."""
    config = SmolConfig("colour", sentences=7, images=2, depth=0.25)
    assert config.seed_key() == repr(config).replace(", haystack='filler'", "")
    assert SmolConfig("colour", 7, 2, 0.25, "prose").seed_key() != config.seed_key()
    digest = hashlib.sha256()
    for task in SMOL_TASKS:
        for seed in range(3):
            sample = make_smol_sample(SmolConfig(task, sentences=9, images=3, depth=0.4), seed)
            digest.update(json.dumps([sample.segments, sample.answer, sample.meta["reply"]]).encode())
    assert digest.hexdigest() == FILLER_DIGEST_BEFORE_HAYSTACK


@pytest.mark.parametrize("task", SMOL_TASKS)
def test_a_prose_haystack_keeps_each_task_and_its_needle(task: str) -> None:
    filler = make_smol_sample(SmolConfig(task, sentences=20, images=6, depth=0.4), 9)
    prose = make_smol_sample(SmolConfig(task, sentences=20, images=6, depth=0.4, haystack="prose"), 9)
    assert prose.question == filler.question and prose.meta["haystack"] == "prose"
    assert not any(sentence in prose.text() for sentence in FILLER) and len(prose.text()) > 2 * len(filler.text())
    if task == "colour":
        assert _needle_colours(prose.images[prose.meta["needle_image"]]) == [prose.answer]
    if task in ("key", "lookup"):
        assert (f"The key is {prose.answer}." in prose.text()) == (task == "key")
        assert (f"holds {prose.answer}." in prose.text()) == (task == "lookup")


def test_an_unknown_haystack_is_refused() -> None:
    with pytest.raises(ValueError, match="haystack"):
        SmolConfig("colour", haystack="novel")
