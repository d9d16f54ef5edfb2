"""Plain torch references every fast path is checked against: compressing a dense KV, head-wise sparse decode
over flat cells (with log-sum-exp), and merging two partial attentions.

Flat cells: a layer's KV buffer ``[slots, H, D]`` viewed as ``[slots * H, D]``; cell ``slot * H + h`` holds head
``h`` of token slot ``slot``. Head-wise decode treats every (request b, KV head h) as its own "virtual request"
``v = b * H + h`` whose keys are the cells ``indices[indptr[v]:indptr[v + 1]]`` and whose queries are the G
query heads ``h * G .. h * G + G - 1`` (the HF/SGLang GQA convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from madakv_sglang.config import PolicyConfig
from madakv_sglang.policies import PolicyInputs, Selection, get_policy
from madakv_sglang.policies.scoring import window_scores


@dataclass
class CompressedLayer:
    """One layer's kept K/V, ragged per head: head h owns rows ``indptr[h]:indptr[h + 1]``.

    keys / values: ``[C, D]``; positions: ``[C]`` prompt positions of the kept rows (ascending per head).
    """

    keys: Tensor
    values: Tensor
    positions: Tensor
    indptr: Tensor


def compress_dense(
    q_windows: Sequence[Tensor],
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    visual: Tensor,
    cfg: PolicyConfig,
    scale: float,
) -> tuple[list[CompressedLayer], Selection]:
    """Score, select and compress one request's dense KV, layer by layer.

    Args:
        q_windows: per layer ``[W', Hq, D]`` post-RoPE queries of the last W' = min(W, n) prompt positions.
        keys / values: per layer ``[n, H, D]``.
        visual: ``[n]`` bool modality mask.
    """
    scores = torch.stack(
        [window_scores(q, k, scale=scale, gqa=cfg.gqa) for q, k in zip(q_windows, keys)]
    )  # [L, H, n]
    selection = get_policy(cfg.policy).select(PolicyInputs.for_request(scores, visual, cfg), cfg)
    layers = [compress_layer(k, v, selection.keep[0, layer]) for layer, (k, v) in enumerate(zip(keys, values))]
    return layers, selection


def compress_layer(keys: Tensor, values: Tensor, keep: Tensor) -> CompressedLayer:
    """Gather the kept rows of ``keys``/``values`` (``[n, H, D]``) given ``keep`` (``[H, n]`` bool)."""
    head, pos = keep.nonzero(as_tuple=True)  # sorted by (head, position)
    counts = keep.sum(dim=-1)
    indptr = torch.zeros(keep.shape[0] + 1, dtype=torch.long, device=keep.device)
    indptr[1:] = counts.cumsum(0)
    return CompressedLayer(keys=keys[pos, head], values=values[pos, head], positions=pos, indptr=indptr)


def headwise_decode(
    q: Tensor, k_cells: Tensor, v_cells: Tensor, indptr: Tensor, indices: Tensor, num_kv_heads: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Attention of one query token per request over per-head cell lists, in float32 (float64 inputs stay
    float64, so the reference can be checked to 1e-10).

    Args:
        q: ``[B, Hq, D]``; k_cells / v_cells: ``[cells, D]`` (a flat view of the pool);
        indptr: ``[B * H + 1]`` int64; indices: ``[nnz]`` int64 cell ids; num_kv_heads: H.
    Returns:
        (out ``[B, Hq, D]``, lse ``[B, Hq]`` natural-log sum of exp of the scaled logits;
        an empty head gives out 0 and lse -inf).
    """
    batch, hq, dim = q.shape
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = hq // num_kv_heads
    virtual = batch * num_kv_heads
    lengths = indptr[1:] - indptr[:-1]
    width = int(lengths.max()) if virtual else 0
    slot = torch.arange(width, device=q.device)
    valid = slot[None, :] < lengths[:, None]  # [V, T]
    gather_at = (indptr[:-1, None] + slot[None, :]).clamp(max=max(indices.numel() - 1, 0))
    cells = indices[gather_at] if indices.numel() else torch.zeros_like(gather_at)
    keys = k_cells[cells].to(work)  # [V, T, D]
    vals = v_cells[cells].to(work)
    queries = q.to(work).reshape(virtual, group, dim)  # virtual request v = b * H + h
    logits = torch.einsum("vgd,vtd->vgt", queries, keys) * scale
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [V, G]
    probs = torch.exp(logits - lse[..., None]).nan_to_num(0.0)  # empty heads: -inf - -inf = nan -> 0
    out = torch.einsum("vgt,vtd->vgd", probs, vals)
    return out.reshape(batch, hq, dim), lse.reshape(batch, hq)


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attention over two disjoint key sets from their outputs and log-sum-exps.

    Shapes: out ``[..., D]``, lse ``[...]``. Either side may be empty (lse -inf).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).nan_to_num(0.0)
    weight_b = torch.exp(lse_b - lse).nan_to_num(0.0)
    return out_a * weight_a[..., None] + out_b * weight_b[..., None], lse
