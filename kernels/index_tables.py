"""Per-step decode index tables for head-wise attention (docs/design.md §4), built on the device from per-batch inputs.

Decode attends per virtual request v = b * H + h (request b, KV head h of this rank) over a list of flat cells:
the request's packed prompt cells of that head and layer, then its dense tail, the cells of
``req_to_token[row_b, pos]`` for ``pos`` in ``[start_b, seq_b)`` (``start_b`` = n_b, the compressed prompt
length, or 0 for a request that was not compressed). A tail cell of layer l is
``l * layer_cells + slot * H + h``: ``layer_cells`` is 0 in the ``per-layer`` layout (ids inside the layer's own
buffer) and ``rows * H`` in the ``shared`` one (ids into the all-layer allocation, ``madakv_sglang.layout``).

Only ``seq_lens`` (and the tail slots SGLang writes into ``req_to_token``) change from one step to the next, so
everything else is gathered once per batch composition into :class:`IndexInputs` and a step is a fixed number
of device operations: no Python loop over rows, heads or layers, and no host sync when ``capacity`` is given.
The Triton version (``triton_index_tables``) fills the same tables into preallocated buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class PackedLike(Protocol):
    """What the builder reads of a compressed request (``madakv_sglang.engine.state.PackedRow``): kept as a
    protocol so the kernels never import the engine glue."""

    prompt_len: int
    cells: list[Tensor]
    indptr: Tensor


@dataclass(frozen=True)
class IndexInputs:
    """Everything about a decode batch that does not change from step to step.

    Attributes:
        rows: ``[B]`` int64 ``req_to_token`` row of every request, in batch order.
        tail_start: ``[B]`` int64 first dense position (n_b if the request was compressed, else 0).
        seg_start: ``[L, B, H]`` int64 offset in ``cells`` of head h's packed cells in layer l.
        seg_len: ``[L, B, H]`` int64 number of those cells (0 for an uncompressed request).
        cells: ``[P]`` int32 packed cells of every request and layer, request-major then layer (one dummy
            entry when there are none), each relative to its layer's base ``l * layer_cells`` (so negative
            where a shared-layout entry of layer l lives in an earlier layer's buffer). Cell ids stay below
            2^31, as FlashInfer's int32 indices need.
        layer_cells: cells per layer buffer in the ``shared`` layout, 0 in ``per-layer``.
    """

    rows: Tensor
    tail_start: Tensor
    seg_start: Tensor
    seg_len: Tensor
    cells: Tensor
    layer_cells: int = 0

    @property
    def num_layers(self) -> int:
        return int(self.seg_len.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.seg_len.shape[1])

    @property
    def num_heads(self) -> int:
        return int(self.seg_len.shape[2])


def build_index_inputs(
    packed: Sequence[PackedLike | None],
    rows: Sequence[int] | Tensor,
    req_to_token: Tensor,
    num_layers: int,
    num_heads: int,
    layer_cells: int = 0,
) -> IndexInputs:
    """Gather the per-batch inputs once, when the batch composition changes.

    Args:
        packed: per request in batch order, its packed state or ``None`` (dense from position 0).
        rows: ``[B]`` the requests' ``req_to_token`` rows (``forward_batch.req_pool_indices``).
        req_to_token: ``[rows, context]`` SGLang's map; only its device is used here.
        num_layers: L; num_heads: H, this rank's KV heads.
        layer_cells: cells per layer buffer of a ``shared`` pool (its packed ids are absolute), 0 otherwise.
    """
    device = req_to_token.device
    batch = len(packed)
    rows_t = torch.as_tensor(rows, dtype=torch.long).to(device)
    tail_start = torch.tensor([0 if p is None else p.prompt_len for p in packed], dtype=torch.long, device=device)
    seg_start = torch.zeros(num_layers, batch, num_heads, dtype=torch.long, device=device)
    seg_len = torch.zeros_like(seg_start)
    compressed = [(b, p) for b, p in enumerate(packed) if p is not None]
    pieces = [c.long() - layer * layer_cells for _, p in compressed for layer, c in enumerate(p.cells)]
    if compressed:
        indptr = torch.stack([p.indptr.long().to(device) for _, p in compressed])  # [Bc, L, H + 1]
        if indptr.shape[1:] != (num_layers, num_heads + 1):
            raise ValueError(
                f"packed indptr has shape {tuple(indptr.shape[1:])}, expected {(num_layers, num_heads + 1)}"
            )
        # Cells are concatenated request-major, then layer: the base of (request, layer) is the exclusive
        # cumulative count in that order.
        counts = indptr[:, :, -1].reshape(-1)
        base = (counts.cumsum(0) - counts).reshape(len(compressed), num_layers, 1)
        columns = torch.tensor([b for b, _ in compressed], dtype=torch.long, device=device)
        seg_start[:, columns] = (base + indptr[:, :, :-1]).transpose(0, 1)
        seg_len[:, columns] = indptr.diff(dim=-1).transpose(0, 1)
    # One dummy entry when nothing is packed, so every kernel gets a valid pointer.
    cells = torch.cat(pieces) if pieces else torch.zeros(1, dtype=torch.int32)
    cells = cells.to(device=device, dtype=torch.int32)
    return IndexInputs(
        rows=rows_t, tail_start=tail_start, seg_start=seg_start, seg_len=seg_len, cells=cells, layer_cells=layer_cells
    )


def decode_index_tables(
    inputs: IndexInputs,
    seq_lens: Tensor,
    req_to_token: Tensor,
    capacity: int | None = None,
    dtype: torch.dtype = torch.int32,
) -> tuple[Tensor, Tensor]:
    """Index tables of every layer at once, vectorized (torch; the CPU path and the GPU oracle).

    Each layer's row of ``indices`` is a chain of ranges of one source array: per virtual request its packed
    cells (a range of ``inputs.cells``) then its tail (a range of this step's tail cells), and zeros to the end
    of the row. :func:`concat_ranges` lays all ``L * (2 * B * H + 1)`` ranges out with one cumulative sum, and
    one gather fills the rows: a few passes over ``L * capacity`` entries, no per-entry search.

    Args:
        inputs: the batch's :class:`IndexInputs`.
        seq_lens: ``[B]`` this step's sequence lengths (logical: prompt + generated).
        req_to_token: ``[rows, context]`` int32/int64 slot map.
        capacity: width of ``indices``; ``None`` uses the fullest layer's count (host syncs). With a value the
            step needs no host sync, and entries past it are dropped (``indptr`` keeps the full counts, so an
            overflow shows as ``indptr[:, -1] > capacity``).
        dtype: of both outputs (int32 for FlashInfer, int64 for SGLang's Triton decode).

    Returns:
        ``indptr [L, B * H + 1]`` (each row starts at 0) and ``indices [L, capacity]``; layer l is
        ``(indptr[l], indices[l])``, entries of ``indices[l]`` past ``indptr[l, -1]`` are 0 (the padding cell).
    """
    layers, batch, heads = inputs.seg_len.shape
    virtual = batch * heads
    device = inputs.seg_len.device
    tail = (seq_lens.to(device).long() - inputs.tail_start).clamp_min(0)  # [B]
    lengths = (inputs.seg_len + tail[None, :, None]).reshape(layers, virtual)
    indptr = torch.zeros(layers, virtual + 1, dtype=torch.long, device=device)
    indptr[:, 1:] = lengths.cumsum(dim=1)
    nnz = indptr[:, -1]
    # Tail cells of this step, head-major: slot t of request b for head h sits at h * tails + offset[b] + t.
    # A tail entry lands at an output position >= its own index here, so `capacity` entries always suffice.
    tails = int(tail.sum()) if capacity is None else capacity
    if capacity is None:
        capacity = int(nnz.max()) if layers else 0
    width = req_to_token.shape[1]
    flat = req_to_token.reshape(-1)
    where = concat_ranges(inputs.rows * width + inputs.tail_start, tail, tails).clamp_(0, max(flat.numel() - 1, 0))
    heads_col = torch.arange(heads, device=device)[:, None]
    tail_cells = flat[where].long()[None, :] * heads + heads_col  # [H, tails]
    cells = inputs.cells.numel()
    padding = torch.zeros(capacity, dtype=dtype, device=device)
    source = torch.cat([inputs.cells.to(dtype), tail_cells.reshape(-1).to(dtype), padding])
    # Ranges per layer: (packed, tail) for every virtual request v = b * H + h, then the zero padding.
    offset = tail.cumsum(0) - tail
    tail_from = (cells + heads_col * tails + offset[None, :]).T.reshape(1, virtual)  # [1, V], v = b * H + h
    seg_len = inputs.seg_len.reshape(layers, virtual)
    starts = torch.stack([inputs.seg_start.reshape(layers, virtual), tail_from.expand(layers, -1)], dim=2)
    sizes = torch.stack([seg_len, tail.repeat_interleave(heads)[None, :].expand(layers, -1)], dim=2)
    begin = torch.stack([indptr[:, :-1], indptr[:, :-1] + seg_len], dim=2)
    pad_start = torch.full((layers, 1), cells + heads * tails, dtype=torch.long, device=device)
    starts = torch.cat([starts.reshape(layers, -1), pad_start], dim=1)
    begin = torch.cat([begin.reshape(layers, -1), nnz[:, None]], dim=1)
    sizes = torch.cat([sizes.reshape(layers, -1), (capacity - nnz)[:, None]], dim=1)
    # Clip every range to the row, so each row holds exactly `capacity` entries (truncation drops the excess).
    end = (begin + sizes).clamp(max=capacity)
    sizes = end - begin.clamp(max=capacity)
    index_dtype = torch.int32 if source.numel() < 2**31 else torch.long
    index = concat_ranges(starts.reshape(-1), sizes.reshape(-1), layers * capacity, dtype=index_dtype)
    indices = source.index_select(0, index).view(layers, capacity)
    if inputs.layer_cells:
        # Layer l's entries are relative to its base in the shared allocation; the padding past nnz stays 0.
        used = torch.arange(capacity, device=device)[None, :] < nnz[:, None]
        base = torch.arange(layers, device=device, dtype=dtype)[:, None] * inputs.layer_cells
        indices = indices + base * used
    return indptr.to(dtype), indices


def concat_ranges(starts: Tensor, sizes: Tensor, total: int, dtype: torch.dtype = torch.long) -> Tensor:
    """``cat([arange(s, s + n) for s, n in zip(starts, sizes)])`` without a loop, as ``[total]`` of ``dtype``
    (int32 halves the memory traffic when every value fits).

    A running sum of ones with a jump at the first output position of every range, so that the value there is
    the range's start; the jumps of empty ranges land on the same position and telescope. ``sizes`` must sum
    to at most ``total``; positions past the sum continue the last range.
    """
    first = sizes.cumsum(0) - sizes
    ends = starts + sizes
    previous_end = torch.cat([ends.new_zeros(1), ends[:-1]])
    step = torch.ones(total + 1, dtype=dtype, device=starts.device)
    step[0] = 0
    step.index_add_(0, first, (starts - previous_end).to(dtype))
    return step.cumsum(0, dtype=dtype)[:total]
