"""The torch-side half of the CPU shims; imported only when SGLang or torchvision is being imported."""

from __future__ import annotations

from typing import Any, NoReturn

import torch

# Kept alive on purpose: a torch.library.Library drops its registrations when garbage-collected.
_torchvision_lib: torch.library.Library | None = None


def define_torchvision_schemas() -> None:
    """Define ``torchvision::nms``/``qnms`` when torchvision's ``_C.so`` could not provide them.

    ``torchvision/_meta_registrations.py`` registers fakes for both at import time and dies with
    "operator torchvision::nms does not exist" otherwise. Only schemas are defined: calling
    ``torchvision.ops.nms`` still fails with torch's "could not run ... with arguments from the CPU
    backend"; the parts SGLang and transformers use (transforms, InterpolationMode) work.
    """
    global _torchvision_lib
    if torch.version.cuda is not None or _torchvision_lib is not None:
        return
    missing = [op for op in ("nms", "qnms") if not hasattr(torch.ops.torchvision, op)]
    if not missing:
        return
    # FRAGMENT, not DEF: it must not claim the namespace for itself.
    _torchvision_lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in missing:
        _torchvision_lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _SglKernelOps:
    """Stands in for ``torch.ops.sgl_kernel``: real ops first, then stubs for ``*_cpu`` names only.

    SGLang's CPU code binds ``torch.ops.sgl_kernel.<name>_cpu`` at import time (e.g.
    ``models/qwen3_5.py`` reads ``fused_sigmoid_mul_cpu``, which the Qwen-VL mm-processor imports),
    while probes such as ``register_fake_if_exists("sgl_kernel::gptq_marlin_repack")`` and the AMX
    check ``hasattr(torch.ops.sgl_kernel, "convert_weight_packed")`` must keep answering "absent".
    """

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(self._real, name)
        except AttributeError:
            if name.startswith("_") or not name.endswith("_cpu"):
                raise
        return _unavailable_op(name)


def _unavailable_op(name: str) -> Any:
    def op(*args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError(
            f"torch.ops.sgl_kernel.{name} was called, but no sgl_kernel CPU library is loaded: "
            f"madakv_sglang's CPU shims only answer this name so that SGLang modules import."
        )

    op.__name__ = op.__qualname__ = name
    return op


def install_sgl_kernel_ops(*, real_sgl_kernel: bool) -> None:
    """Install :class:`_SglKernelOps` as ``torch.ops.sgl_kernel`` unless a real sgl_kernel exists."""
    if real_sgl_kernel or isinstance(torch.ops.__dict__.get("sgl_kernel"), _SglKernelOps):
        return
    real = torch.ops.sgl_kernel  # the lazily created _OpNamespace; it still resolves real ops.
    setattr(torch.ops, "sgl_kernel", _SglKernelOps(real))  # noqa: B010 (mypy: _Ops has no such attribute)
