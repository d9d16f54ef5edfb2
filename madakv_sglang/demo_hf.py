"""``python -m madakv_sglang.demo_hf``: every policy on a tiny Qwen2-VL through the transformers path.

A random-weight Qwen2-VL (built from a config, nothing downloaded) reads a prompt with an image; every policy
compresses the cache after prefill at the same budget and decodes greedily from it. The table shows the KV
bytes each one really holds and whether its tokens match the full cache. No server is started; the serving
demo, with MadaKV inside SGLang, is ``python -m madakv_sglang.demo``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from madakv_sglang import hf, tiny_models
from madakv_sglang.config import Budget, PolicyConfig

POLICIES = ("full", "madakv", "snapkv", "adakv", "pyramidkv", "lookm", "streamingllm", "h2o")


def run(budget: str, window: int, new_tokens: int, min_prompt: int = 0) -> list[dict]:
    model, inputs = tiny_models.qwen2_vl(seed=0)
    rows = []
    reference: list[int] | None = None
    for policy in POLICIES:
        cfg = PolicyConfig(policy=policy, budget=Budget.parse(budget), window=window, min_prompt=min_prompt)
        result = hf.generate(model, inputs, cfg, new_tokens)
        reference = result.tokens if policy == "full" else reference
        rows.append(
            {
                "policy": policy,
                "budget": str(cfg.budget),
                "prompt_tokens": result.prompt_len,
                "visual_tokens": int((inputs["input_ids"] == tiny_models.IMAGE_TOKEN).sum()),
                "kv_bytes_full": result.kv_bytes_full,
                "kv_bytes_kept": result.kv_bytes_kept,
                "reclaimed_fraction": round(1 - result.kv_bytes_kept / result.kv_bytes_full, 4),
                "kept_visual": int(result.selection.kept_visual.sum()),
                "tokens": result.tokens,
                "matches_full": result.tokens == reference,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m madakv_sglang.demo_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="0.2")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument(
        "--min-prompt",
        type=int,
        default=0,
        help="prompts shorter than this are kept whole (default 0: the demo's prompt is shorter than "
        "the server default, 256, and would not be compressed at all)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = run(args.budget, args.window, args.new_tokens, args.min_prompt)
    if args.json:
        print(json.dumps({"model": "tiny Qwen2-VL (random weights)", "results": rows}))
        return 0
    first = rows[0]
    print(
        f"tiny Qwen2-VL (random weights): prompt {first['prompt_tokens']} tokens, {first['visual_tokens']} visual; "
        f"budget {args.budget}, window {args.window}\n"
    )
    print(f"{'policy':<13}{'KV bytes':>10}{'reclaimed':>11}{'kept visual':>13}  tokens (= full?)")
    for row in rows:
        print(
            f"{row['policy']:<13}{row['kv_bytes_kept']:>10}{100 * row['reclaimed_fraction']:>10.1f}%"
            f"{row['kept_visual']:>13}  {row['tokens']} {'=' if row['matches_full'] else '!='}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
