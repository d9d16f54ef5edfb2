"""Per-request policy overrides carried in ``sampling_params.custom_params``.

SGLang passes ``custom_params`` through untouched from ``/generate`` (``sampling_params.custom_params``), from the
OpenAI chat and completions routes (a top-level ``custom_params`` field, i.e. ``extra_body={"custom_params": ...}``
with the OpenAI client) and from ``Engine.generate(sampling_params=...)``; no server flag is needed (only
``custom_logit_processor`` needs ``--enable-custom-logit-processor``). The keys are the PolicyConfig fields with a
``kv_`` prefix (``kv_policy``, ``kv_budget``, ``kv_window``, ...); other keys belong to other features and are
ignored. The tokenizer process validates them (a bad override is an HTTP 400); the scheduler re-derives the same
configuration from the same keys (``reclaim.request_policy``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from madakv_sglang.config import POLICY_FIELDS, ConfigError, PolicyConfig
from madakv_sglang.sglang.settings import check_servable, is_compressing, servable_policy_names

KEY_PREFIX = "kv_"
OVERRIDE_KEYS: tuple[str, ...] = tuple(KEY_PREFIX + name for name in POLICY_FIELDS)


def override_keys(custom_params: Mapping[str, Any] | None) -> list[str]:
    """The ``kv_*`` keys of ``custom_params`` (known or not) in request order; a null value counts as absent."""
    if not custom_params:
        return []
    return [k for k, v in custom_params.items() if isinstance(k, str) and k.startswith(KEY_PREFIX) and v is not None]


def request_config(custom_params: Mapping[str, Any] | None, base: PolicyConfig) -> PolicyConfig:
    """The configuration one request runs with: ``base`` (the server's) with its ``kv_*`` overrides applied.

    Returns ``base`` itself when there is no ``kv_*`` key (or only null ones). Raises ConfigError, with a message
    naming the key, on an unknown ``kv_*`` key, a value that is not a JSON scalar, an invalid value, an HF-only
    policy, or any override on a server whose configured policy is ``full`` (that server runs stock SGLang and has
    no madakv backend).
    Values may be JSON numbers, booleans or strings: ``{"kv_budget": 0.1}`` and ``{"kv_budget": "0.1"}`` agree.
    """
    keys = override_keys(custom_params)
    if not keys:
        return base
    assert custom_params is not None
    if not is_compressing(base):
        choices = ", ".join(name for name in servable_policy_names() if name != "full")
        raise ConfigError(
            f"custom_params.{keys[0]}: per-request KV-cache overrides need a compressing server; this one runs "
            f"stock SGLang (--kv-policy full). Start the server with --kv-policy {{{choices}}} to use them"
        )
    values: dict[str, str | None] = {}
    for key in keys:
        name = key[len(KEY_PREFIX):]
        if name not in POLICY_FIELDS:
            raise ConfigError(f"custom_params.{key}: unknown setting; known: {', '.join(OVERRIDE_KEYS)}")
        values[name] = _as_text(key, custom_params[key])
    try:
        config = PolicyConfig.from_strings(values, base=base)
        check_servable(config)
    except ConfigError as err:
        raise ConfigError(f"custom_params.{_rename(str(err))}") from None
    return config


def _as_text(key: str, value: Any) -> str | None:
    # JSON numbers and booleans go through their text form so the CLI parsers apply unchanged, and a float
    # never silently truncates into an integer field (int("3.7") fails where int(3.7) would give 3).
    if value is None:
        return None
    if isinstance(value, (str, int, float)):  # bool is an int: str(True) == "True", which the on/off parser reads
        return str(value)
    raise ConfigError(f"custom_params.{key}: expected a number, a string or a boolean, got {type(value).__name__}")


def _rename(message: str) -> str:
    """``budget: ...`` -> ``kv_budget: ...`` so the error names the key the client sent."""
    head, sep, rest = message.partition(":")
    if sep and head in POLICY_FIELDS:
        return f"{KEY_PREFIX}{head}:{rest}"
    return message
