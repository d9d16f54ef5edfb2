"""Scheduler hooks that let a chunk-evicting request's prompt be longer than the KV pool (docs/design.md §5).

SGLang measures every request by its whole prompt: it refuses a prompt of ``min(context, pool) - 6`` tokens or
more at arrival (``max_req_input_len``) and clips the output to what the whole prompt leaves of the pool. A request
under ``--kv-prefill-evict chunk`` never holds its whole prompt: at most its cut size plus one chunk while it is
prefilled, its kept slots plus its output after (:mod:`madakv_sglang.engine.admission`). For such a request, and
only while SGLang takes it in (``Scheduler.handle_generate_request``), these hooks

- raise the scheduler's length limits to the context's, so the prompt is bounded by the model, not the pool;
- clip its output to what its kept slots leave of the pool, as SGLang clips by the whole prompt;
- refuse it, with SGLang's own abort path and a message that says why, when its prefill peak does not fit.

A prompt below SGLang's own limit is measured exactly as SGLang measures it. Other requests are not touched.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

from madakv_sglang.config import PolicyConfig
from madakv_sglang.engine.admission import kept_slots, prefill_peak_slots
from madakv_sglang.engine.environment import is_compressing

RESERVED = 5  # SGLang's max_req_input_len = max_req_len - 5 (managers/tp_worker.py)


@dataclass(frozen=True)
class PoolLimits:
    """What SGLang would have allowed (by the pool) and what the request is measured against instead."""

    config: PolicyConfig
    stride: int
    pool_input_len: int  # SGLang's max_req_input_len
    capacity: int  # slots the pool holds
    page_size: int


_ACTIVE: contextvars.ContextVar[PoolLimits | None] = contextvars.ContextVar("madakv_pool_limits", default=None)


def install_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    scheduler = "sglang.srt.managers.scheduler.Scheduler"
    HookRegistry.register(f"{scheduler}.handle_generate_request", _around_handle_generate_request, HookType.AROUND)
    HookRegistry.register(f"{scheduler}.init_req_max_new_tokens", _around_init_req_max_new_tokens, HookType.AROUND)
    HookRegistry.register(
        "sglang.srt.managers.utils.validate_input_length", _around_validate_input_length, HookType.AROUND
    )


def output_limit(prompt_len: int, limits: PoolLimits) -> int:
    """The most output tokens a request of ``prompt_len`` tokens can hold in an empty pool: SGLang's rule (the
    capacity less the prompt, a page and one slot) with the kept slots in place of the prompt, less one more slot.
    Without a radix tree SGLang admits an ``ignore_eos`` request only if its simulation leaves more than
    ``IGNORE_EOS_RESERVE_TOKENS`` (1) free, which a request clipped by SGLang's own rule never does: stock SGLang
    0.5.23 with ``--disable-radix-cache`` never admits one (measured: a 500-token prompt asking for 1,500 tokens
    on a 900-slot pool waits forever)."""
    return max(0, limits.capacity - kept_slots(prompt_len, limits.config) - limits.page_size - 2)


def refusal(prompt_len: int, limits: PoolLimits) -> str | None:
    """Why a prompt above SGLang's limit cannot be served (its prefill peak does not fit), or None."""
    peak = prefill_peak_slots(prompt_len, limits.config, limits.stride)
    if peak < limits.pool_input_len:
        return None
    return (
        f"Input length ({prompt_len} tokens) exceeds the KV pool's limit ({limits.pool_input_len} tokens), and with "
        f"--kv-prefill-evict chunk it would still hold {peak} slots while it is prefilled (its cut size plus one "
        f"chunk of {limits.stride}). Use a shorter input, a smaller --kv-budget or --kv-prefill-keep, or a larger pool."
    )


def _limits(scheduler: Any, recv_req: Any) -> PoolLimits | None:
    from madakv_sglang.engine.reclaim import request_policy

    stride = getattr(scheduler, "chunked_prefill_size", None)
    config = request_policy(recv_req)
    if not (is_compressing(config) and config.prefill_evict == "chunk" and stride is not None and stride > 0):
        return None
    capacity = int(scheduler.max_total_num_tokens)
    return PoolLimits(config, int(stride), int(scheduler.max_req_input_len), capacity, int(scheduler.page_size))


def _around_handle_generate_request(original: Any, scheduler: Any, recv_req: Any, *args: Any, **kwargs: Any) -> Any:
    limits = _limits(scheduler, recv_req)
    if limits is None:
        return original(scheduler, recv_req, *args, **kwargs)
    saved = scheduler.max_req_len, scheduler.max_req_input_len
    context_len = int(scheduler.model_config.context_len) - 1
    scheduler.max_req_len, scheduler.max_req_input_len = context_len, context_len - RESERVED
    token = _ACTIVE.set(limits)
    try:
        return original(scheduler, recv_req, *args, **kwargs)
    finally:
        _ACTIVE.reset(token)
        scheduler.max_req_len, scheduler.max_req_input_len = saved


def _around_init_req_max_new_tokens(original: Any, scheduler: Any, req: Any) -> Any:
    """SGLang clips by the context (the limit raised above) and by the whole prompt's share of the pool, which is
    the pool's own rule for a prompt below its limit. Above it (nothing left), the output is clipped again from
    what was asked, by the context and by the kept slots' share."""
    limits = _ACTIVE.get()
    asked = req.sampling_params.max_new_tokens
    result = original(scheduler, req)
    prompt_len = len(req.origin_input_ids)
    if limits is None or prompt_len < limits.pool_input_len:
        return result
    wanted = asked if asked is not None else 1 << 30
    limit = getattr(scheduler, "max_new_tokens_limit", None)
    if limit is not None and limit > 0:
        wanted = min(wanted, limit)
    clipped = max(0, min(wanted, scheduler.max_req_len - prompt_len - 1, output_limit(prompt_len, limits)))
    req.sampling_params.max_new_tokens = clipped
    req.sampling_params.min_new_tokens = min(req.sampling_params.min_new_tokens, clipped)
    return result


def _around_validate_input_length(original: Any, req: Any, max_req_input_len: int, *args: Any, **kwargs: Any) -> Any:
    limits = _ACTIVE.get()
    if limits is None:
        return original(req, max_req_input_len, *args, **kwargs)
    prompt_len = len(req.origin_input_ids)
    if prompt_len < limits.pool_input_len:
        return original(req, limits.pool_input_len, *args, **kwargs)
    if prompt_len >= max_req_input_len:
        return original(req, max_req_input_len, *args, **kwargs)  # above the context: SGLang's message
    return refusal(prompt_len, limits)


__all__ = ["PoolLimits", "install_hooks", "output_limit", "refusal"]
