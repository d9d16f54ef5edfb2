"""The torch head-wise decode: the CPU kernel and the reference every GPU kernel is checked against.

Flat cells: a KV buffer viewed as ``[cells, D]``; under the ``per-layer`` layout cell ``slot * H + h`` of a layer
holds head ``h`` of token slot ``slot``, under ``shared`` the ids span every layer (docs/design.md §4). Head-wise
decode treats every (request b, KV head h) as its own "virtual request" ``v = b * H + h`` whose keys are the
cells ``indices[indptr[v]:indptr[v + 1]]`` and whose queries are the G query heads ``h * G .. h * G + G - 1``
(the HF/SGLang GQA convention).
"""

from __future__ import annotations

import torch
from torch import Tensor


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
