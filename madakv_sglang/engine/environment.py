"""How the policy configuration travels from the command line to every SGLang process.

SGLang's ``ServerArgs`` cannot take new fields from outside, so the ``--kv-*`` flags are turned into
environment variables (``MADAKV_KV_POLICY``, ``MADAKV_KV_BUDGET``, ...) in the launching process; the
scheduler processes SGLang spawns (every TP rank) inherit them. Multi-node launches set them on every
node (the launcher does). This module is the single reader and writer of those variables; what they may hold is
``madakv_sglang.settings``'s business.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from madakv_sglang.config import ConfigError, PolicyConfig
from madakv_sglang.settings import parse_settings, setting_names

ENV_PREFIX = "MADAKV_KV_"
# The dense attention backend the madakv backend delegates prefill to; written by the plugin's resolution hook
# (the backend SGLang would have picked), read by the backend factory in every scheduler process.
BASE_BACKEND_ENV = "MADAKV_BASE_BACKEND"
SERVER_DEFAULT_POLICY = "full"
# Policies the engine cannot run: h2o needs the attention of every prompt query, which a serving
# prefill does not materialise (docs/design.md §2).
HF_ONLY_POLICIES = frozenset({"h2o"})


def env_name(field_name: str) -> str:
    """``head_split`` -> ``MADAKV_KV_HEAD_SPLIT``."""
    return ENV_PREFIX + field_name.upper()


def server_default() -> PolicyConfig:
    """The configuration of a server started without ``--kv-*`` flags: SGLang's stock behaviour."""
    return PolicyConfig(policy=SERVER_DEFAULT_POLICY)


def config_from_env(environ: Mapping[str, str] | None = None) -> PolicyConfig:
    """The configuration the environment describes, parsed and validated now; raises ConfigError naming the
    variable on a bad value. Code that runs per request or per batch uses :func:`server_config`."""
    environ = os.environ if environ is None else environ
    return _parse(tuple(environ.get(env_name(name)) for name in setting_names()))


def server_config() -> PolicyConfig:
    """This process's configuration, parsed once: the ``MADAKV_KV_*`` variables are read on every call (a dict
    lookup each) and parsed again only when they changed, which happens once, in the launching process, when
    its ``--kv-*`` flags are written. The schedulers, the tokenizer and the HTTP server parse them once."""
    return _parse(tuple(os.environ.get(env_name(name)) for name in setting_names()))


@functools.lru_cache(maxsize=4)
def _parse(texts: tuple[str | None, ...]) -> PolicyConfig:
    values = dict(zip(setting_names(), texts, strict=True))
    try:
        config = parse_settings(values, base=server_default())
    except ConfigError as err:
        raise ConfigError(f"{err} (from the {ENV_PREFIX}* environment)") from None
    check_servable(config)
    return config


def servable_policy_names() -> tuple[str, ...]:
    """Policy names the engine accepts (``--kv-policy`` choices): every registered policy but the HF-only ones."""
    from madakv_sglang.policies import policy_names

    return tuple(name for name in policy_names() if name not in HF_ONLY_POLICIES)


def env_may_compress(environ: Mapping[str, str] | None = None) -> bool:
    """Cheap pre-check without building a PolicyConfig: False when no compressing policy is configured."""
    environ = os.environ if environ is None else environ
    return environ.get(env_name("policy"), SERVER_DEFAULT_POLICY).strip() != SERVER_DEFAULT_POLICY


def check_servable(config: PolicyConfig) -> None:
    """Refuse configurations the policy core accepts but the engine cannot run."""
    if config.policy in HF_ONLY_POLICIES:
        raise ConfigError(
            f"policy: {config.policy!r} needs every prompt query's attention and runs in the HF path only"
        )
    if config.prefill_evict == "chunk" and is_compressing(config):
        from madakv_sglang.policies import get_policy, policy_names

        if get_policy(config.policy).score_source != "window":
            scored = [name for name in policy_names() if get_policy(name).score_source == "window"]
            raise ConfigError(
                f"prefill_evict: chunk cuts the prompt by the observation window's attention, which policy "
                f"{config.policy!r} does not use; use prefill_evict off, or one of {', '.join(scored)}"
            )


def config_to_env(config: PolicyConfig, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Write ``config`` as environment variables (every setting's variable is cleared first, so none is stale)."""
    environ = os.environ if environ is None else environ
    values = {env_name(name): text for name, text in config.to_strings().items()}
    for name in setting_names():
        environ.pop(env_name(name), None)
    environ.update(values)
    return values


def is_compressing(config: PolicyConfig) -> bool:
    """``full`` keeps every token and must leave SGLang untouched."""
    return config.policy != "full"


def use_policy(policy: str = "madakv", budget: Any = "0.2", **settings: Any) -> PolicyConfig:
    """Configure the ``sglang.Engine`` this process starts next (and every process it spawns): validates the
    settings, writes them to the environment and returns the config::

        madakv_sglang.engine.environment.use_policy("madakv", budget=0.1)
        engine = sglang.Engine(model_path=...)
    """
    values = {"policy": policy, "budget": budget, **settings}
    config = parse_settings({k: None if v is None else str(v) for k, v in values.items()}, base=server_default())
    check_servable(config)
    config_to_env(config)
    return config
