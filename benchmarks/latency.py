"""Decode latency and KV memory of the HF path against the full cache (the paper's Table 2, at 7B shapes).

    python -m benchmarks.latency --out benchmarks/results/latency.json          # on a GPU, one call

The decoders of Qwen2.5-VL-7B (28 layers, 28 query / 4 KV heads) and LLaVA-1.5-7B (Llama-2-7B: 32 layers,
32 / 32 heads) are built from their shapes with random bf16 weights: nothing can be downloaded here, and latency
and memory depend on the shapes, not on the weights. A prompt of n tokens is text ids with runs of the image
placeholder id (``--visual-share`` of it, in images of the model's token count), so the policies see the same
modality split a multi-image prompt has; the vision tower is left out, as it only runs at prefill. For every
shape, context n and policy x budget, ``madakv_sglang.hf.generate`` prefills, evicts and decodes
``--decode-tokens`` greedy tokens; the table holds the median decode step (``HFResult.step_seconds``), the K/V
bytes the dense and the compressed caches hold (the HF cache pads every head of a layer to its fullest, so both
the padded and the kept-cell bytes are shown) and the ratios against ``full`` from the same run.

Absolute times mean something only on a GPU; on CPU ``--shapes tiny`` checks the script end to end.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.accuracy import POLICIES, policy_config
from madakv_sglang import hf


@dataclass(frozen=True)
class Shape:
    """A decoder to build with random weights, and how its prompts hold images."""

    architecture: str  # a transformers config class name
    config: dict[str, Any]
    image_token_id: int
    image_tokens: int  # placeholder tokens per image


SHAPES: dict[str, Shape] = {
    # Qwen2.5-VL-7B-Instruct's language model; a 448x448 image is 256 tokens after the 2x2 merge.
    "qwen2.5-vl-7b": Shape(
        "Qwen2Config",
        {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "rope_theta": 1_000_000.0,
        },
        151655,
        256,
    ),
    # LLaVA-1.5-7B's language model (Llama-2-7B, vocab grown by the image token); 576 tokens per image.
    "llava-1.5-7b": Shape(
        "LlamaConfig",
        {
            "vocab_size": 32064,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
        },
        32000,
        576,
    ),
    # For CPU checks of this script.
    "tiny": Shape(
        "Qwen2Config",
        {
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        500,
        16,
    ),
}


@dataclass
class Row:
    shape: str
    context: int
    visual_tokens: int
    policy: str
    budget: float
    decode_ms: float  # median of the decode steps after the first
    kv_bytes_full: int
    kv_bytes_padded: int  # what the HF cache holds: every head of a layer padded to its fullest
    kv_bytes_kept: int  # the kept cells alone (a paged pool such as SGLang's holds this)
    speedup: float = 1.0  # full's decode_ms / this row's, same shape and context
    kv_ratio: float = 1.0  # kv_bytes_kept / kv_bytes_full


def build_model(shape: Shape, context: int, device: torch.device, dtype: torch.dtype) -> Any:
    """The decoder with transformers' random init, created directly on ``device``."""
    import transformers

    config = getattr(transformers, shape.architecture)(
        **shape.config, max_position_embeddings=context + 1024, tie_word_embeddings=False
    )
    config.image_token_id = shape.image_token_id  # read by hf.placeholder_mask: these positions count as visual
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def prompt_ids(
    shape: Shape, context: int, visual_share: float, window: int, generator: torch.Generator
) -> torch.Tensor:
    """``[1, context]`` ids: text and whole images interleaved, ending in at least ``window`` text tokens."""
    images = int(visual_share * context) // shape.image_tokens
    text = context - images * shape.image_tokens
    if images < 1 or text < window + images:
        raise ValueError(
            f"n={context} cannot hold {visual_share:.0%} visual tokens in {shape.image_tokens}-token "
            f"images and a {window}-token question"
        )
    ids = torch.randint(0, shape.image_token_id, (context,), generator=generator)  # text: never the image id
    gap = (text - window) // images  # text tokens before each image
    for i in range(images):
        start = (i + 1) * gap + i * shape.image_tokens
        ids[start : start + shape.image_tokens] = shape.image_token_id
    return ids[None]


def measure(
    model: Any, shape: str, ids: torch.Tensor, name: str, budget: float, window: int, decode_tokens: int
) -> Row:
    """One policy x budget on one prompt; the ratios against full are filled in by the caller."""
    # no eos: exactly decode_tokens steps after the first token
    result = hf.generate(model, {"input_ids": ids}, policy_config(name, budget, window), decode_tokens + 1)
    steps = result.step_seconds[1:] or result.step_seconds  # the first step also warms the attention kernels
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cell_bytes = 2 * head_dim * next(model.parameters()).element_size()  # one K and one V vector
    visual = int(hf.placeholder_mask(model, ids).sum())  # the positions the policies treat as image tokens
    return Row(
        shape=shape,
        context=ids.shape[1],
        visual_tokens=visual,
        policy=name,
        budget=budget if name != "full" else 1.0,
        decode_ms=1e3 * statistics.median(steps),
        kv_bytes_full=result.kv_bytes_full,
        kv_bytes_padded=result.kv_bytes_kept,
        kv_bytes_kept=int(result.selection.keep.sum()) * cell_bytes,
    )


def markdown(rows: list[Row]) -> str:
    lines = [
        "| shape | n | policy | budget | decode ms/token | speed-up vs full | KV MiB kept (padded) | KV vs full |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.context} | {r.policy} | {r.budget:g} | {r.decode_ms:.2f} | {r.speedup:.2f}x | "
            f"{r.kv_bytes_kept / 2**20:.1f} ({r.kv_bytes_padded / 2**20:.1f}) | {r.kv_ratio:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["qwen2.5-vl-7b", "llava-1.5-7b"], choices=list(SHAPES))
    parser.add_argument("--contexts", nargs="+", type=int, default=[8192, 16384, 32768])
    parser.add_argument("--policies", nargs="+", default=["madakv", "snapkv"], choices=list(POLICIES))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.2])
    parser.add_argument("--visual-share", type=float, default=0.8, help="share of the prompt that is image tokens")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    rows: list[Row] = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        model = build_model(shape, max(args.contexts), device, dtype)
        warm = prompt_ids(shape, min(args.contexts), args.visual_share, args.window, torch.Generator().manual_seed(0))
        measure(model, shape_name, warm.to(device), "full", 1.0, args.window, 2)  # first-call costs, not timed
        for context in args.contexts:
            ids = prompt_ids(shape, context, args.visual_share, args.window, torch.Generator().manual_seed(context)).to(
                device
            )
            grid = [("full", 1.0)] + [(p, b) for p in args.policies for b in args.budgets]
            block = []
            for name, budget in grid:
                row = measure(model, shape_name, ids, name, budget, args.window, args.decode_tokens)
                block.append(row)
                print(f"{shape_name} n={context} {name}:{budget:g} {row.decode_ms:.2f} ms/token", file=sys.stderr)
            for row in block:  # ratios against full of the same shape and context, measured moments apart
                row.speedup = block[0].decode_ms / row.decode_ms
                row.kv_ratio = row.kv_bytes_kept / block[0].kv_bytes_full
            rows += block
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    command = "python -m benchmarks.latency " + " ".join(argv if argv is not None else sys.argv[1:])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    record = {
        "command": command,
        "device": device_name,
        "dtype": str(dtype),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": [asdict(r) for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"`{command}` on {device_name}\n\n{markdown(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
