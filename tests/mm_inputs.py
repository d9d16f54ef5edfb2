"""Multimodal inputs for the engine tests: tiny Qwen VL checkpoints with non-flat attention, test images,
chat prompts built by the checkpoint's own processor, and madakv's reclaim lines from a server log.

The same chat goes to both sides: transformers gets the processor's tensors (``input_ids``, ``pixel_values``,
``image_grid_thw``, ``mm_token_type_ids``), SGLang gets the rendered text plus the image files, and expands the
placeholders itself; the tests then check that both prompts are the same token for token.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from madakv_sglang import checkpoints
from madakv_sglang.log_lines import request_lines
from madakv_sglang.tiny_models import IMAGE_TOKEN, VIDEO_TOKEN

# The tiny builders draw every weight from N(0, 0.1^2): q.k is ~1e-2, attention is almost uniform, psi is flat,
# and MadaKV's modality split then equals the token-count split (nothing to test). Scaling the decoder's q and k
# projections (weights and biases) by 10 multiplies the logits by 100: heads get distinct preferences (on the
# tests' one-image chat, Qwen2-VL's heads keep visual shares of 0.12-0.44 of their non-window cells where the
# prompt has 0.41) while the HF path and the engine still agree exactly in fp32.
ATTENTION_SHARPEN = 10.0
_QK = re.compile(r"(^|\.)layers\.\d+\.self_attn\.(q|k)_proj\.(weight|bias)$")

# Test images: (width, height) -> image tokens after the 14-px patches and the 2x2 merge.
IMAGE_SIZES = {"square": (224, 224), "wide": (336, 168), "small": (112, 56)}  # 64, 72 and 8 tokens

WORDS = [
    "the",
    "a",
    "red",
    "house",
    "green",
    "field",
    "blue",
    "sky",
    "white",
    "clouds",
    "cat",
    "sits",
    "on",
    "table",
    "near",
    "window",
    "sun",
    "shines",
    "through",
    "glass",
    "three",
    "dogs",
    "play",
    "in",
    "park",
    "child",
    "runs",
    "after",
    "yellow",
    "ball",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "car",
    "is",
    "black",
    "parked",
    "in",
    "front",
    "of",
    "building",
    "store",
    "opens",
    "from",
    "nine",
    "to",
    "five",
    "every",
    "day",
    "photo",
    "was",
    "taken",
    "at",
    "night",
    "busy",
    "city",
    "street",
    "many",
    "lights",
    "shops",
    "people",
    "walking",
    "man",
    "woman",
    "stand",
    "bridge",
    "river",
    "boats",
    "below",
    "weather",
    "warm",
    "sunny",
    "wind",
]


def write_vl_checkpoint(kind: str, out_dir: Path, seed: int = 0, sharpen: float = ATTENTION_SHARPEN) -> Path:
    """``checkpoints.write_checkpoint`` then scale the text decoder's q/k projections by ``sharpen``.

    The vision tower is untouched (its attention uses a fused ``qkv``). Both the HF path and the engine load
    these files, so they still run the same weights.
    """
    from safetensors.torch import load_file, save_file

    checkpoints.write_checkpoint(kind, out_dir, seed)
    weights = Path(out_dir) / "model.safetensors"
    tensors = load_file(weights)
    scaled = [name for name in tensors if _QK.search(name) and "visual" not in name]
    if not scaled:
        raise RuntimeError(f"no decoder q/k projection found in {weights}")
    for name in scaled:
        tensors[name] = tensors[name] * sharpen
    save_file(tensors, weights, metadata={"format": "pt"})
    (Path(out_dir) / checkpoints.STAMP).unlink(missing_ok=True)  # the files no longer match the builder
    return Path(out_dir)


def write_images(out_dir: Path) -> dict[str, Path]:
    """One PNG per entry of :data:`IMAGE_SIZES`, plus ``square2`` (same size as ``square``, other pixels)."""
    paths = {
        name: checkpoints.write_test_image(out_dir / f"{name}.png", size, seed=i)
        for i, (name, size) in enumerate(IMAGE_SIZES.items())
    }
    paths["square2"] = checkpoints.write_test_image(out_dir / "square2.png", IMAGE_SIZES["square"], seed=7)
    return paths


def words(count: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count)).capitalize() + "."


@dataclass
class Chat:
    """One user turn: text pieces and images in order (``None`` in ``parts`` marks where an image goes)."""

    parts: list[str | None]
    images: list[Path] = field(default_factory=list)
    videos: list[list[Path]] = field(default_factory=list)  # frames; a video goes where a part is ``"<video>"``

    def messages(self) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = []
        for part in self.parts:
            if part is None:
                content.append({"type": "image"})
            elif part == "<video>":
                content.append({"type": "video"})
            else:
                content.append({"type": "text", "text": part})
        return [{"role": "user", "content": content}]


def render(processor: Any, chat: Chat) -> str:
    return str(processor.apply_chat_template(chat.messages(), add_generation_prompt=True, tokenize=False))


def hf_inputs(processor: Any, chat: Chat) -> dict[str, torch.Tensor]:
    """The processor's tensors for ``hf.generate`` (no attention mask: one unpadded prompt)."""
    from PIL import Image

    kwargs: dict[str, Any] = {}
    if chat.images:
        kwargs["images"] = [Image.open(p).convert("RGB") for p in chat.images]
    if chat.videos:
        kwargs["videos"] = [[Image.open(p).convert("RGB") for p in frames] for frames in chat.videos]
    inputs = dict(processor(text=[render(processor, chat)], return_tensors="pt", **kwargs))
    inputs.pop("attention_mask", None)
    return inputs


def visual_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: the processor's ``<|image_pad|>`` and ``<|video_pad|>`` positions of one prompt."""
    ids = input_ids.reshape(-1)
    return (ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)


def prompt_ids(output: dict[str, Any]) -> list[int]:
    """The engine's prompt ids from ``input_token_logprobs`` (needs ``logprob_start_len: 0``). SGLang replaces
    the image placeholders by per-image pad values, so only the text positions keep the processor's ids."""
    return [int(token) for _, token, *_ in output["meta_info"]["input_token_logprobs"]]


def reclaim_lines(log: str) -> dict[str, tuple[int, int]]:
    """rid -> (prompt slots, kept slots) from madakv's per-request log line."""
    return {line.rid: (line.prompt_slots, line.kept_slots) for line in request_lines(log) if line.compressed}
