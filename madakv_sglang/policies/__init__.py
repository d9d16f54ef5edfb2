"""KV eviction policies: pure tensor math, no engine imports (docs/design.md §2)."""

from madakv_sglang.policies.base import LOCAL, Comm, LocalComm, Policy, PolicyInputs, Selection
from madakv_sglang.policies.registry import get_policy, policy_names, register_policy

__all__ = [
    "LOCAL",
    "Comm",
    "LocalComm",
    "Policy",
    "PolicyInputs",
    "Selection",
    "get_policy",
    "policy_names",
    "register_policy",
]
