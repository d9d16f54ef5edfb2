"""madakv-sglang: MadaKV multimodal KV-cache eviction (and baselines) for the SGLang serving engine.

Importing the package is cheap (no torch); the pieces load on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PolicyConfig": "madakv_sglang.config",
    "Budget": "madakv_sglang.config",
    "ConfigError": "madakv_sglang.config",
    "get_policy": "madakv_sglang.policies",
    "policy_names": "madakv_sglang.policies",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'madakv_sglang' has no attribute {name!r}")
