"""How the policy configuration travels from the command line to every SGLang process.

SGLang's ``ServerArgs`` cannot take new fields from outside, so the ``--kv-*`` flags are turned into
environment variables (``MADAKV_KV_POLICY``, ``MADAKV_KV_BUDGET``, ...) in the launching process; the
scheduler processes SGLang spawns (every TP rank) inherit them. Multi-node launches set them on every
node (the launcher does). This module is the single reader and writer of those variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from madakv_sglang.config import POLICY_FIELDS, ConfigError, PolicyConfig

ENV_PREFIX = "MADAKV_KV_"
# The dense attention backend the madakv backend delegates prefill to; written by the plugin's resolution hook
# (the backend SGLang would have picked), read by the backend factory in every scheduler process.
BASE_BACKEND_ENV = "MADAKV_BASE_BACKEND"
SERVER_DEFAULT_POLICY = "full"
# Policies the engine cannot run: h2o needs the attention of every prompt query, which a serving
# prefill does not materialise (DESIGN §2).
HF_ONLY_POLICIES = frozenset({"h2o"})


def env_name(field_name: str) -> str:
    """``head_split`` -> ``MADAKV_KV_HEAD_SPLIT``."""
    return ENV_PREFIX + field_name.upper()


def server_default() -> PolicyConfig:
    """The configuration of a server started without ``--kv-*`` flags: SGLang's stock behaviour."""
    return PolicyConfig(policy=SERVER_DEFAULT_POLICY)


def config_from_env(environ: Mapping[str, str] | None = None) -> PolicyConfig:
    """The active configuration; raises ConfigError naming the variable on a bad value."""
    environ = os.environ if environ is None else environ
    values = {name: environ.get(env_name(name)) for name in POLICY_FIELDS}
    try:
        config = PolicyConfig.from_strings(values, base=server_default())
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


def config_to_env(config: PolicyConfig, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Write ``config`` as environment variables (all fields, so stale ones are overwritten)."""
    environ = os.environ if environ is None else environ
    values = {env_name(name): text for name, text in config.to_strings().items()}
    for name in POLICY_FIELDS:
        environ.pop(env_name(name), None)
    environ.update(values)
    return values


def is_compressing(config: PolicyConfig) -> bool:
    """``full`` keeps every token and must leave SGLang untouched."""
    return config.policy != "full"


def engine_kwargs(policy: str = "madakv", budget: Any = "0.2", **settings: Any) -> dict[str, Any]:
    """Configure ``sglang.Engine`` for a policy: sets the environment this process and its children read.

    Returns the keyword arguments to pass to ``sglang.Engine`` besides the model's own; today that is
    nothing (the resolution hook derives the engine settings), but callers should splat it so future
    needs land without changing their code::

        engine = sglang.Engine(model_path=..., **madakv_sglang.engine_kwargs(policy="madakv", budget=0.1))
    """
    values = {"policy": policy, "budget": budget, **settings}
    texts = {k: None if v is None else str(v) for k, v in values.items()}
    config = PolicyConfig.from_strings(texts, base=server_default())
    check_servable(config)
    config_to_env(config)
    return {}
