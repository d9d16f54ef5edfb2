"""``python -m madakv_sglang.plan``: what a policy would keep, per layer and head, without running a model.

Scores are synthetic (seeded; heads get random modality preferences, middle layers attend more sharply, as the
paper observed) or loaded from a ``.pt`` file holding ``{"scores": [L, H, n], "visual": [n]}``. Prints kept
counts by modality, totals, the slot count M and the packing waste; ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from madakv_sglang.config import ConfigError, PolicyConfig
from madakv_sglang.layout import packing_waste, slot_count
from madakv_sglang.policies import PolicyInputs, get_policy
from madakv_sglang.policies.base import SKIP_REASONS, budget_state
from madakv_sglang.settings import add_setting_arguments, config_from_arguments, setting_names


def synthetic_scores(layers: int, heads: int, prompt: int, visual_frac: float, window: int, seed: int):
    """``([L, H, n] psi, [n] visual)``: one image block after a short text preamble, the window at the end."""
    gen = torch.Generator().manual_seed(seed)
    visual = torch.zeros(prompt, dtype=torch.bool)
    n_visual = int(round(visual_frac * prompt))
    start = min(prompt // 10, prompt - n_visual)
    visual[start : start + n_visual] = True
    rest = torch.arange(prompt) < prompt - min(window, prompt)
    depth = torch.linspace(0, 1, layers)
    sharpness = 1.0 + 2.0 * torch.sin(torch.pi * depth)  # flat first/last layers, sharp middle layers
    preference = 0.05 + 0.9 * torch.rand(layers, heads, generator=gen)  # share of mass on visual tokens
    raw = torch.exp(sharpness[:, None, None] * torch.randn(layers, heads, prompt, generator=gen))
    psi = torch.zeros(layers, heads, prompt)
    mass = 0.8 * min(window, prompt)  # of the window's attention, the part that leaves the window
    for members, share in ((visual & rest, preference), (~visual & rest, 1 - preference)):
        part = raw * members
        total = part.sum(-1, keepdim=True).clamp(min=1e-30)
        has = members.any()
        psi += part / total * (share[..., None] if visual.any() and (~visual & rest).any() else 1.0) * mass * has
    psi += raw * ~rest / (raw * ~rest).sum(-1, keepdim=True).clamp(min=1e-30) * (min(window, prompt) - mass)
    return psi.float(), visual


def run_plan(cfg: PolicyConfig, scores: torch.Tensor, visual: torch.Tensor, tp: int = 1) -> dict[str, Any]:
    """The JSON report (contract: ``policy``, ``layout``, ``budget_tokens``, ``total_kept``, ``slots_kept``,
    ``slots_reclaimed``, ``packing_waste``, ``layers``)."""
    layers, heads, n = scores.shape
    inputs = PolicyInputs.for_request(scores, visual, cfg)
    sel = get_policy(cfg.policy).select(inputs, cfg)
    counts = sel.all_head_counts
    slots = int(slot_count(counts, tp, layout=cfg.layout)[0])
    kept_visual = sel.kept_visual[0]
    budget = int(sel.budget[0])
    state = budget_state(inputs, cfg, sinks=cfg.policy != "random")  # for the report's sinks and kept window
    return {
        "policy": cfg.policy,
        "layout": cfg.layout,
        "config": cfg.to_strings(),
        "prompt_len": n,
        "visual_tokens": int(visual.sum()),
        "num_layers": layers,
        "num_heads": heads,
        "tp": tp,
        "budget_tokens": budget,
        "budget_raised_to_floor": bool(sel.raised[0]),
        "skipped": SKIP_REASONS.get(int(sel.skipped[0])),
        "kept_window": int(state.window[0]),
        "sinks": int(state.sinks[0]),
        "budget_cells": layers * heads * budget,
        "total_kept": int(counts.sum()),
        "slots_kept": slots,
        "slots_reclaimed": n - slots,
        "packing_waste": int(packing_waste(counts, torch.tensor([slots]))[0]),
        "layers": [
            {
                "layer": layer,
                "total": int(counts[0, layer].sum()),
                "kept": counts[0, layer].tolist(),
                "kept_visual": kept_visual[layer].tolist(),
                "kept_text": (counts[0, layer] - kept_visual[layer]).tolist(),
            }
            for layer in range(layers)
        ],
    }


def format_report(report: dict[str, Any]) -> str:
    n, slots = report["prompt_len"], report["slots_kept"]
    lines = [
        f"policy {report['policy']}: n={n} tokens ({report['visual_tokens']} visual), "
        f"L={report['num_layers']} layers, H={report['num_heads']} KV heads, TP={report['tp']}",
        f"budget B={report['budget_tokens']} tokens per head per layer"
        + (" (raised to min_keep)" if report["budget_raised_to_floor"] else ""),
        _protected_line(report),
        "",
        "layer  cells  kept per head (visual+text)",
    ]
    for row in report["layers"]:
        heads = "  ".join(f"{v}+{t}" for v, t in zip(row["kept_visual"], row["kept_text"], strict=True))
        lines.append(f"{row['layer']:>5}  {row['total']:>5}  {heads}")
    kept, cells = report["total_kept"], report["budget_cells"]
    lines += [
        "",
        f"kept {kept} of {cells} budget cells ({100 * kept / max(cells, 1):.1f}%); "
        f"visual {sum(sum(r['kept_visual']) for r in report['layers'])}, "
        f"text {sum(sum(r['kept_text']) for r in report['layers'])}",
        f"slots held M={slots} of {n} prompt slots ({100 * (n - slots) / n:.1f}% reclaimed, layout "
        f"{report['layout']}); packing waste {report['packing_waste']} cells",
    ]
    return "\n".join(lines)


def _protected_line(report: dict[str, Any]) -> str:
    config = report["config"]
    if report["skipped"] == "short prompt":
        return f"not compressed: short prompt (n={report['prompt_len']} < min_prompt {config['min_prompt']})"
    if report["skipped"] == "small saving":
        return f"not compressed: small saving (the budget reclaims less than min_reclaim {config['min_reclaim']})"
    return (
        f"every head keeps {report['sinks']} sinks and the last {report['kept_window']} tokens "
        f"(window {config['window']})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m madakv_sglang.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--heads", type=int, default=4, help="KV heads")
    parser.add_argument("--prompt", type=int, default=2048, help="prompt length n")
    parser.add_argument("--visual-frac", type=float, default=0.6, help="share of the prompt that is visual")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scores (and of --policy random)")
    parser.add_argument("--scores", help='.pt file with {"scores": [L, H, n], "visual": [n]} instead')
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (for the slot count)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    # --seed above is also the random policy's seed option, so it is not added twice.
    add_setting_arguments(parser, names=tuple(name for name in setting_names() if name != "seed"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_arguments(args)  # reads --seed as the random policy's seed
        if args.scores:
            data = torch.load(args.scores, map_location="cpu")
            scores, visual = data["scores"].float(), data["visual"].bool()
        else:
            for name in ("layers", "heads", "prompt"):
                if getattr(args, name) < 1:
                    raise ConfigError(f"--{name} must be >= 1")
            if not 0.0 <= args.visual_frac <= 1.0:
                raise ConfigError("--visual-frac must be in [0, 1]")
            scores, visual = synthetic_scores(
                args.layers, args.heads, args.prompt, args.visual_frac, cfg.window, args.seed
            )
        report = run_plan(cfg, scores, visual, args.tp)
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    print(json.dumps(report) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
