"""Packing layout (DESIGN §3): where kept (layer, head, position) entries go in the pool, and what it costs.

A pool slot holds all H_r heads of one token, so per-head subsets cannot free slots directly. Instead the kept
cells of every layer are packed into the cells of the request's first M slots (cell = slot * H_r + column),
and the remaining prompt slots go back to the allocator. M = max over layers (and ranks) of ceil(C_l / H_r).
Packing waste = cells of the M slots that hold nothing (M * H * L - sum of kept cells).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def rank_cells(all_head_counts: Tensor, tp_size: int) -> Tensor:
    """Cells per layer on each distinct block of heads: ``[R, L, H]`` -> ``[R, L, blocks]``. Ranks hold consecutive
    blocks of ``max(1, H // tp)`` heads; with fewer heads than ranks, the replicas of a head hold the same cells."""
    r, layers, heads = all_head_counts.shape
    if heads % tp_size and tp_size % heads:
        raise ValueError(f"{heads} KV heads cannot be split evenly over {tp_size} ranks")
    per_rank = max(1, heads // tp_size)
    return all_head_counts.reshape(r, layers, heads // per_rank, per_rank).sum(dim=-1)


def slot_count(all_head_counts: Tensor, tp_size: int = 1) -> Tensor:
    """M per request: the slots the fullest (layer, rank) needs. Every rank computes the same value from the
    shared head counts, so the allocator decision agrees without a collective. Returns ``[R]`` int64."""
    heads_per_rank = max(1, all_head_counts.shape[-1] // tp_size)
    cells = rank_cells(all_head_counts, tp_size)
    return ((cells + heads_per_rank - 1) // heads_per_rank).amax(dim=(1, 2))


def packing_waste(all_head_counts: Tensor, slots: Tensor) -> Tensor:
    """Empty cells inside the M slots, over all layers and heads: ``[R]`` int64."""
    layers, heads = all_head_counts.shape[1:]
    return slots * layers * heads - all_head_counts.sum(dim=(1, 2))


@dataclass
class PackPlan:
    """Cell moves and index tables for one request on one rank.

    Attributes:
        src: per layer ``[C_l]`` flat cells holding the kept entries now (ordered by head, then position).
        dst: per layer ``[C_l]`` flat cells they move to (inside the first M slots).
        indptr: ``[L, H_r + 1]`` int64; head h of layer l owns ``dst[l][indptr[l, h]:indptr[l, h + 1]]``.
        positions: per layer ``[C_l]`` prompt positions of the entries (ascending per head).
    """

    src: list[Tensor]
    dst: list[Tensor]
    indptr: Tensor
    positions: list[Tensor]


def pack_plan(keep: Tensor, prompt_slots: Tensor, target_slots: Tensor) -> PackPlan:
    """Plan the packing of one request's kept entries.

    Args:
        keep: ``[L, H_r, n]`` bool, kept positions of this rank's heads.
        prompt_slots: ``[n]`` int64, pool slot of every prompt position (``req_to_token[row, :n]``).
        target_slots: ``[M]`` int64 slots the packed cells fill, in order (the request's first M slots).
    """
    layers, heads, _ = keep.shape
    counts = keep.sum(dim=-1)  # [L, H_r]
    if int(counts.sum(dim=-1).max()) > target_slots.numel() * heads:
        raise ValueError("the target slots cannot hold the kept cells of the fullest layer")
    indptr = torch.zeros(layers, heads + 1, dtype=torch.long, device=keep.device)
    indptr[:, 1:] = counts.cumsum(dim=-1)
    src, dst, positions = [], [], []
    for layer in range(layers):
        head, pos = keep[layer].nonzero(as_tuple=True)  # sorted by (head, position)
        order = torch.arange(head.numel(), device=keep.device)
        src.append(prompt_slots[pos] * heads + head)
        dst.append(target_slots[order // heads] * heads + order % heads)
        positions.append(pos)
    return PackPlan(src=src, dst=dst, indptr=indptr, positions=positions)


def apply_pack(flat_cells: Tensor, src: Tensor, dst: Tensor) -> None:
    """Move cells ``src -> dst`` of a flat ``[cells, D]`` view. Gather to a temporary first: sources and
    destinations overlap (the targets are prompt slots too), so an in-place copy could read a cell that was
    already overwritten."""
    moved = flat_cells[src].clone()
    flat_cells[dst] = moved
