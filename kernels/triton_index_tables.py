"""Triton version of :func:`madakv_sglang.kernels.index_tables.decode_index_tables`: two launches per step
(indptr of every layer, then indices of every layer) into preallocated buffers, with no host sync and no
allocation, so it can be captured in a CUDA graph and replayed with new ``seq_lens``.

Importing this module imports triton; ``madakv_sglang.kernels`` never does it implicitly.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .index_tables import IndexInputs


@triton.jit
def _indptr_kernel(
    seg_len_ptr,  # [L, V]
    tail_start_ptr,  # [B]
    seq_lens_ptr,  # [B]
    indptr_ptr,  # [L, V + 1]
    num_virtual,
    num_heads,
    BLOCK_V: tl.constexpr,
):
    layer = tl.program_id(0).to(tl.int64)
    virtual = tl.arange(0, BLOCK_V)
    mask = virtual < num_virtual
    request = virtual // num_heads
    seg = tl.load(seg_len_ptr + layer * num_virtual + virtual, mask=mask, other=0).to(tl.int64)
    seq = tl.load(seq_lens_ptr + request, mask=mask, other=0).to(tl.int64)
    start = tl.load(tail_start_ptr + request, mask=mask, other=0).to(tl.int64)
    ends = tl.cumsum(seg + tl.maximum(seq - start, 0), axis=0)
    row = indptr_ptr + layer * (num_virtual + 1)
    tl.store(row + 1 + virtual, ends.to(indptr_ptr.dtype.element_ty), mask=mask)
    tl.store(row + virtual, tl.zeros_like(ends).to(indptr_ptr.dtype.element_ty), mask=virtual == 0)


@triton.jit
def _indices_kernel(
    cells_ptr,  # [P]
    seg_start_ptr,  # [L, V]
    seg_len_ptr,  # [L, V]
    rows_ptr,  # [B]
    tail_start_ptr,  # [B]
    seq_lens_ptr,  # [B]
    req_to_token_ptr,  # [rows, context]
    req_to_token_stride,
    indptr_ptr,  # [L, V + 1]
    indices_ptr,  # [L, capacity]
    capacity,
    num_virtual,
    num_heads,
    layer_cells,
    BLOCK: tl.constexpr,
):
    # One program per (virtual request, layer): its packed segment, then its dense tail. Cells are relative to the
    # layer's base in a shared pool (layer_cells = 0 in the per-layer layout).
    virtual = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    request = virtual // num_heads
    head = virtual % num_heads
    out = indices_ptr + layer * capacity
    base = layer * layer_cells
    first = tl.load(indptr_ptr + layer * (num_virtual + 1) + virtual).to(tl.int64)
    seg_start = tl.load(seg_start_ptr + layer * num_virtual + virtual).to(tl.int64)
    seg_len = tl.load(seg_len_ptr + layer * num_virtual + virtual).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    for j in range(0, seg_len, BLOCK):
        mask = j + offs < seg_len
        cell = tl.load(cells_ptr + seg_start + j + offs, mask=mask, other=0).to(tl.int64) + base
        dst = first + j + offs
        tl.store(out + dst, cell.to(indices_ptr.dtype.element_ty), mask=mask & (dst < capacity))
    row = tl.load(rows_ptr + request).to(tl.int64)
    start = tl.load(tail_start_ptr + request).to(tl.int64)
    tail = tl.maximum(tl.load(seq_lens_ptr + request).to(tl.int64) - start, 0)
    slots = req_to_token_ptr + row * req_to_token_stride + start
    first += seg_len
    for t in range(0, tail, BLOCK):
        mask = t + offs < tail
        slot = tl.load(slots + t + offs, mask=mask, other=0).to(tl.int64)
        dst = first + t + offs
        tl.store(
            out + dst, (base + slot * num_heads + head).to(indices_ptr.dtype.element_ty), mask=mask & (dst < capacity)
        )


def decode_index_tables_triton(
    inputs: IndexInputs,
    seq_lens: Tensor,
    req_to_token: Tensor,
    indptr: Tensor,
    indices: Tensor,
    block: int = 128,
) -> None:
    """Fill ``indptr [L, B * H + 1]`` and ``indices [L, capacity]`` (same dtype, int32 or int64, on the inputs'
    device) with the tables :func:`~madakv_sglang.kernels.index_tables.decode_index_tables` returns.

    Capacity: layer l needs ``indptr[l, -1] = sum_b (C_{b,l} + H * (seq_b - start_b))`` entries. A safe bound
    for a CUDA graph is ``H * min(sum of seq_lens, pool slots)``: a head never holds more cells than its
    request's positions, and a layer's lists never share a cell. Entries beyond ``capacity`` are dropped; check
    ``indptr[:, -1] <= capacity`` (off the hot path) to detect it. Entries of ``indices[l]`` past
    ``indptr[l, -1]`` are left as they were. ``seq_lens`` may be int32 or int64.
    """
    layers, batch, heads = inputs.seg_len.shape
    virtual = batch * heads
    if indptr.shape != (layers, virtual + 1) or indices.dim() != 2 or indices.shape[0] != layers:
        raise ValueError(
            f"indptr {tuple(indptr.shape)} / indices {tuple(indices.shape)} do not fit L={layers}, B*H={virtual}"
        )
    if not (indptr.is_contiguous() and indices.is_contiguous() and req_to_token.stride(1) == 1):
        raise ValueError("indptr, indices and the rows of req_to_token must be contiguous")
    _indptr_kernel[(layers,)](
        inputs.seg_len,
        inputs.tail_start,
        seq_lens,
        indptr,
        virtual,
        heads,
        BLOCK_V=triton.next_power_of_2(max(virtual, 1)),
    )
    _indices_kernel[(virtual, layers)](
        inputs.cells,
        inputs.seg_start,
        inputs.seg_len,
        inputs.rows,
        inputs.tail_start,
        seq_lens,
        req_to_token,
        req_to_token.stride(0),
        indptr,
        indices,
        indices.shape[1],
        virtual,
        heads,
        inputs.layer_cells,
        BLOCK=block,
    )
