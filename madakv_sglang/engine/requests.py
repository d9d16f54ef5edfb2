"""Per-request checks: policy overrides carried in ``sampling_params.custom_params``, token budgets against the
model's context length, and empty prompts.

SGLang passes ``custom_params`` through untouched from ``/generate`` (``sampling_params.custom_params``), from the
OpenAI chat and completions routes (a top-level ``custom_params`` field, i.e. ``extra_body={"custom_params": ...}``
with the OpenAI client) and from ``Engine.generate(sampling_params=...)``; no server flag is needed (only
``custom_logit_processor`` needs ``--enable-custom-logit-processor``). The keys are the PolicyConfig fields with a
``kv_`` prefix (``kv_policy``, ``kv_budget``, ``kv_window``, ...); other keys belong to other features and are
ignored. The tokenizer process validates them (a bad override is an HTTP 400); the scheduler re-derives the same
configuration from the same keys (``reclaim.request_policy``).

:func:`check_generate_input` runs the same checks on a whole ``GenerateReqInput`` in the HTTP layer, before
SGLang opens a stream: a streamed request's tokenizer errors would otherwise arrive as an event inside an HTTP 200.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from madakv_sglang.config import ConfigError, PolicyConfig
from madakv_sglang.engine.environment import check_servable, is_compressing, servable_policy_names
from madakv_sglang.settings import parse_settings, setting_names

KEY_PREFIX = "kv_"
# SGLang 0.5.23 cannot prefill an empty prompt: on M-RoPE models (Qwen2-VL, Qwen2.5-VL) the scheduler dies on a
# 0-element reshape and takes the server with it (docs/known-issues.md). A compressing server refuses it instead.
EMPTY_PROMPT = (
    "madakv: the prompt is empty (0 tokens); send at least one token. SGLang 0.5.23 cannot prefill an "
    "empty prompt (on Qwen2-VL its scheduler dies), so a --kv-policy server refuses it"
)
_MULTIMODAL_FIELDS = ("image_data", "video_data", "audio_data", "input_embeds")


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
        name = key[len(KEY_PREFIX) :]
        if name not in setting_names():
            known = ", ".join(KEY_PREFIX + known for known in setting_names())
            raise ConfigError(f"custom_params.{key}: unknown setting; known: {known}")
        values[name] = _as_text(key, custom_params[key])
    try:
        config = parse_settings(values, base=base)
        check_servable(config)
    except ConfigError as err:
        raise ConfigError(f"custom_params.{_rename(str(err))}") from None
    if config.layout != base.layout:
        raise ConfigError(
            f"custom_params.{KEY_PREFIX}layout: the KV layout is a property of the server's KV pool, set at start-up "
            f"with --kv-layout (this server runs {base.layout!r}); a request cannot change it"
        )
    if config.radix != base.radix:
        raise ConfigError(
            f"custom_params.{KEY_PREFIX}radix: the prefix cache is a property of the server, set at start-up with "
            f"--kv-radix (this server runs {base.radix!r}); a request cannot change it"
        )
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
    if sep and head in setting_names():
        return f"{KEY_PREFIX}{head}:{rest}"
    return message


def check_token_budget(config: PolicyConfig, context_len: int | None, name: str) -> None:
    """Refuse a token budget above the model's context length: no prompt is that long, so such a budget keeps
    every token and compression is silently off (``1.5e9`` parses as 1500000000 tokens). ``name`` is what the
    user set (``--kv-budget``, ``custom_params.kv_budget``)."""
    tokens = config.budget.tokens
    if context_len is None or tokens is None or not is_compressing(config) or tokens <= context_len:
        return
    raise ConfigError(
        f"{name}: {tokens} tokens is above the model's context length ({context_len} tokens), so it would keep "
        f"every token; give a ratio of the prompt (0.1) or at most {context_len} tokens"
    )


def check_request(custom_params: Mapping[str, Any] | None, base: PolicyConfig, context_len: int | None) -> PolicyConfig:
    """:func:`request_config` plus the context-length check of a per-request token budget."""
    config = request_config(custom_params, base)
    if config is not base:
        check_token_budget(config, context_len, f"custom_params.{KEY_PREFIX}budget")
    return config


def check_prompt_tokens(input_ids: Sequence[int] | None) -> None:
    """The tokenizer's last word on an empty prompt (a chat or a text that tokenized to nothing included)."""
    if input_ids is not None and len(input_ids) == 0:
        raise ValueError(EMPTY_PROMPT)


def check_generate_input(obj: Any, base: PolicyConfig, context_len: int | None) -> None:
    """What the tokenizer hooks would refuse, checked on an un-normalized ``GenerateReqInput`` (single or batch).

    Raises ValueError (ConfigError for overrides) on a bad ``custom_params`` in any item's sampling parameters and,
    on a compressing server, on an empty text or ``input_ids`` without multimodal data (with images the
    processor makes the tokens, so only the tokenizer hook can tell).
    """
    for params in _sampling_dicts(getattr(obj, "sampling_params", None)):
        check_request(params.get("custom_params"), base, context_len)
    if not is_compressing(base) or any(getattr(obj, name, None) for name in _MULTIMODAL_FIELDS):
        return
    if any(len(prompt) == 0 for prompt in _prompts(obj)):
        raise ValueError(EMPTY_PROMPT)


def _sampling_dicts(sampling_params: Any) -> list[Mapping[str, Any]]:
    """One dict for a single request (or one shared by a batch), one per item for a batch list."""
    if isinstance(sampling_params, Mapping):
        return [sampling_params]
    if isinstance(sampling_params, list):
        return [params for params in sampling_params if isinstance(params, Mapping)]
    return []


def _prompts(obj: Any) -> list[Sequence[Any]]:
    """The prompt of every item: texts, or token lists (``input_ids`` wins, as in SGLang's tokenizer)."""
    input_ids = getattr(obj, "input_ids", None)
    if isinstance(input_ids, list):
        return input_ids if input_ids and isinstance(input_ids[0], list) else [input_ids]
    text = getattr(obj, "text", None)
    if isinstance(text, str):
        return [text]
    if isinstance(text, list):
        return [item for item in text if isinstance(item, str)]
    return []
