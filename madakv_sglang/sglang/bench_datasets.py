"""Let SGLang's benchmark scripts import where the ``datasets`` package is missing.

SGLang 0.5.23's ``sglang.benchmark.datasets`` imports ``datasets`` at start-up for its MMMU loader, so both
``sglang.benchmark.serving`` and ``sglang.benchmark.offline_throughput`` die on import without it. Our CPU venv
does not install it (it brings pyarrow and pandas, and no dataset can be downloaded here anyway). The stand-in
refuses ``load_dataset`` with a clear message; the synthetic datasets (``image``, ``random-ids``,
``generated-shared-prefix``) never call it.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any


def allow_missing_datasets() -> None:
    """Install the stand-in as ``datasets`` unless the real package is importable."""
    if "datasets" in sys.modules or importlib.util.find_spec("datasets") is not None:
        return  # the real package, or the stand-in of an earlier call (find_spec refuses a module without a spec)
    stub = types.ModuleType("datasets")

    def load_dataset(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the 'datasets' package is not installed: use a synthetic dataset (image, random-ids, "
                           "generated-shared-prefix) or pip install datasets")

    stub.load_dataset = load_dataset  # type: ignore[attr-defined]
    sys.modules["datasets"] = stub
