"""Tiny transformers models with random (seeded) weights and hand-built inputs, for the HF-path tests and demo.

Nothing is downloaded: each builder makes a config, instantiates the model in fp32 and returns it with one
prompt (``input_ids`` plus whatever the vision tower needs). Text dims are shared: vocab 512, hidden 64,
3 layers, 4 query heads, 2 KV heads (GQA, G = 2), head_dim 16.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

VOCAB = 512
IMAGE_TOKEN = 500
VIDEO_TOKEN = 501
VISION_START = 502
VISION_END = 503
_TEXT: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    # No special ids: HF's generate (the reference) must never stop early, and the Qwen defaults lie outside
    # this vocabulary.
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}

Built = tuple["PreTrainedModel", dict[str, Any]]


def _text_ids(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random ordinary token ids (below every special id)."""
    return torch.randint(1, IMAGE_TOKEN, (count,), generator=generator)


def _finish(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    """Re-draw every parameter from a seeded normal so runs are reproducible and attention is not flat."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.float().eval()


def _text_model(config_cls: Any, model_cls: Any, seed: int, text_len: int) -> Built:
    config = config_cls(**_TEXT)
    config._attn_implementation = "sdpa"
    model = _finish(model_cls(config), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    return model, {"input_ids": _text_ids(text_len, generator)[None]}


def llama(seed: int = 0, text_len: int = 40) -> Built:
    """A text-only Llama; ``input_ids`` of ``text_len`` tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _text_model(LlamaConfig, LlamaForCausalLM, seed, text_len)


def qwen2(seed: int = 0, text_len: int = 40) -> Built:
    """A text-only Qwen2 (q/k/v biases, unlike Llama)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _text_model(Qwen2Config, Qwen2ForCausalLM, seed, text_len)


def _qwen_vl_prompt(
    seed: int, grid: tuple[int, int, int], merge: int, temporal_patch: int, patch: int, image: bool
) -> dict[str, Any]:
    """``text + <vision_start> image tokens <vision_end> + text`` with flattened patches, as the processor makes.

    ``pixel_values`` is ``[t*h*w, 3 * temporal_patch * patch**2]``; the image takes ``t*h*w / merge**2`` tokens.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    head, tail = _text_ids(12, generator), _text_ids(20, generator)
    if not image:
        ids = torch.cat([head, tail])[None]
        return {"input_ids": ids, "mm_token_type_ids": torch.zeros_like(ids, dtype=torch.int32)}
    t, h, w = grid
    n_image = t * h * w // merge**2
    image_ids = torch.full((n_image,), IMAGE_TOKEN)
    ids = torch.cat([head, torch.tensor([VISION_START]), image_ids, torch.tensor([VISION_END]), tail])[None]
    pixels = torch.randn(t * h * w, 3 * temporal_patch * patch * patch, generator=generator)
    return {
        "input_ids": ids,
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([list(grid)]),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).to(torch.int32),
    }


def qwen_vl_ids() -> dict[str, Any]:
    """The vision token ids of every Qwen VL config on this vocabulary (the trained needle model's too)."""
    return {
        "image_token_id": IMAGE_TOKEN,
        "video_token_id": VIDEO_TOKEN,
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
    }


def _mrope_text() -> dict[str, Any]:
    # mrope_section must sum to head_dim / 2 (the default [16, 24, 24] is for head_dim 128).
    return dict(_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})


def qwen2_vl(seed: int = 0, image: bool = True) -> Built:
    """Qwen2-VL with an 8x8-patch image (16 image tokens after the 2x2 merge); ``image=False``: text only."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2}
    config = Qwen2VLConfig(text_config=_mrope_text(), vision_config=vision, **qwen_vl_ids())
    config._attn_implementation = "sdpa"
    model = _finish(Qwen2VLForConditionalGeneration(config), seed)
    return model, _qwen_vl_prompt(seed, (1, 8, 8), merge=2, temporal_patch=2, patch=14, image=image)


def qwen2_5_vl(seed: int = 0, image: bool = True) -> Built:
    """Qwen2.5-VL (windowed vision attention) with the same image layout as :func:`qwen2_vl`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    config = Qwen2_5_VLConfig(text_config=_mrope_text(), vision_config=vision, **qwen_vl_ids())
    config._attn_implementation = "sdpa"
    model = _finish(Qwen2_5_VLForConditionalGeneration(config), seed)
    return model, _qwen_vl_prompt(seed, (1, 8, 8), merge=2, temporal_patch=2, patch=14, image=image)


def llava(seed: int = 0) -> Built:
    """LLaVA (CLIP tower, Llama text) with a 56x56 image: 16 patches of 14 px, 16 image tokens (CLS dropped)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_TEXT),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=16,
        vision_feature_layer=-1,
    )
    config._attn_implementation = "sdpa"
    model = _finish(LlavaForConditionalGeneration(config), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    ids = torch.cat([_text_ids(10, generator), torch.full((16,), IMAGE_TOKEN), _text_ids(20, generator)])[None]
    return model, {"input_ids": ids, "pixel_values": torch.randn(1, 3, 56, 56, generator=generator)}


BUILDERS: dict[str, Callable[..., Built]] = {
    "llama": llama,
    "qwen2": qwen2,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "llava": llava,
}
