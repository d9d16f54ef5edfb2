"""Triton version of :func:`madakv_sglang.kernels.pack.pack_cells`: one gather launch and one scatter launch
over all layers and both K and V.

SGLang's MHA pool keeps every layer in its own tensor, so the kernels get a device table of the 2L base
addresses (K layers, then V layers) and cast the entry of each move to a pointer, as SGLang's own
``copy_all_layer_kv_cache`` does. Values are copied as integer words of the element size, so any dtype
(fp8, bf16, NaN-poisoned cells) moves bit for bit.

Importing this module imports triton; ``madakv_sglang.kernels`` never does it implicitly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .pack import PackMoves

_WORDS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _move_kernel(
    bases_ptr,  # [2, L] int64 addresses of the K layers then the V layers
    layer_ptr,  # [T] int32
    cells_ptr,  # [T] int64 pool cells (sources when gathering, destinations when scattering)
    tmp_ptr,  # [2, T, D_max] words
    num_moves,
    num_layers,
    k_width,
    v_width,
    tmp_width,
    SCATTER: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    moves = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    side = tl.program_id(1)  # 0 = K, 1 = V
    width = tl.where(side == 0, k_width, v_width)
    row_mask = moves < num_moves
    layer = tl.load(layer_ptr + moves, mask=row_mask, other=0)
    base = tl.load(bases_ptr + side * num_layers + layer, mask=row_mask, other=0)
    base = base.to(tl.pointer_type(tmp_ptr.dtype.element_ty))
    cell = tl.load(cells_ptr + moves, mask=row_mask, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (cols[None, :] < width)
    pool = base[:, None] + cell[:, None] * width + cols[None, :]
    tmp = tmp_ptr + (side * num_moves + moves)[:, None] * tmp_width + cols[None, :]
    if SCATTER:
        tl.store(pool, tl.load(tmp, mask=mask), mask=mask)
    else:
        tl.store(tmp, tl.load(pool, mask=mask), mask=mask)


def layer_table(k_layers: Sequence[Tensor], v_layers: Sequence[Tensor]) -> Tensor:
    """``[2, L]`` int64 device table of the buffers' addresses. Build it once per pool (the buffers do not move)
    and pass it to :func:`pack_cells_triton`."""
    buffers = [*k_layers, *v_layers]
    first = buffers[0]
    for buffer in buffers:
        if not buffer.is_contiguous() or buffer.dtype != first.dtype or buffer.device != first.device:
            raise ValueError("every K/V layer buffer must be contiguous, of one dtype and on one device")
    addresses = [buffer.data_ptr() for buffer in buffers]
    return torch.tensor(addresses, dtype=torch.int64, device=first.device).view(2, len(k_layers))


def pack_cells_triton(
    k_layers: Sequence[Tensor],
    v_layers: Sequence[Tensor],
    moves: PackMoves,
    table: Tensor | None = None,
    block_elems: int = 4096,
) -> None:
    """Apply ``moves`` to the per-layer ``[slots, H, D]`` buffers: gather every moved K and V cell into a
    ``[2, T, D]`` temporary, then scatter (equal to ``pack.pack_cells``). ``table`` is :func:`layer_table` of
    the same buffers (built here when ``None``)."""
    if moves.src.numel() == 0:
        return
    if table is None:
        table = layer_table(k_layers, v_layers)
    k_width, v_width = k_layers[0].shape[-1], v_layers[0].shape[-1]
    word = _WORDS[k_layers[0].element_size()]
    width = max(k_width, v_width)
    count = moves.src.numel()
    tmp = torch.empty(2, count, width, dtype=word, device=moves.src.device)
    block_d = triton.next_power_of_2(width)
    block_t = max(1, block_elems // block_d)
    grid = (triton.cdiv(count, block_t), 2)
    for scatter, cells in ((False, moves.src), (True, moves.dst)):
        _move_kernel[grid](
            table,
            moves.layer,
            cells,
            tmp,
            count,
            moves.num_layers,
            k_width,
            v_width,
            width,
            SCATTER=scatter,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
        )
