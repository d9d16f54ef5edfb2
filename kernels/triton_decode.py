"""Head-wise sparse decode in Triton: split-KV ("flash-decoding") attention of one query token per request over
per-(request, KV head) lists of flat cells, the semantics of ``torch_decode.headwise_decode``.

Virtual request ``v = b * H + h`` attends with its G query heads ``h * G .. h * G + G - 1`` over the cells
``indices[indptr[v]:indptr[v + 1]]`` of ``k_cells`` / ``v_cells`` ``[cells, D]`` (cell = slot * H + column).

* Stage 1, grid ``(V, S)``: program ``(v, s)`` takes the s-th of S equal, BLOCK_KEYS-aligned slices of v's index
  list, gathers its K/V rows BLOCK_KEYS at a time and runs an online softmax for the G query heads at once: a
  ``[BLOCK_G, D] x [D, BLOCK_KEYS]`` dot, with G padded to a power of two of at least 16 (the tensor-core minimum;
  for G = 1 the padding costs idle MMA rows, not memory traffic) and the padding masked. It writes the slice's
  normalised output and base-2 log-sum-exp to a float32 workspace.
* Stage 2, grid ``(V, G)``: merges the S partials of one query head by their log-sum-exps.

CUDA graphs: S is a launch parameter fixed by the batch shape (:func:`default_num_splits`), never by the lengths,
which are read from ``indptr`` on the device; a slice past the end of its list writes an empty partial (lse -inf)
that the merge weighs 0. With caller-owned ``out`` / ``lse`` / ``workspace`` (:class:`DecodeBuffers`) a call
allocates nothing, syncs nothing and launches the same two kernels for the same shapes, so it can be captured
once and replayed with new contents in the same ``q`` / ``indptr`` / ``indices`` buffers.

Precision: float32 inputs take IEEE-precision dots (no TF32), fp16 / bf16 take tensor-core dots; both accumulate
in float32. Logits are scaled by ``scale * log2(e)`` so the softmax uses ``exp2``; the lse returned is natural-log.
Cell ids are widened to int64 before the row offset is formed, so pools past 2**31 elements are addressed safely.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_KEYS = 32  # keys gathered per stage-1 iteration; also the alignment of the split boundaries
MAX_SPLITS = 16  # cap on KV splits per virtual request (:func:`default_num_splits`)
PROGRAMS_PER_SM = 2  # stage-1 programs the split rule aims at per SM
OFF_GPU_SMS = 4  # SM count assumed off a GPU (the Triton interpreter), keeping interpreted grids small
_LOG2E = math.log2(math.e)
_LN2: tl.constexpr = tl.constexpr(math.log(2.0))


@triton.jit
def _split_kernel(
    Q,
    K,
    V,
    Indptr,
    Indices,
    PartOut,
    PartLse,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_k,
    stride_v,
    num_kv_heads,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_KEYS: tl.constexpr,
):
    """Partial attention of virtual request program_id(0) over split program_id(1) of its cell list.

    PartOut ``[V, S, G, HEAD_DIM]`` float32 (normalised); PartLse ``[V, S, G]`` float32 (base 2).
    """
    virtual = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    batch = virtual // num_kv_heads
    head = virtual % num_kv_heads

    start = tl.load(Indptr + virtual).to(tl.int64)
    length = (tl.load(Indptr + virtual + 1) - start).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_KEYS) * BLOCK_KEYS
    lo = split * per_split
    hi = tl.minimum(lo + per_split, length)

    rows = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < GROUP
    col_ok = cols < HEAD_DIM
    q_rows = batch.to(tl.int64) * stride_qb + (head * GROUP + rows) * stride_qh
    q = tl.load(Q + q_rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)

    row_max = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the base-2 logits
    row_sum = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(logit - row_max)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for first in range(lo, hi, BLOCK_KEYS):
        keys = first + tl.arange(0, BLOCK_KEYS)
        key_ok = keys < hi
        cells = tl.load(Indices + start + keys, mask=key_ok, other=0).to(tl.int64)
        kv_mask = key_ok[:, None] & col_ok[None, :]
        k = tl.load(K + cells[:, None] * stride_k + cols[None, :], mask=kv_mask, other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BLOCK_G, BLOCK_KEYS]
        logits = tl.where(key_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))  # finite: every block holds at least one key
        alpha = tl.exp2(row_max - new_max)
        p = tl.exp2(logits - new_max[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        v = tl.load(V + cells[:, None] * stride_v + cols[None, :], mask=kv_mask, other=0.0)
        # fp16/bf16: p is rounded to the value dtype for the tensor-core dot, as in FlashAttention.
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        row_max = new_max

    # An empty slice (row_max = -inf, row_sum = 0) stores output 0 and lse -inf.
    sum_safe = tl.where(row_sum > 0, row_sum, 1.0)
    part = (virtual.to(tl.int64) * num_splits + split) * GROUP + rows
    tl.store(
        PartOut + part[:, None] * HEAD_DIM + cols[None, :],
        acc / sum_safe[:, None],
        mask=row_ok[:, None] & col_ok[None, :],
    )
    tl.store(PartLse + part, row_max + tl.log2(sum_safe), mask=row_ok)


@triton.jit
def _merge_kernel(
    PartOut,
    PartLse,
    Out,
    Lse,
    num_splits,
    stride_ob,
    stride_oh,
    stride_lb,
    num_kv_heads,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merge the splits of query head program_id(1) of virtual request program_id(0) into ``Out`` / ``Lse``."""
    virtual = tl.program_id(0)
    row = tl.program_id(1)
    batch = (virtual // num_kv_heads).to(tl.int64)
    q_head = (virtual % num_kv_heads) * GROUP + row

    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < num_splits
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HEAD_DIM
    part = (virtual.to(tl.int64) * num_splits + splits) * GROUP + row
    lse2 = tl.load(PartLse + part, mask=split_ok, other=float("-inf"))
    top = tl.max(lse2, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # all splits empty: every weight below is exp2(-inf) = 0
    weight = tl.exp2(lse2 - top)
    total = tl.sum(weight, 0)
    partial = tl.load(
        PartOut + part[:, None] * HEAD_DIM + cols[None, :], mask=split_ok[:, None] & col_ok[None, :], other=0.0
    )
    nonempty = total > 0
    total_safe = tl.where(nonempty, total, 1.0)
    merged = tl.sum(weight[:, None] * partial, 0) / total_safe
    tl.store(Out + batch * stride_ob + q_head * stride_oh + cols, merged.to(Out.dtype.element_ty), mask=col_ok)
    tl.store(Lse + batch * stride_lb + q_head, tl.where(nonempty, (top + tl.log2(total_safe)) * _LN2, float("-inf")))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return OFF_GPU_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_warps(dtype: torch.dtype) -> int:
    """Warps per stage-1 program. float32's IEEE dots run on CUDA cores and, with 4 warps, spill registers (ptxas,
    sm_90, D = 128); fp16 / bf16 tensor-core tiles fit 4 warps at ~190 registers, two programs per SM."""
    return 8 if dtype == torch.float32 else 4


def default_num_splits(num_virtual: int, device: torch.device) -> int:
    """KV splits per virtual request: ``ceil(PROGRAMS_PER_SM * SMs / V)`` clamped to [1, MAX_SPLITS].

    Two 4-warp programs per SM are what register use lets run at once (:func:`split_warps`), so the grid fills the
    GPU about once; at large batches (V >= 2 * SMs) each virtual request is one program, and the cap keeps short
    lists from paying for merges of mostly empty splits. Depends on the batch shape and the device only, never on
    lengths, so a captured graph stays valid for any lengths. On an H100 (132 SMs, 264 programs): Qwen2.5-VL
    (H = 4) batch 1 -> 16, batch 8 -> 9, batch 64 -> 2; LLaVA-1.5 (H = 32) batch 1 -> 9, batch 8 -> 2, batch >= 9 -> 1.
    """
    programs = PROGRAMS_PER_SM * _sm_count(device)
    return max(1, min(MAX_SPLITS, -(-programs // max(num_virtual, 1))))


def workspace_numel(batch: int, num_q_heads: int, head_dim: int, num_splits: int) -> int:
    """float32 elements of the partials workspace: outputs ``[V, S, G, D]`` then lses ``[V, S, G]``
    (V * G = batch * num_q_heads)."""
    return batch * num_q_heads * num_splits * (head_dim + 1)


@dataclass(frozen=True)
class DecodeBuffers:
    """Caller-owned outputs and workspace for up to ``out.shape[0]`` requests, for allocation-free (CUDA-graph)
    calls: pass ``out=buffers.out[:batch], lse=buffers.lse[:batch], workspace=buffers.workspace``.

    out: ``[max_batch, Hq, D]`` in the query dtype; lse: ``[max_batch, Hq]`` float32; workspace: flat float32.
    """

    out: Tensor
    lse: Tensor
    workspace: Tensor

    @classmethod
    def allocate(
        cls,
        max_batch: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        num_splits: int | None = None,
    ) -> DecodeBuffers:
        """Buffers for every batch up to ``max_batch``, with ``num_splits`` splits or, when None, the default
        rule's count for each batch size (the workspace is sized for the largest product batch * splits)."""
        device = torch.device(device)
        numel = max(
            workspace_numel(
                batch,
                num_q_heads,
                head_dim,
                num_splits if num_splits is not None else default_num_splits(batch * num_kv_heads, device),
            )
            for batch in range(1, max_batch + 1)
        )
        return cls(
            out=torch.empty(max_batch, num_q_heads, head_dim, dtype=dtype, device=device),
            lse=torch.empty(max_batch, num_q_heads, dtype=torch.float32, device=device),
            workspace=torch.empty(numel, dtype=torch.float32, device=device),
        )


def _check_buffer(buffer: Tensor, shape: tuple[int, ...], dtype: torch.dtype, name: str) -> Tensor:
    if tuple(buffer.shape) != shape or buffer.dtype != dtype or buffer.stride(-1) != 1:
        raise ValueError(
            f"{name} must be {dtype} of shape {shape} with unit last stride; got {buffer.dtype} "
            f"{tuple(buffer.shape)} strides {buffer.stride()}"
        )
    return buffer


def triton_headwise_decode(
    q: Tensor,
    k_cells: Tensor,
    v_cells: Tensor,
    indptr: Tensor,
    indices: Tensor,
    num_kv_heads: int,
    scale: float,
    *,
    num_splits: int | None = None,
    out: Tensor | None = None,
    lse: Tensor | None = None,
    workspace: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Head-wise decode over flat cells; same contract as ``torch_decode.headwise_decode``.

    Args:
        q: ``[B, Hq, D]`` float32 / float16 / bfloat16; k_cells / v_cells: ``[cells, D]`` in q's dtype
            (rows of unit stride, e.g. ``k_buffer[layer].view(-1, D)``).
        indptr: ``[B * H + 1]`` int32 or int64; indices: ``[nnz]`` int32 or int64 cell ids.
        num_kv_heads: H (Hq must be a multiple); scale: logit scale.
        num_splits: KV splits per virtual request; default :func:`default_num_splits`.
        out / lse: optional ``[B, Hq, D]`` (q's dtype) / ``[B, Hq]`` float32 outputs to write into.
        workspace: optional flat contiguous float32 tensor of at least
            ``workspace_numel(B, Hq, D, num_splits)`` elements. See :class:`DecodeBuffers`.
    Returns:
        (out ``[B, Hq, D]`` in q's dtype, lse ``[B, Hq]`` float32, natural log; an empty head gives 0 and -inf).
    """
    batch, num_q_heads, head_dim = q.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    group = num_q_heads // num_kv_heads
    virtual = batch * num_kv_heads
    if indptr.shape != (virtual + 1,):
        raise ValueError(f"indptr must have B * H + 1 = {virtual + 1} entries, got {tuple(indptr.shape)}")
    for name, cells in (("k_cells", k_cells), ("v_cells", v_cells)):
        if cells.dim() != 2 or cells.shape[1] != head_dim or cells.dtype != q.dtype or cells.stride(1) != 1:
            raise ValueError(
                f"{name} must be [cells, {head_dim}] {q.dtype} with unit last stride; got "
                f"{cells.dtype} {tuple(cells.shape)}"
            )
    if q.stride(-1) != 1:
        raise ValueError("q must have unit last stride")
    splits = num_splits if num_splits is not None else default_num_splits(virtual, q.device)
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {splits}")

    if out is None:
        out = torch.empty(batch, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    out = _check_buffer(out, (batch, num_q_heads, head_dim), q.dtype, "out")
    if lse is None:
        lse = torch.empty(batch, num_q_heads, dtype=torch.float32, device=q.device)
    lse = _check_buffer(lse, (batch, num_q_heads), torch.float32, "lse")
    needed = workspace_numel(batch, num_q_heads, head_dim, splits)
    if workspace is None:
        workspace = torch.empty(needed, dtype=torch.float32, device=q.device)
    elif (
        workspace.dtype != torch.float32
        or workspace.dim() != 1
        or workspace.stride(0) != 1
        or workspace.numel() < needed
    ):
        raise ValueError(
            f"workspace must be flat contiguous float32 with >= {needed} elements; got "
            f"{workspace.dtype} {tuple(workspace.shape)}"
        )
    if virtual == 0:
        return out, lse
    partial_rows = virtual * splits * group
    part_out = workspace[: partial_rows * head_dim]
    part_lse = workspace[partial_rows * head_dim : needed]

    block_d = max(16, triton.next_power_of_2(head_dim))
    _split_kernel[(virtual, splits)](
        q,
        k_cells,
        v_cells,
        indptr,
        indices,
        part_out,
        part_lse,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cells.stride(0),
        v_cells.stride(0),
        num_kv_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_KEYS=BLOCK_KEYS,
        num_warps=split_warps(q.dtype),
        num_stages=2,
    )
    _merge_kernel[(virtual, group)](
        part_out,
        part_lse,
        out,
        lse,
        splits,
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        num_kv_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_S=triton.next_power_of_2(splits),
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out, lse
