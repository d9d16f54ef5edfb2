"""Seeded random window scores and visual masks shaped like real attention, shared by the policy tests."""

from __future__ import annotations

import torch


def random_request(
    seed: int, L: int, H: int, n: int, visual_frac: float, ties: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Peaky scores (an exponent of gaussians) so masses differ between heads, as real attention does.
    scores = torch.exp(2.5 * torch.randn(L, H, n, generator=gen)).float()
    scores = scores / scores.sum(-1, keepdim=True) * 4
    if ties:  # a few coarse levels: many equal scores exercise the tie rule (later position first)
        scores = torch.round(scores * 2) / 2
    visual = torch.zeros(n, dtype=torch.bool)
    n_vis = int(visual_frac * n)
    start = int(torch.randint(0, max(1, n - n_vis), (1,), generator=gen))
    visual[start : start + n_vis] = True
    return scores, visual
