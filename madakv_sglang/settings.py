"""Every policy setting a user can give, and the one parser every entry point goes through.

The settings are the fields of :class:`~madakv_sglang.config.PolicyConfig` plus the options the registered
policies declare (``seed``, ``pyramid_beta``, ``adakv_alpha``). Flags (``plan``, the server's ``--kv-*``), the
``MADAKV_KV_*`` environment, per-request ``custom_params`` and Python callers all build their config through
:func:`parse_settings`, which validates every value once and checks the policy name against the registry. This is
the edge where the registry (and so torch) is imported; ``config`` itself stays a leaf.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from madakv_sglang.config import CHOICES, FIELDS, PolicyConfig
from madakv_sglang.policies.registry import get_policy, policy_names, policy_options

_HELP = {
    "policy": "eviction policy",
    "budget": "per-head per-layer budget: a ratio of the prompt (0.1) or tokens (512)",
    "window": "observation window W: last prompt tokens that score the rest; always kept",
    "theta": "HCC coverage ratio of a modality's attention mass",
    "pooling": "score pooling for ranking only (never across modalities)",
    "pool_kernel": "pooling kernel size (odd)",
    "gqa": "reduction of the query heads of a KV group",
    "hcc": "layer allotment: global water-filling, the paper's recurrence, or off",
    "cap": "per-layer cap as a multiple of H*B, or none",
    "head_split": "how a layer's cells are split over its heads",
    "mpa": "modality preference adaptation (on/off)",
    "min_keep": "per-head floor; a budget below it is raised to it (default: none, every head keeps its sinks "
    "and kept window)",
    "sink": "attention sinks: the first prompt tokens every score-based policy (and streamingllm) keeps",
    "window_share": "largest share of the budget left after the sinks that the kept window takes",
    "min_prompt": "prompts shorter than this many tokens are not compressed",
    "min_reclaim": "prompts whose budget would reclaim less than this share of them are not compressed",
    "layout": "where kept cells live: shared (all layers' cells are one pool) or per-layer (each layer's own)",
    "prefill_evict": "chunk: after every prefill chunk but the last, cut the prompt so far to prefill_keep x its "
    "final budget, so a long prompt never holds all its slots (needs --chunked-prefill-size)",
    "prefill_keep": "what a cut between prefill chunks keeps, as a multiple of the final budget (>= 1)",
    "prefill_split": "how a cut between prefill chunks splits what it keeps: by modality attention mass, or none",
    "radix": "SGLang's prefix cache with a compressing policy: prompts share their dense prefix through the tree "
    "and compress their own copy; auto is on unless --kv-prefill-evict chunk or --disable-radix-cache",
}


def setting_names() -> tuple[str, ...]:
    """The config's fields, then the policies' options (sorted): the names of flags, env vars and overrides."""
    return FIELDS + tuple(sorted(policy_options()))


def parse_settings(values: Mapping[str, Any], base: PolicyConfig | None = None) -> PolicyConfig:
    """``base`` (default: ``PolicyConfig()``) with ``{setting: text or value}`` applied, every value validated and
    the policy name checked against the registry. Raises ConfigError naming the setting."""
    config = PolicyConfig.from_strings(values, base=base, options=policy_options())
    get_policy(config.policy)
    return config


def policy_config(**values: Any) -> PolicyConfig:
    """The Python caller's way in: ``policy_config(policy="adakv", budget=0.1, adakv_alpha=0.3)``."""
    return parse_settings(values)


def flag_name(name: str, prefix: str = "") -> str:
    """``head_split`` -> ``--kv-head-split`` (with prefix ``kv-``)."""
    return "--" + prefix + name.replace("_", "-")


def add_setting_arguments(parser: Any, prefix: str = "", names: tuple[str, ...] | None = None) -> None:
    """One flag per setting (all of them unless ``names``); defaults and choices come from the config and the
    registry. Every flag defaults to None, so callers can tell "not given" from the default."""
    defaults = PolicyConfig().to_strings()
    options = policy_options()
    for name in names or setting_names():
        if name in options:
            help_text, default = options[name].help, str(options[name].default)
        else:
            help_text, default = _HELP[name], defaults.get(name, "none")
        parser.add_argument(
            flag_name(name, prefix),
            dest=prefix.replace("-", "_") + name,
            default=None,
            choices=policy_names() if name == "policy" else CHOICES.get(name),
            help=f"{help_text} (default: {default})",
        )


def config_from_arguments(namespace: Any, prefix: str = "", base: PolicyConfig | None = None) -> PolicyConfig:
    """The config described by flags added with :func:`add_setting_arguments`."""
    dest = prefix.replace("-", "_")
    return parse_settings({name: getattr(namespace, dest + name, None) for name in setting_names()}, base=base)
