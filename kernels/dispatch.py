"""Pick the head-wise decode implementation for a device. Only the torch reference exists so far; a GPU kernel
is added by registering it in ``_BACKENDS`` together with a test against the reference."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from madakv_sglang.reference import headwise_decode as torch_headwise_decode

DecodeFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, float], tuple[Tensor, Tensor]]

_BACKENDS: dict[str, DecodeFn] = {"torch": torch_headwise_decode}


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def headwise_decode(
    q: Tensor,
    k_cells: Tensor,
    v_cells: Tensor,
    indptr: Tensor,
    indices: Tensor,
    num_kv_heads: int,
    scale: float,
    backend: str = "torch",
) -> tuple[Tensor, Tensor]:
    """Head-wise decode over flat cells (see ``madakv_sglang.reference.headwise_decode`` for shapes)."""
    try:
        fn = _BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown decode backend {backend!r}; available: {', '.join(_BACKENDS)}") from None
    return fn(q, k_cells, v_cells, indptr, indices, num_kv_heads, scale)
