"""The tiny text model the engine tests serve, its random prompts, and a greedy ``/generate`` call."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from madakv_sglang import tiny_models
from tests.sglang_server import Server


def write_tiny_qwen2(path: Path) -> Path:
    """The seeded tiny Qwen2 (3 layers, 2 KV heads) as a servable checkpoint with a 2048-token context."""
    model, _ = tiny_models.qwen2(seed=0)
    model.config.max_position_embeddings = 2048
    model.config.architectures = ["Qwen2ForCausalLM"]
    model.save_pretrained(path)
    return path


def random_prompts(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    """Seeded token ids below the image token, one prompt per length."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, tiny_models.IMAGE_TOKEN, (n,), generator=generator).tolist() for n in lengths]


def generate(
    server: Server, ids: list[int], max_new: int, custom: dict[str, Any] | None = None, rid: str | None = None
) -> dict[str, Any]:
    """Greedy ``/generate`` of exactly ``max_new`` tokens, with their logprobs and optional ``custom_params``."""
    sampling: dict[str, Any] = {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True}
    if custom:
        sampling["custom_params"] = custom
    payload: dict[str, Any] = {"input_ids": ids, "sampling_params": sampling, "return_logprob": True}
    if rid:
        payload["rid"] = rid
    return dict(server.post("/generate", payload))


def finite_logprobs(output: dict[str, Any]) -> bool:
    return all(math.isfinite(entry[0]) for entry in output["meta_info"]["output_token_logprobs"])
