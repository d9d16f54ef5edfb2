"""Test-only oracles: plain torch versions of what the product does in one batched step, written for clarity.

Dense compression of one request (``compress_dense``, ``compress_layer``), the merge of two partial attentions by
their log-sum-exps, and a pack move through a temporary (``apply_pack``).
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
class RaggedKV:
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
) -> tuple[list[RaggedKV], Selection]:
    """Score, select and compress one request's dense KV, layer by layer.

    Args:
        q_windows: per layer ``[W', Hq, D]`` post-RoPE queries of the last W' = min(W, n) prompt positions.
        keys / values: per layer ``[n, H, D]``.
        visual: ``[n]`` bool modality mask.
    """
    scores = torch.stack(
        [window_scores(q, k, scale=scale, gqa=cfg.gqa) for q, k in zip(q_windows, keys, strict=True)]
    )  # [L, H, n]
    selection = get_policy(cfg.policy).select(PolicyInputs.for_request(scores, visual, cfg), cfg)
    layers = [
        compress_layer(k, v, selection.keep[0, layer]) for layer, (k, v) in enumerate(zip(keys, values, strict=True))
    ]
    return layers, selection


def compress_layer(keys: Tensor, values: Tensor, keep: Tensor) -> RaggedKV:
    """Gather the kept rows of ``keys``/``values`` (``[n, H, D]``) given ``keep`` (``[H, n]`` bool)."""
    head, pos = keep.nonzero(as_tuple=True)  # sorted by (head, position)
    counts = keep.sum(dim=-1)
    indptr = torch.zeros(keep.shape[0] + 1, dtype=torch.long, device=keep.device)
    indptr[1:] = counts.cumsum(0)
    return RaggedKV(keys=keys[pos, head], values=values[pos, head], positions=pos, indptr=indptr)


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attention over two disjoint key sets from their outputs and log-sum-exps.

    Shapes: out ``[..., D]``, lse ``[...]``. Either side may be empty (lse -inf).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).nan_to_num(0.0)
    weight_b = torch.exp(lse_b - lse).nan_to_num(0.0)
    return out_a * weight_a[..., None] + out_b * weight_b[..., None], lse


def apply_pack(flat_cells: Tensor, src: Tensor, dst: Tensor) -> None:
    """Move cells ``src -> dst`` of a flat ``[cells, D]`` view. Gather to a temporary first: sources and
    destinations overlap (the targets are prompt slots too), so an in-place copy could read a cell that was
    already overwritten."""
    moved = flat_cells[src].clone()
    flat_cells[dst] = moved
