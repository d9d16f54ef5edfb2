"""The prose haystack (``benchmarks.needles.prose``): reproducible, varied, and free of every word a smol-vl task
asks for or answers with, so the haystack never holds a competing answer."""

from __future__ import annotations

import random

from benchmarks.needles.images import COLOURS, SHAPES
from benchmarks.needles.prose import prose_sentences
from benchmarks.needles.smol import CONTENTS
from benchmarks.needles.suite import ABSENT_ANSWER, KEYS, _words

# Words the questions hinge on (what is asked about), and number words (counts and digits are answers).
_ASKED = {"key", "keys", "box", "boxes", "image", "images", "shape", "shapes", "color", "colour", "digit", "holds"}
_NUMBERS = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"}


def test_the_same_rng_gives_the_same_sentences() -> None:
    assert prose_sentences(random.Random(3), 50) == prose_sentences(random.Random(3), 50)
    assert prose_sentences(random.Random(3), 50) != prose_sentences(random.Random(4), 50)


def test_no_sentence_names_an_answer_or_what_a_question_asks_about() -> None:
    answers = set(COLOURS) | set(SHAPES) | set(KEYS) | set(CONTENTS) | {ABSENT_ANSWER}
    forbidden = answers | {str(n) for n in range(10)} | _NUMBERS | _ASKED
    words = {w for s in prose_sentences(random.Random(0), 5000) for w in _words(s)}
    assert words and not words & forbidden, sorted(words & forbidden)


def test_sentences_vary_unlike_the_repeat_haystack() -> None:
    """The point of prose: a 200-sentence haystack repeats few sentences (RULER's repeats five)."""
    sentences = prose_sentences(random.Random(1), 200)
    assert len(set(sentences)) >= 180
    assert all(s[0].isupper() and s.endswith(".") for s in sentences)
