"""CPU-only import shims that let SGLang 0.5.23 import and serve on a machine without CUDA.

SGLang imports two things that cannot load over the CPU build of torch:

* ``sgl_kernel``: its CPU build is not on PyPI and the CUDA wheel needs ``libcuda``. We provide
  :mod:`.sgl_kernel_stub` only when no real ``sgl_kernel`` is importable. Without AMX every SGLang
  layer falls back to plain torch, so no stub function is called on the paths we use.
* ``torchvision``: PyPI has only CUDA builds; its ``_C.so`` fails to load and the import then dies
  on the missing ``torchvision::nms`` schema. We define the two schemas it needs.

``scripts/setup.sh`` writes ``madakv_cpu_shims.pth`` into the venv, which imports :mod:`._activate`
at interpreter start (in every SGLang process). ``MADAKV_DISABLE_CPU_SHIMS=1`` turns all of it off.
Keep this package free of heavy imports: it runs at every interpreter start.
"""

DISABLE_ENV = "MADAKV_DISABLE_CPU_SHIMS"
