"""Imported by ``madakv_cpu_shims.pth`` at interpreter start: install the import hook, nothing else.

Must stay cheap (no torch import here); the real work happens only when ``sgl_kernel``,
``sglang`` or ``torchvision`` is imported.
"""

import os

from madakv_sglang._cpu_shims import DISABLE_ENV

if os.environ.get(DISABLE_ENV) != "1":
    from madakv_sglang._cpu_shims.finder import install

    install()
