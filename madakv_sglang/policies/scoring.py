"""Token scores: how much attention the observation window pays to each prompt token (docs/design.md §2 step 1).

Attention kernels (FlashInfer, FA, SDPA) never return probabilities, so the W window queries are scored against
all n keys explicitly, in fp32. Everything here is pure torch and runs on the device of its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Query rows processed at once by accumulated_scores(); bounds the [Hq, rows, n] temporary.
_ACCUMULATE_CHUNK = 256


def window_scores(
    q_window: Tensor, keys: Tensor, *, scale: float, gqa: str = "mean", prompt_len: int | None = None
) -> Tensor:
    """psi_h(i): the causal attention of the last W prompt queries on key i, summed over the window.

    Args:
        q_window: ``[W, Hq, D]`` queries (post-RoPE) of the last W prompt positions.
        keys: ``[n, H, D]`` keys (post-RoPE) of all n prompt positions; ``Hq`` must be a multiple of ``H``.
        scale: softmax scale (usually ``D ** -0.5``).
        gqa: reduction over the G = Hq / H query heads of a KV group: ``mean`` or ``max``.
        prompt_len: n; defaults to ``keys.shape[0]``.

    Returns:
        ``[H, n]`` float32 scores; each query head's row sums to W (the window's attention mass).
    """
    n = keys.shape[0] if prompt_len is None else prompt_len
    w, hq, _ = q_window.shape
    h = keys.shape[1]
    if hq % h:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({h})")
    g = hq // h
    q = q_window.float().permute(1, 0, 2)  # [Hq, W, D]
    k = keys[:n].float().repeat_interleave(g, dim=1).permute(1, 2, 0)  # [Hq, D, n]
    logits = torch.bmm(q, k) * scale  # [Hq, W, n]
    # Window query j sits at position n - W + j and sees keys 0 .. n - W + j.
    query_pos = torch.arange(n - w, n, device=keys.device)
    key_pos = torch.arange(n, device=keys.device)
    logits.masked_fill_(key_pos[None, None, :] > query_pos[None, :, None], float("-inf"))
    per_query_head = torch.softmax(logits, dim=-1).sum(dim=1)  # [Hq, n]
    return reduce_gqa(per_query_head, h, gqa)


def accumulated_scores(queries: Tensor, keys: Tensor, *, scale: float, gqa: str = "mean") -> Tensor:
    """H2O's accumulated attention: the causal attention of *every* prompt query on key i, summed.

    Args:
        queries: ``[n, Hq, D]``, keys: ``[n, H, D]`` (post-RoPE).

    Returns:
        ``[H, n]`` float32.
    """
    n, hq, _ = queries.shape
    h = keys.shape[1]
    g = hq // h
    k = keys.float().repeat_interleave(g, dim=1).permute(1, 2, 0)  # [Hq, D, n]
    key_pos = torch.arange(n, device=keys.device)
    total = torch.zeros(hq, n, dtype=torch.float32, device=keys.device)
    for start in range(0, n, _ACCUMULATE_CHUNK):
        stop = min(n, start + _ACCUMULATE_CHUNK)
        q = queries[start:stop].float().permute(1, 0, 2)  # [Hq, rows, D]
        logits = torch.bmm(q, k) * scale
        query_pos = torch.arange(start, stop, device=keys.device)
        logits.masked_fill_(key_pos[None, None, :] > query_pos[None, :, None], float("-inf"))
        total += torch.softmax(logits, dim=-1).sum(dim=1)
    return reduce_gqa(total, h, gqa)


def reduce_gqa(per_query_head: Tensor, kv_heads: int, gqa: str) -> Tensor:
    """``[Hq, n]`` -> ``[H, n]``: query head ``j`` belongs to KV head ``j // G`` (the HF/SGLang convention)."""
    hq, n = per_query_head.shape
    grouped = per_query_head.view(kv_heads, hq // kv_heads, n)
    if gqa == "mean":
        return grouped.mean(dim=1)
    if gqa == "max":
        return grouped.amax(dim=1)
    raise ValueError(f"gqa must be mean or max, got {gqa!r}")


def pool_within_segments(scores: Tensor, segments: Tensor, kernel: int, mode: str) -> Tensor:
    """1-D pooling over positions that never mixes two segments (modality runs, the window).

    Args:
        scores: ``[..., N]`` scores.
        segments: ``[..., N]`` integer segment ids broadcastable to ``scores``; positions pool only with
            neighbours carrying the same id. Use a negative id for padding.
        kernel: odd window size; 1 or ``mode == "none"`` returns ``scores`` unchanged.
        mode: ``max`` or ``avg`` (the mean over the same-segment neighbours inside the kernel).
    """
    if mode == "none" or kernel == 1:
        return scores
    half = kernel // 2
    n = scores.shape[-1]
    segments = segments.expand_as(scores)
    neg_inf = torch.finfo(scores.dtype).min
    pooled = scores.clone()
    count = torch.ones_like(scores)
    for offset in range(1, min(half, n - 1) + 1):
        for shift in (offset, -offset):
            # neighbour[i] = scores[i + shift], valid when inside [0, N) and in the same segment.
            if shift > 0:
                nb = torch.nn.functional.pad(scores[..., shift:], (0, shift))
                nb_seg = torch.nn.functional.pad(segments[..., shift:], (0, shift), value=-2)
            else:
                nb = torch.nn.functional.pad(scores[..., : n + shift], (-shift, 0))
                nb_seg = torch.nn.functional.pad(segments[..., : n + shift], (-shift, 0), value=-2)
            same = nb_seg == segments
            if mode == "max":
                pooled = torch.maximum(pooled, torch.where(same, nb, torch.full_like(nb, neg_inf)))
            elif mode == "avg":
                pooled = pooled + torch.where(same, nb, torch.zeros_like(nb))
                count = count + same.to(scores.dtype)
            else:
                raise ValueError(f"pooling must be none, max or avg, got {mode!r}")
    return pooled / count if mode == "avg" else pooled
