"""Stand-in for ``sgl_kernel``, loaded by madakv_sglang's CPU shims only when no real one is installed.

SGLang's CPU engine imports names from it at module level (e.g. ``copy_all_layer_kv_cache_cpu`` in
``kernels/ops/kvcache/cache_move.py``) but, without AMX, never calls them. Every attribute is
therefore a function that raises, naming itself, so a call can never pass silently. It is a plain
module, not a package: ``from sgl_kernel.x import y`` fails with ImportError, which SGLang expects
(e.g. ``get_scalar_types()`` then uses its own mock).
"""

from collections.abc import Callable
from typing import Any, NoReturn

__madakv_stub__ = True


def __getattr__(name: str) -> Callable[..., NoReturn]:
    if name.startswith("__"):  # dunders (__path__, __all__, ...) must stay absent for importlib.
        raise AttributeError(name)

    def unavailable(*args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError(
            f"sgl_kernel.{name} was called, but sgl_kernel here is madakv_sglang's CPU import stub "
            f"({__file__}): no real sgl_kernel is installed. Install SGLang's sgl-kernel build for "
            f"this machine, or keep to paths that fall back to plain torch (no AMX / torch_native)."
        )

    unavailable.__name__ = unavailable.__qualname__ = name
    return unavailable
