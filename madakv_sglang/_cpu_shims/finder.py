"""A ``sys.meta_path`` finder that applies the CPU shims at the moment SGLang needs them.

It only acts on three module names and otherwise returns ``None`` at once, so every other
import costs one set lookup.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

_STUB_FILE = os.path.join(os.path.dirname(__file__), "sgl_kernel_stub.py")


def _sglang_pre_exec() -> None:
    from madakv_sglang._cpu_shims import torch_fixes

    torch_fixes.install_sgl_kernel_ops(real_sgl_kernel=_real_sgl_kernel_exists())


def _torchvision_pre_exec() -> None:
    from madakv_sglang._cpu_shims import torch_fixes

    torch_fixes.define_torchvision_schemas()


# module name -> hook run just before the real module's code executes.
# torchvision: hooked at `_meta_registrations`, the first module that needs `torchvision::nms`.
# It runs after `torchvision.extension` has tried to load `_C.so`, so a torchvision whose
# extension does load (CUDA torch, or a CPU build from source) keeps its own schemas.
_PRE_EXEC: dict[str, Callable[[], None]] = {
    "sglang": _sglang_pre_exec,
    "torchvision._meta_registrations": _torchvision_pre_exec,
}
_NAMES = frozenset(_PRE_EXEC) | {"sgl_kernel"}


class _PreExecLoader(importlib.abc.Loader):
    """Wraps the real loader: run a hook, then let the real loader execute the module as usual."""

    def __init__(self, real: importlib.abc.Loader, hook: Callable[[], None]) -> None:
        self._real = real
        self._hook = hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Put the real loader back so the module looks untouched (importlib.reload, inspect, ...).
        module.__loader__ = self._real
        if module.__spec__ is not None:
            module.__spec__.loader = self._real
        self._hook()
        self._real.exec_module(module)  # type: ignore[attr-defined]


class CpuShimFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _NAMES:
            return None
        spec = _find_elsewhere(fullname, path, target)
        if fullname == "sgl_kernel":
            # Never shadow a real install: the stub is only the last resort.
            return spec if spec is not None else importlib.util.spec_from_file_location(fullname, _STUB_FILE)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PreExecLoader(spec.loader, _PRE_EXEC[fullname])
        return spec


def _find_elsewhere(
    fullname: str, path: Sequence[str] | None, target: ModuleType | None
) -> importlib.machinery.ModuleSpec | None:
    """The spec the import system would produce without us."""
    for finder in sys.meta_path:
        if isinstance(finder, CpuShimFinder):
            continue
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        spec = find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


def _real_sgl_kernel_exists() -> bool:
    mod = sys.modules.get("sgl_kernel")
    if mod is not None:
        return not getattr(mod, "__madakv_stub__", False)
    return _find_elsewhere("sgl_kernel", None, None) is not None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, CpuShimFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, CpuShimFinder())
