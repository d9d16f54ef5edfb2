"""SmolLM2-135M-Instruct as the language model of a Qwen2-VL checkpoint (``smol-vl``), so MadaKV can be measured on
a VLM whose language attention is a real pretrained LM's (issue 16).

    python -m benchmarks.build_smol_vl [--out .models/smol-qwen2-vl] [--vision VISION.safetensors | random]

The checkpoint is assembled from SmolLM2's weights as ``make setup-smollm2`` converts them and a vision side
(patch embedding, vision blocks, merger): by default the one ``benchmarks.train_smol_vl`` trained
(``benchmarks/models/smol-vl-vision``), with ``--vision random`` one drawn from ``--seed``. Assembly is
deterministic, so the full checkpoint never has to be committed, only the vision part.

Why the text path is SmolLM2's exactly:

- Qwen2's decoder is Llama's plus q/k/v biases; they are zero here.
- Qwen2-VL rotates with M-RoPE: head_dim/2 frequencies split into temporal, height and width sections
  (:data:`MROPE_SECTION`). For text every section gets the same position, which is 1-D RoPE with SmolLM2's base.
- The tokenizer is SmolLM2's, with Qwen2-VL's four vision control tokens appended (ids 49152-49155). Their input
  rows start at the mean of SmolLM2's embedding rows (an image token's row is replaced by the vision features
  anyway). SmolLM2 ties its LM head to the embedding; here the head is a copy, with zero rows for the vision
  tokens: a tied mean row would score like a frequent word (a logit of ~20, measured) and be generated, a zero
  row scores 0, far below the next word. Text logits over SmolLM2's own 49,152 tokens are unchanged.
- The chat template is Qwen2-VL's (an image is ``<|vision_start|><|image_pad|>...<|vision_end|>``) with SmolLM2's
  own default system prompt, so a text chat renders exactly as SmolLM2's template renders it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from madakv_sglang import checkpoints

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen2VLForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = ROOT / ".models" / "smollm2-135m-instruct"
DEFAULT_OUT = ROOT / ".models" / "smol-qwen2-vl"  # "qwen2-vl" in the path: SGLang's frontend picks its template by it
TRAINED_VISION = ROOT / "benchmarks" / "models" / "smol-vl-vision" / "vision.safetensors"
STAMP = ".smol-vl.json"
LANGUAGE_MODEL = "model.language_model."  # the key prefix of Qwen2-VL's decoder

SMOLLM2_VOCAB = 49152
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
VISION_START, VISION_END, IMAGE_TOKEN, VIDEO_TOKEN = range(SMOLLM2_VOCAB, SMOLLM2_VOCAB + len(VISION_TOKENS))
VOCAB = SMOLLM2_VOCAB + len(VISION_TOKENS)
# Qwen2-VL's [16, 24, 24] of head_dim 128, halved for SmolLM2's head_dim 64 (the sections sum to head_dim / 2).
MROPE_SECTION = [8, 12, 12]
# The vision side we train: a 4-block ViT of width 192 on 14-px patches, 2x2 patches merged into one LM token.
VISION_CONFIG: dict[str, Any] = {
    "depth": 4,
    "embed_dim": 192,
    "num_heads": 4,
    "mlp_ratio": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "in_channels": 3,
}
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_TEMPLATE = checkpoints.CHAT_TEMPLATE.replace("You are a helpful assistant.", SYSTEM_PROMPT)


def _smollm2_config(smollm2_dir: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((smollm2_dir / "config.json").read_text())
    if config.get("model_type") != "llama" or config["vocab_size"] != SMOLLM2_VOCAB:
        raise ValueError(f"{smollm2_dir} does not hold SmolLM2's Llama config (run `make setup-smollm2`)")
    return config


def text_config(smollm2_dir: Path) -> dict[str, Any]:
    """Qwen2-VL's text config with SmolLM2's shapes, norm epsilon and RoPE base."""
    smol = _smollm2_config(smollm2_dir)
    if smol["hidden_size"] // smol["num_attention_heads"] != smol["head_dim"] or 2 * sum(MROPE_SECTION) != 64:
        raise ValueError("SmolLM2's head_dim is not the 64 that MROPE_SECTION is for")
    theta = smol.get("rope_parameters", {}).get("rope_theta", smol.get("rope_theta"))
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return {key: smol[key] for key in keys} | {
        "vocab_size": VOCAB,
        "rms_norm_eps": smol["rms_norm_eps"],
        "hidden_act": smol["hidden_act"],
        "bos_token_id": smol["bos_token_id"],
        "eos_token_id": smol["eos_token_id"],
        "pad_token_id": smol["pad_token_id"],
        "max_position_embeddings": checkpoints.MAX_POSITIONS,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(theta), "mrope_section": MROPE_SECTION},
    }


def build_tokenizer(smollm2_dir: Path = SMOLLM2_DIR) -> PreTrainedTokenizerFast:
    """SmolLM2's tokenizer with the vision control tokens appended and Qwen2-VL's chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    if tok.get_vocab_size() != SMOLLM2_VOCAB:
        raise ValueError(f"{smollm2_dir}: a vocabulary of {tok.get_vocab_size()}, expected {SMOLLM2_VOCAB}")
    checkpoints.append_special_tokens(tok, {text: SMOLLM2_VOCAB + i for i, text in enumerate(VISION_TOKENS)})
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=list(VISION_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=checkpoints.MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def build_model(
    smollm2_dir: Path = SMOLLM2_DIR, vision: dict[str, torch.Tensor] | None = None, seed: int = 0
) -> Qwen2VLForConditionalGeneration:
    """The assembled model in fp32: SmolLM2's decoder, and ``vision`` (``model.visual.*`` tensors) or a vision
    side drawn from ``seed``."""
    from safetensors.torch import load_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision_config = VISION_CONFIG | {"hidden_size": _smollm2_config(smollm2_dir)["hidden_size"]}
    config = Qwen2VLConfig(
        text_config=text_config(smollm2_dir),
        vision_config=vision_config,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).float().eval()
    state = model.state_dict()
    smol = load_file(str(smollm2_dir / "model.safetensors"))
    text = {key.removeprefix("model."): value for key, value in smol.items() if key.startswith("model.")}
    embedding = text["embed_tokens.weight"]
    text["embed_tokens.weight"] = torch.cat([embedding, embedding.mean(0, keepdim=True).expand(len(VISION_TOKENS), -1)])
    state["lm_head.weight"] = torch.cat([embedding, embedding.new_zeros(len(VISION_TOKENS), embedding.shape[1])])
    biases = ("q_proj.bias", "k_proj.bias", "v_proj.bias")  # Qwen2's, which Llama has not: zero
    placed: set[str] = set()
    for key in state:
        name = key.removeprefix(LANGUAGE_MODEL)
        if name == key:
            continue  # the vision side, or the head set above
        if name.endswith(biases):
            state[key] = torch.zeros_like(state[key])
        elif name not in text or text[name].shape != state[key].shape:
            raise ValueError(f"SmolLM2 has no {name} of shape {tuple(state[key].shape)}")
        else:
            state[key] = text[name].float()
            placed.add(name)
    if placed != set(text):
        raise ValueError(f"SmolLM2's {sorted(set(text) - placed)[:3]} have no place in the Qwen2-VL language model")
    if vision is not None:
        unknown = sorted(set(vision) - {key for key in state if key.startswith("model.visual.")})
        if unknown:
            raise ValueError(f"the vision weights hold {unknown[:3]}, which this model has not")
        state.update({key: value.float() for key, value in vision.items()})
    model.load_state_dict(state)
    return model


def _stamp(smollm2_dir: Path, vision_path: Path | None, seed: int) -> dict[str, Any]:
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(Path(checkpoints.__file__).read_bytes())
    if vision_path is not None:
        digest.update(vision_path.read_bytes())
    smol = smollm2_dir / "model.safetensors"
    return {"code_and_vision": digest.hexdigest()[:16], "smollm2": smol.stat().st_size, "seed": seed}


def assemble(
    out_dir: Path = DEFAULT_OUT, smollm2_dir: Path = SMOLLM2_DIR, vision_path: Path | None = None, seed: int = 0
) -> Path:
    """Write the servable checkpoint (weights, config, tokenizer, processor) to ``out_dir``; returns at once when
    its stamp shows it was assembled from the same code, SmolLM2 and vision weights."""
    from safetensors.torch import load_file
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    stamp = _stamp(smollm2_dir, vision_path, seed)
    try:
        if json.loads((out_dir / STAMP).read_text()) == stamp:
            return out_dir
    except (OSError, ValueError):
        pass
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAMP).unlink(missing_ok=True)
    vision = None if vision_path is None else load_file(str(vision_path))
    model = build_model(smollm2_dir, vision, seed)
    smol = _smollm2_config(smollm2_dir)
    model.generation_config = GenerationConfig(
        **{key: smol[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    )
    model.save_pretrained(out_dir)
    checkpoints.patch_config(out_dir)
    tokenizer = build_tokenizer(smollm2_dir)
    tokenizer.save_pretrained(out_dir)
    checkpoints.qwen_vl_processor("qwen2_vl", tokenizer, CHAT_TEMPLATE).save_pretrained(out_dir)
    (out_dir / STAMP).write_text(json.dumps(stamp) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.build_smol_vl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--smollm2", type=Path, default=SMOLLM2_DIR, help="SmolLM2 as `make setup-smollm2` writes it")
    parser.add_argument(
        "--vision", default=str(TRAINED_VISION), help="vision weights, or 'random' (default: the trained ones)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the random vision side's seed")
    args = parser.parse_args(argv)
    vision = None if args.vision == "random" else Path(args.vision)
    print(assemble(args.out, args.smollm2, vision, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
