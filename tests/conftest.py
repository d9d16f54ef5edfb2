"""Markers applied at collection.

- ``gpu``: GPU tests run where CUDA is present and are reported as skipped, with the reason, everywhere else.
- ``engine``: tests that start SGLang (a server, an ``Engine`` or its resolution pipeline in a subprocess), so
  ``pytest -m "not engine"`` is the quick run. Whole modules, plus the tests of mixed modules that use a fixture
  starting SGLang; CI runs everything.
"""

from __future__ import annotations

import pytest
import torch

ENGINE_MODULES = frozenset(
    {
        "test_demo",
        "test_edges",
        "test_engine_smollm2",
        "test_engine_prefill_evict",
        "test_engine_text",
        "test_engine_tp",
        "test_engine_vlm",
        "test_needle_vlm",
        "test_offline_throughput",
    }
)
# Fixtures of mixed modules that start SGLang, and the tests there that start it themselves.
ENGINE_FIXTURES = frozenset({"quick_runs", "server_factory", "vl_server", "launcher", "report", "smol_server"})
ENGINE_TESTS = frozenset({"test_cli_against_sglang_with_madakv"})


def _starts_sglang(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    name = getattr(item, "originalname", item.name)
    fixtures = set(getattr(item, "fixturenames", ()))
    return (
        (module is not None and module.__name__.rsplit(".", 1)[-1] in ENGINE_MODULES)
        or bool(fixtures & ENGINE_FIXTURES)
        or name in ENGINE_TESTS
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine); run on the GPU machine")
    for item in items:
        if _starts_sglang(item):
            item.add_marker(pytest.mark.engine)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
