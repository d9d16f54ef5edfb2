"""Packing layouts (docs/design.md §4): where kept (layer, head, position) entries go in the pool, and what it costs.

A pool slot holds all H_r heads of one token in every layer, so per-head subsets cannot free slots directly.
The kept cells of a request are packed into the cells of its first M slots and its other prompt slots go back
to the allocator. Two layouts:

- ``per-layer``: layer l's kept cells fill layer l's cells of the M slots (cell = slot * H_r + column of that
  layer's buffer), so M = max over layers (and ranks) of ceil(C_l / H_r): the fullest layer sets the memory of
  all of them.
- ``shared``: the K (and V) buffers of all layers are one allocation, and a cell id addresses any
  (layer, slot, column) of it: ``(layer * rows + slot) * H_r + column`` (``rows``: slots per layer buffer). The
  kept cells of all layers fill the M slots' cells of all layers, in layer-major order, so
  M = ceil(sum_l C_l / (L * H_r)) (max over ranks): a slot's cells may hold another layer's entries.

Packing waste = cells of the M slots that hold nothing (M * H * L - sum of kept cells), in either layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from madakv_sglang.config import LAYOUTS

# Cell ids travel as int32 (FlashInfer's page indices, the Triton tables): a shared pool must have fewer cells.
MAX_CELLS = 2**31


def rank_cells(all_head_counts: Tensor, tp_size: int) -> Tensor:
    """Cells per layer on each distinct block of heads: ``[R, L, H]`` -> ``[R, L, blocks]``. Ranks hold consecutive
    blocks of ``max(1, H // tp)`` heads; with fewer heads than ranks, the replicas of a head hold the same cells."""
    r, layers, heads = all_head_counts.shape
    if heads % tp_size and tp_size % heads:
        raise ValueError(f"{heads} KV heads cannot be split evenly over {tp_size} ranks")
    per_rank = max(1, heads // tp_size)
    return all_head_counts.reshape(r, layers, heads // per_rank, per_rank).sum(dim=-1)


def slot_count(all_head_counts: Tensor, tp_size: int = 1, *, layout: str) -> Tensor:
    """M per request under ``layout``: the slots the fullest rank needs (per layer, or over all layers for
    ``shared``). Every rank computes the same value from the shared head counts, so the allocator decision
    agrees without a collective. Returns ``[R]`` int64."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    heads_per_rank = max(1, all_head_counts.shape[-1] // tp_size)
    cells = rank_cells(all_head_counts, tp_size)  # [R, L, blocks]
    if layout == "per-layer":
        return ((cells + heads_per_rank - 1) // heads_per_rank).amax(dim=(1, 2))
    per_slot = cells.shape[1] * heads_per_rank  # a slot holds L * H_r cells of a rank
    return ((cells.sum(dim=1) + per_slot - 1) // per_slot).amax(dim=1)


def packing_waste(all_head_counts: Tensor, slots: Tensor) -> Tensor:
    """Empty cells inside the M slots, over all layers and heads: ``[R]`` int64."""
    layers, heads = all_head_counts.shape[1:]
    return slots * layers * heads - all_head_counts.sum(dim=(1, 2))


def shared_cell_count(num_layers: int, rows: int, heads: int) -> int:
    """Cells of a shared pool of ``num_layers`` buffers of ``[rows, heads, D]``; ids run from 0 below it."""
    return num_layers * rows * heads


@dataclass
class PackPlan:
    """Cell moves and index tables for one request on one rank (ids as ``pack_plan``'s ``rows`` chose).

    Attributes:
        src: per layer ``[C_l]`` cells holding the kept entries now (ordered by head, then position).
        dst: per layer ``[C_l]`` cells they move to (inside the first M slots).
        indptr: ``[L, H_r + 1]`` int64; head h of layer l owns ``dst[l][indptr[l, h]:indptr[l, h + 1]]``.
        positions: per layer ``[C_l]`` prompt positions of the entries (ascending per head).
    """

    src: list[Tensor]
    dst: list[Tensor]
    indptr: Tensor
    positions: list[Tensor]


def pack_plan(keep: Tensor, prompt_slots: Tensor, target_slots: Tensor, rows: int | None = None) -> PackPlan:
    """Plan the packing of one request's kept entries.

    Args:
        keep: ``[L, H_r, n]`` bool, kept positions of this rank's heads.
        prompt_slots: ``[n]`` int64, pool slot of every prompt position (``req_to_token[row, :n]``).
        target_slots: ``[M]`` int64 slots the packed cells fill, in order (the request's first M slots).
        rows: slots per layer buffer for the ``shared`` layout; ``None`` plans ``per-layer``.
    """
    layers, heads, _ = keep.shape
    counts = keep.sum(dim=-1)  # [L, H_r]
    layer_counts = counts.sum(dim=-1)
    room = target_slots.numel() * heads
    indptr = torch.zeros(layers, heads + 1, dtype=torch.long, device=keep.device)
    indptr[:, 1:] = counts.cumsum(dim=-1)
    layer, head, pos = keep.nonzero(as_tuple=True)  # sorted by (layer, head, position)
    order = torch.arange(head.numel(), device=keep.device)
    if rows is None:
        if int(layer_counts.max()) > room:
            raise ValueError("the target slots cannot hold the kept cells of the fullest layer")
        start = layer_counts.cumsum(0) - layer_counts
        order = order - start[layer]  # rank inside the entry's own layer
        src = prompt_slots[pos] * heads + head
        dst = target_slots[order // heads] * heads + order % heads
    else:
        if int(layer_counts.sum()) > room * layers:
            raise ValueError("the target slots cannot hold the kept cells of all layers")
        dst_layer, within = order // room, order % room
        src = (layer * rows + prompt_slots[pos]) * heads + head
        dst = (dst_layer * rows + target_slots[within // heads]) * heads + within % heads
    sizes = layer_counts.tolist()
    return PackPlan(
        src=list(src.split(sizes)),
        dst=list(dst.split(sizes)),
        indptr=indptr,
        positions=list(pos.split(sizes)),
    )
