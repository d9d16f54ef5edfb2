"""Pick the head-wise decode implementation for a device. The torch reference is always there; a GPU kernel is
added as a row of ``_LAZY`` (a probe saying whether it can run here, and a loader importing its module on first
use, so that importing ``madakv_sglang.kernels`` never loads Triton or CUDA code), together with a test against
the reference."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

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


def decode_kernel_for(device: str | torch.device, environ: Mapping[str, str] | None = None) -> str:
    """The decode kernel a backend on ``device`` uses: ``MADAKV_DECODE_KERNEL`` if set (refused when it cannot
    run here), else Triton on CUDA (no host plan, safe under CUDA graphs) and the torch reference elsewhere."""
    environ = os.environ if environ is None else environ
    choice = environ.get(KERNEL_ENV, "auto").strip() or "auto"
    if choice == "auto":
        return "triton" if torch.device(device).type == "cuda" and _triton_runnable() else "torch"
    if choice != "torch" and torch.device(device).type != "cuda" and environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{KERNEL_ENV}={choice}: the {choice} decode kernel needs a CUDA device")
    _resolve(choice)  # unknown or not runnable here: a clear error at start-up, not at the first decode
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
