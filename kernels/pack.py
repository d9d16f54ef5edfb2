"""Packing the kept K/V cells of every layer at once (docs/design.md §4): torch version.

``layout.pack_plan`` says which cells move where. Sources and destinations overlap (the targets are the
request's first prompt slots), so every move reads from a temporary gathered before any write.

- ``per-layer`` layout: cell = slot * H + column of the layer's ``[slots, H, D]`` buffer; layers never share
  cells, which is what makes one gather and one scatter over all layers (:func:`pack_cells`) equal to
  one gather-then-scatter per layer (the tests' oracle). The Triton version (``triton_pack``) does the same with one
  launch each over all layers and K and V.
- ``shared`` layout: cell ids address the all-layer allocation directly (:func:`pack_shared_cells`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor


@dataclass(frozen=True)
class PackMoves:
    """Cell moves of all layers, flattened (layer-major).

    Attributes:
        src: ``[T]`` int64 cells read; dst: ``[T]`` int64 cells written (same layer as the source).
        layer: ``[T]`` int32 layer of each move.
        bounds: ``L + 1`` host offsets, layer l's moves are ``[bounds[l], bounds[l + 1])``.
    """

    src: Tensor
    dst: Tensor
    layer: Tensor
    bounds: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.bounds) - 1


def pack_moves(src: Sequence[Tensor], dst: Sequence[Tensor]) -> PackMoves:
    """Flatten per-layer ``pack_plan`` moves (``src[l]``, ``dst[l]`` of equal length). To pack several requests
    in one go, concatenate their moves per layer first (their cells never overlap)."""
    if len(src) != len(dst) or any(s.numel() != d.numel() for s, d in zip(src, dst, strict=True)):
        raise ValueError("src and dst must hold the same number of cells in every layer")
    sizes = [int(s.numel()) for s in src]
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    device = src[0].device if src else torch.device("cpu")
    layer = torch.repeat_interleave(
        torch.arange(len(sizes), dtype=torch.int32, device=device),
        torch.tensor(sizes, device=device),
        output_size=bounds[-1],  # known on the host: no device sync
    )
    flat_src = torch.cat([s.long() for s in src]) if src else torch.zeros(0, dtype=torch.long)
    flat_dst = torch.cat([d.long() for d in dst]) if dst else torch.zeros(0, dtype=torch.long)
    return PackMoves(src=flat_src, dst=flat_dst, layer=layer, bounds=tuple(bounds))


def pack_cells(k_layers: Sequence[Tensor], v_layers: Sequence[Tensor], moves: PackMoves) -> None:
    """Apply ``moves`` to the pool's per-layer buffers ``k_layers[l]``/``v_layers[l]`` (``[slots, H, D]``).

    When the per-layer buffers are equally spaced views of one allocation (the phase-2 pool, or a stacked
    test pool), the K (and V) layers are seen as one ``[L, cells, D]`` tensor: one gather, one scatter. SGLang's
    MHA pool allocates every layer separately; then each layer is moved on its own (still gather-then-scatter).
    """
    if len(k_layers) != moves.num_layers or len(v_layers) != moves.num_layers:
        raise ValueError(f"{moves.num_layers} layers of moves for {len(k_layers)} K / {len(v_layers)} V buffers")
    for buffers in (k_layers, v_layers):
        stacked = layer_stack_view(buffers)
        if stacked is not None:
            layer = moves.layer.long()
            stacked[layer, moves.dst] = stacked[layer, moves.src]  # advanced indexing: the right side is a copy
            continue
        for index, buffer in enumerate(buffers):
            lo, hi = moves.bounds[index], moves.bounds[index + 1]
            flat = buffer.view(-1, buffer.shape[-1])
            flat[moves.dst[lo:hi]] = flat[moves.src[lo:hi]]


def pack_shared_cells(k_cells: Tensor, v_cells: Tensor, src: Tensor, dst: Tensor) -> None:
    """``shared`` layout: move cells ``src -> dst`` of the all-layer views ``[L * rows * H, D]`` of K and V, for
    every request of a batch at once (their cells never overlap). The gather on the right is the temporary."""
    for cells in (k_cells, v_cells):
        cells[dst] = cells[src]


def layer_stack_view(buffers: Sequence[Tensor]) -> Tensor | None:
    """``[L, slots * H, D]`` view of per-layer ``[slots, H, D]`` buffers if they are contiguous, alike and equally
    spaced in one storage (without overlap); ``None`` otherwise."""
    first = buffers[0]
    if not all(b.is_contiguous() and b.shape == first.shape and b.dtype == first.dtype for b in buffers):
        return None
    storage = first.untyped_storage().data_ptr()
    if any(b.untyped_storage().data_ptr() != storage for b in buffers):
        return None
    offsets = [b.storage_offset() for b in buffers]
    step = offsets[1] - offsets[0] if len(buffers) > 1 else first.numel()
    if step < first.numel() or any(b - a != step for a, b in pairwise(offsets)):
        return None
    dim = first.shape[-1]
    return first.as_strided((len(buffers), first.numel() // dim, dim), (step, dim, 1), offsets[0])
