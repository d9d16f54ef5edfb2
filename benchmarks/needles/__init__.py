"""The multimodal needle suite: text, image and mixed needles in haystacks of sentences and images (``suite``),
drawn with PIL (``images``)."""

from benchmarks.needles.suite import (
    TASKS,
    NeedleConfig,
    NeedleSample,
    is_correct,
    make_sample,
    make_suite,
    prompt_inputs,
    prompt_text,
)

__all__ = [
    "TASKS",
    "NeedleConfig",
    "NeedleSample",
    "is_correct",
    "make_sample",
    "make_suite",
    "prompt_inputs",
    "prompt_text",
]
