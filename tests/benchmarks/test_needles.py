"""The needle suite (``benchmarks/needles``): determinism, where the needles land, and what each task needs."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.needles import TASKS, NeedleConfig, is_correct, make_sample, make_suite
from benchmarks.needles.images import COLOURS
from benchmarks.needles.suite import ABSENT_ANSWER, FILLER, KEYS


def _pixels(sample) -> list[bytes]:
    return [np.asarray(image).tobytes() for image in sample.images]


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_sample_other_seed_other_sample(task: str) -> None:
    config = NeedleConfig(task, sentences=20, images=3, depth=0.4)
    a, b, c = make_sample(config, 7), make_sample(config, 7), make_sample(config, 8)
    assert (a.segments, a.answer, a.meta, _pixels(a)) == (b.segments, b.answer, b.meta, _pixels(b))
    assert (a.segments, _pixels(a)) != (c.segments, _pixels(c))


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_text_needle_sits_at_its_depth_and_is_the_answer(depth: float) -> None:
    sample = make_sample(NeedleConfig("text", sentences=40, images=4, depth=depth), 3)
    sentences = [
        s.strip() + "." for part in sample.segments if isinstance(part, str) for s in part.split(".") if s.strip()
    ]
    where = sentences.index(f"The key is {sample.answer}.")
    assert where == round(depth * 40) == sample.meta["needle_sentence"]
    assert sample.answer in KEYS and len(sentences) == 41
    assert sum(isinstance(part, int) for part in sample.segments) == 4


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_image_needle_is_the_only_image_with_a_saturated_shape(depth: float) -> None:
    sample = make_sample(NeedleConfig("image", sentences=12, images=5, depth=depth), 11)
    assert sample.meta["needle_image"] == round(depth * 4) and sample.answer == sample.meta["colour"]
    target = np.array(COLOURS[sample.answer])
    for index, image in enumerate(sample.images):
        hits = int((np.abs(np.asarray(image).astype(int) - target).sum(-1) == 0).sum())
        # The shape is at least a 70-px triangle (2450 px); the background's tones never equal a needle colour.
        assert (hits >= 2450) == (index == sample.meta["needle_image"]), (index, hits)
    assert "The key is" not in sample.text() and not any(c in sample.text().lower() for c in COLOURS)


def test_mixed_needs_the_key_from_the_text_and_the_colour_from_the_image() -> None:
    for seed in range(20):
        sample = make_sample(NeedleConfig("mixed", sentences=16, images=3, depth=0.5), seed)
        key, colour = sample.meta["key"], sample.meta["colour"]
        assert sample.answer == f"{key} {colour}" and key in KEYS and colour in COLOURS
        assert f"The key is {key}." in sample.text() and colour not in sample.text().lower()  # colour: image only
        assert sample.meta["needle_sentence"] == 8 and sample.meta["needle_image"] == 1  # both at depth 0.5
        assert is_correct(f"{key}, {colour}.", sample.answer) and is_correct(f"{colour} {key}", sample.answer)
        assert not is_correct(key, sample.answer) and not is_correct(colour, sample.answer)  # one half is wrong


def test_absent_control_has_no_needle() -> None:
    sample = make_sample(NeedleConfig("absent", sentences=30, images=2), 0)
    assert sample.answer == ABSENT_ANSWER and sample.meta["needle_sentence"] is None
    words = sample.text("").replace(".", ". ").split(". ")
    assert all(w.strip() + "." in FILLER for w in words if w.strip())


def test_more_images_than_sentences_keeps_every_image_in_order() -> None:
    sample = make_sample(NeedleConfig("image", sentences=2, images=5, depth=1.0), 0)
    assert [part for part in sample.segments if isinstance(part, int)] == [0, 1, 2, 3, 4]


def test_openai_content_interleaves_text_and_images_and_ends_with_the_question() -> None:
    sample = make_sample(NeedleConfig("image", sentences=6, images=2), 0)
    parts = sample.openai_content()
    assert [p["type"] for p in parts].count("image_url") == 2
    assert parts[-1] == {"type": "text", "text": "\n" + sample.question}
    assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in parts if p["type"] == "image_url")


def test_suite_and_scoring() -> None:
    configs = [NeedleConfig(task, sentences=8, images=2) for task in TASKS]
    suite = make_suite(configs, samples_per_config=3, seed=5)
    assert [s.meta["seed"] for s in suite] == [5, 6, 7] * len(TASKS)
    assert is_correct("The key is Lemon.", "lemon") and is_correct("red", "red")
    assert not is_correct("lemonade", "lemon") and not is_correct("", "none")


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="images must be >= 1"):
        NeedleConfig("image", images=0)
    with pytest.raises(ValueError, match="depth"):
        NeedleConfig("text", depth=1.5)
    with pytest.raises(ValueError, match="task"):
        NeedleConfig("audio")  # type: ignore[arg-type]
