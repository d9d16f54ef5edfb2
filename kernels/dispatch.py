"""Pick the kernels of a device: the head-wise decode, and the layout kernels (decode index tables, per-layer
packing). The torch references are always there. A GPU decode kernel is added as a row of ``_LAZY`` (a probe
saying whether it can run here, and a loader importing its module on first use, so that importing
``madakv_sglang.kernels`` never loads Triton or CUDA code), together with a test against the reference; the
layout kernels have one Triton version each, imported the same lazy way."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .index_tables import IndexInputs, decode_index_tables
from .pack import PackMoves, pack_cells
from .torch_decode import headwise_decode as torch_headwise_decode

DecodeFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, float], tuple[Tensor, Tensor]]

_BACKENDS: dict[str, DecodeFn] = {"torch": torch_headwise_decode}


def _triton_runnable() -> bool:
    """Triton kernels run on a CUDA device, or on CPU tensors in the Triton interpreter (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _load_triton() -> DecodeFn:
    from .triton_decode import triton_headwise_decode

    return triton_headwise_decode


def _flashinfer_runnable() -> bool:
    """FlashInfer JIT-compiles CUDA kernels: a CUDA device and the flashinfer-python wheel."""
    return torch.cuda.is_available() and importlib.util.find_spec("flashinfer") is not None


def _load_flashinfer() -> DecodeFn:
    from .flashinfer_decode import FlashInferHeadwiseDecoder

    return FlashInferHeadwiseDecoder(torch.device("cuda", torch.cuda.current_device()))


_LAZY: dict[str, tuple[Callable[[], bool], Callable[[], DecodeFn]]] = {
    "triton": (_triton_runnable, _load_triton),
    "flashinfer": (_flashinfer_runnable, _load_flashinfer),
}


KERNEL_ENV = "MADAKV_DECODE_KERNEL"  # auto (default), torch, triton or flashinfer
LAYOUT_KERNEL_ENV = "MADAKV_LAYOUT_KERNEL"  # auto (default), torch or triton
LAYOUT_KERNELS = ("torch", "triton")


def decode_kernel_for(device: str | torch.device, environ: Mapping[str, str] | None = None) -> str:
    """The decode kernel a backend on ``device`` uses: ``MADAKV_DECODE_KERNEL`` if set (refused when it cannot
    run here), else Triton on CUDA (no host plan, safe under CUDA graphs) and the torch reference elsewhere."""
    choice = _requested(KERNEL_ENV, "decode", device, environ)
    if choice is None:
        return "triton" if torch.device(device).type == "cuda" and _triton_runnable() else "torch"
    _resolve(choice)  # unknown or not runnable here: a clear error at start-up, not at the first decode
    return choice


def layout_kernel_for(device: str | torch.device, environ: Mapping[str, str] | None = None) -> str:
    """The layout kernels a backend on ``device`` uses, chosen like the decode kernel: ``MADAKV_LAYOUT_KERNEL``
    if set, else Triton on CUDA (the index tables without a host sync, the per-layer pack in two launches for
    all layers, where the torch version needs two per layer on SGLang's separately allocated layers) and torch
    elsewhere."""
    choice = _requested(LAYOUT_KERNEL_ENV, "layout", device, environ)
    if choice is None:
        return "triton" if torch.device(device).type == "cuda" and _triton_runnable() else "torch"
    if choice not in LAYOUT_KERNELS:
        raise ValueError(f"{LAYOUT_KERNEL_ENV}={choice}: unknown layout kernel; known: {', '.join(LAYOUT_KERNELS)}")
    if choice == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError(f"{LAYOUT_KERNEL_ENV}=triton: Triton is not installed")
    return choice


def _requested(name: str, what: str, device: str | torch.device, environ: Mapping[str, str] | None) -> str | None:
    """The kernel the environment asks for (``None`` for auto); a GPU kernel on a CPU device is refused unless
    the Triton interpreter runs it (TRITON_INTERPRET=1)."""
    environ = os.environ if environ is None else environ
    choice = environ.get(name, "auto").strip() or "auto"
    if choice == "auto":
        return None
    if choice != "torch" and torch.device(device).type != "cuda" and environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name}={choice}: the {choice} {what} kernel needs a CUDA device")
    return choice


def available_backends() -> tuple[str, ...]:
    """The backends that can run here: "torch" always, then every lazy one whose probe passes."""
    return tuple(_BACKENDS) + tuple(
        name for name, (runnable, _) in _LAZY.items() if name not in _BACKENDS and runnable()
    )


def _resolve(backend: str) -> DecodeFn:
    if backend in _BACKENDS:
        return _BACKENDS[backend]
    if backend not in _LAZY:
        raise ValueError(f"unknown decode backend {backend!r}; known: {', '.join([*_BACKENDS, *_LAZY])}")
    runnable, load = _LAZY[backend]
    if not runnable():
        raise ValueError(f"decode backend {backend!r} cannot run here; available: {', '.join(available_backends())}")
    _BACKENDS[backend] = fn = load()
    return fn


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
    """Head-wise decode over flat cells (see ``torch_decode.headwise_decode`` for shapes)."""
    return _resolve(backend)(q, k_cells, v_cells, indptr, indices, num_kv_heads, scale)


def index_tables(
    kernel: str,
    inputs: IndexInputs,
    seq_lens: Tensor,
    req_to_token: Tensor,
    max_cells: int,
    dtype: torch.dtype = torch.int64,
) -> tuple[Tensor, Tensor]:
    """This step's decode tables ``(indptr [L, B * H + 1], indices [L, width])`` of every layer (see
    ``index_tables.decode_index_tables``). ``max_cells`` bounds any layer's cell count (``H * sum(seq_lens)``
    always does: a head keeps at most its request's positions). The torch version sizes ``indices`` to the
    fullest layer (one host sync); the Triton one fills ``max_cells`` columns, zeros past each layer's count,
    with no host sync."""
    if kernel == "torch":
        return decode_index_tables(inputs, seq_lens, req_to_token, dtype=dtype)
    if kernel != "triton":
        raise ValueError(f"unknown layout kernel {kernel!r}; known: {', '.join(LAYOUT_KERNELS)}")
    from .triton_index_tables import decode_index_tables_triton

    layers, batch, heads = inputs.seg_len.shape
    device = inputs.seg_len.device
    indptr = torch.empty(layers, batch * heads + 1, dtype=dtype, device=device)
    indices = torch.zeros(layers, max(max_cells, 1), dtype=dtype, device=device)
    decode_index_tables_triton(inputs, seq_lens, req_to_token, indptr, indices)
    return indptr, indices


def layer_packer(kernel: str, k_layers: Sequence[Tensor], v_layers: Sequence[Tensor]) -> Callable[[PackMoves], None]:
    """A function applying ``PackMoves`` to these per-layer K/V buffers with ``kernel`` (``pack.pack_cells`` or
    ``triton_pack.pack_cells_triton``). Made once per pool: the Triton version's table of layer addresses is
    built here (the buffers never move)."""
    if kernel == "torch":
        return lambda moves: pack_cells(k_layers, v_layers, moves)
    if kernel != "triton":
        raise ValueError(f"unknown layout kernel {kernel!r}; known: {', '.join(LAYOUT_KERNELS)}")
    from .triton_pack import layer_table, pack_cells_triton

    table = layer_table(k_layers, v_layers)
    return lambda moves: pack_cells_triton(k_layers, v_layers, moves, table)
