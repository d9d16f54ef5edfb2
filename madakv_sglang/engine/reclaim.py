"""Scheduler-side hooks that return evicted prompt slots to SGLang's allocator (docs/design.md §5).

The backend packs a finished prompt's kept cells into the request's first M slots and points the row's
positions ``[M, n)`` at the padding slot 0. These hooks, installed in every scheduler process when a
compressing policy is configured, keep SGLang's bookkeeping exact:

- ``Scheduler.run_batch``: publish per-request facts the backend cannot see (prompt end, override, replay).
- ``Scheduler.process_batch_result``: free the evicted slots, before SGLang may release a finished request.
- ``TokenToKVPoolAllocator.free``: drop the padding slot 0 from frees (evicted positions point there), and in
  the NaN-poison debug mode overwrite freed slots so a later read of them shows.
- ``kv_private_tokens``: a packed request owns M + generated slots, not its whole row.
- ``ReqToTokenPool.free_rows``: forget a row's state when SGLang recycles it.
- ``PrefillAdder``: chunk-evicting requests' chunks end on the chunk-size grid (``engine.admission``).
- ``MHATokenToKVPool._create_buffers_normal``: with ``--kv-layout shared``, every layer's K and V as views of one
  allocation (``engine.pool``).
- ``SchedulerOutputStreamer.is_request_level_customized_info_key``: send the per-request numbers once, as
  ``meta_info["madakv"]`` (a one-item list, SGLang's shape for request-level custom info).

The lines they log (per compressed request, per skipped request, per batch that returned slots) are formatted by
``madakv_sglang.log_lines``, which also parses them back.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from madakv_sglang.config import ConfigError, PolicyConfig
from madakv_sglang.engine import admission, long_prompts, radix
from madakv_sglang.engine import state as scheduler_state
from madakv_sglang.engine.environment import server_config
from madakv_sglang.engine.metrics import record_compression, record_skip
from madakv_sglang.engine.pool import around_create_buffers_normal
from madakv_sglang.engine.state import RequestInfo
from madakv_sglang.log_lines import format_batch, format_compressed, format_cut, format_skipped
from madakv_sglang.packing import PackedRow, Replay, poison_enabled

logger = logging.getLogger(__name__)

REPLAY_ATTR = "_madakv_replay"  # the decision a retracted request re-applies, kept on the Req itself
META_KEY = "madakv"  # meta_info key of the per-request numbers
DENSE_REASON = "no room"  # meta_info skip reason of a prompt ``radix.place`` could not pack

_installed = False


def install_hooks() -> None:
    """Register the hooks with SGLang's HookRegistry (idempotent; ``load_plugins`` applies them)."""
    global _installed
    if _installed:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.run_batch", _around_run_batch, HookType.AROUND)
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.process_batch_result", _around_process_batch_result, HookType.AROUND
    )
    HookRegistry.register(
        "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.free", _around_allocator_free, HookType.AROUND
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.pool_stats_observer.kv_private_tokens",
        _around_kv_private_tokens,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free_rows", _around_free_rows, HookType.AROUND
    )
    HookRegistry.register(
        "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers_normal",
        around_create_buffers_normal,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer."
        "is_request_level_customized_info_key",
        _around_request_level_key,
        HookType.AROUND,
    )
    admission.install_hooks()
    long_prompts.install_hooks()
    radix.install_hooks()
    _installed = True


def request_policy(req: Any) -> PolicyConfig:
    """The request's settings: the server's, or its validated per-request override."""
    from madakv_sglang.engine.requests import request_config

    custom = getattr(getattr(req, "sampling_params", None), "custom_params", None)
    try:
        return request_config(custom, server_config())
    except ConfigError as err:  # validated at the HTTP entry already; never let one request stop the scheduler
        logger.error("madakv: request %s: %s; using the server's settings", req.rid, err)
        return server_config()


# ---- hooks ----


def _around_run_batch(original: Any, scheduler: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    shared = scheduler_state.current()
    if shared is None or not batch.forward_mode.is_extend():
        return original(scheduler, batch, *args, **kwargs)
    tree = scheduler.tree_cache
    shared.prefix_cache = tree is not None and tree.supports_prefix_sharing()
    infos = [
        RequestInfo(
            rid=req.rid,
            full_len=len(req.origin_input_ids) + len(req.output_ids),
            config=request_policy(req),
            replay=getattr(req, REPLAY_ATTR, None),
            remember=functools.partial(setattr, req, REPLAY_ATTR),
        )
        for req in batch.reqs
    ]
    with shared.running(infos):
        return original(scheduler, batch, *args, **kwargs)


def _around_process_batch_result(
    original: Any, scheduler: Any, batch: Any, result: Any, *args: Any, **kwargs: Any
) -> Any:
    if batch.forward_mode.is_extend():
        _free_evicted(scheduler, batch)
    return original(scheduler, batch, result, *args, **kwargs)


def _free_evicted(scheduler: Any, batch: Any) -> None:
    shared = scheduler_state.current()
    if shared is None:
        return
    allocator = scheduler.token_to_kv_pool_allocator
    freed_now = 0
    for req in batch.reqs:
        row = req.kv.req_pool_idx
        if row is None:
            continue
        state = shared.rows().get(row)
        if state is None:
            continue
        if state.skipped is not None:
            _report_skipped(req, state.skipped, len(req.origin_input_ids), request_policy(req), _cached_whole(req))
            state.skipped = None
        if state.pending_pack is not None:
            prompt_len = state.pending_pack.prompt_len
            room = _room(scheduler)
            placement = radix.place(scheduler, req, state, state.pending_pack)
            # The pool's gain, not the row's shrink (n - M): a matched prefix other requests share stays locked,
            # and its slots count once, when the last of them unlocks.
            freed_now += _room(scheduler) - room
            if placement == "whole":
                continue
            if placement == "dense":
                _report_dense(req, prompt_len, request_policy(req), _cached_whole(req))
                continue
            assert state.packed is not None
            state.packed.evicted = state.returned
            _report(req, state.packed, request_policy(req).policy, cached=placement == "cached")
            continue
        if state.cut_pending is not None:
            dropped = _give_back(allocator, state, state.cut_pending)
            state.cut_pending = None
            freed_now += dropped
            seen = int(req.kv.kv_allocated_len)
            logger.info(format_cut(req.rid, seen, seen - state.returned, dropped))
        packed = state.packed
        if packed is None or packed.pending_free is None:
            continue
        freed_now += _give_back(allocator, state, packed.pending_free)
        packed.pending_free = None
        packed.evicted = state.returned
        _report(req, packed, request_policy(req).policy)
    if freed_now:
        # SGLang stops trying to admit prefills once an admission failed, until a running request leaves
        # (``batch_is_full``); returned slots are new room just like a finished request's.
        scheduler.running_batch.batch_is_full = False
        shared.reclaimed_total += freed_now
        rows, held = shared.footprint()
        logger.info(format_batch(freed_now, shared.reclaimed_total, _room(scheduler), allocator.size, rows, held))


def _room(scheduler: Any) -> int:
    """What SGLang can hand out: the free slots and the tree's evictable prefixes (where a cached prompt's slots
    go instead of back to the allocator)."""
    return int(scheduler.token_to_kv_pool_allocator.available_size() + scheduler.tree_cache.evictable_size())


def _give_back(allocator: Any, state: scheduler_state.RowState, slots: torch.Tensor) -> int:
    allocator.free(slots)
    state.returned += int(slots.numel())
    return int(slots.numel())


def _set_meta(req: Any, summary: dict[str, Any]) -> None:
    if req.customized_info is None:
        req.customized_info = {}
    req.customized_info[META_KEY] = [summary]


def _report(req: Any, packed: PackedRow, policy: str, cached: bool = False) -> None:
    layout = server_config().layout
    _set_meta(
        req,
        {
            "prompt_slots": packed.prompt_len,
            "kept_slots": packed.slots,
            "reclaimed_slots": packed.evicted,
            "packing_waste_cells": packed.waste_cells,
            "compress_ms": round(packed.compress_seconds * 1e3, 3),
            "layout": layout,
            "skipped": None,
            "prompt_cached": cached,
        },
    )
    logger.info(format_compressed(req.rid, packed.prompt_len, packed.slots, packed.waste_cells, layout))
    record_compression(
        packed.prompt_len, packed.slots, packed.waste_cells, packed.compress_seconds, policy=policy, layout=layout
    )


def _cached_whole(req: Any) -> bool:
    """Whether SGLang caches a prompt served whole (it inserts it after this batch, unless barred)."""
    shared = scheduler_state.current()
    return shared is not None and shared.prefix_cache and not req.skip_radix_cache_insert


def _report_skipped(req: Any, reason: str, prompt_len: int, config: PolicyConfig, cached: bool) -> None:
    """A prompt served uncompressed by the skip rule: said in ``meta_info``, the log and the metrics."""
    why = (
        f"{prompt_len} < --kv-min-prompt {config.min_prompt}"
        if reason == "short prompt"
        else f"budget {config.budget} would reclaim less than --kv-min-reclaim {config.min_reclaim}"
    )
    _report_whole(req, reason, why, prompt_len, config, cached)


def _report_dense(req: Any, prompt_len: int, config: PolicyConfig, cached: bool) -> None:
    """A decided prompt the pool had no room to pack beside the tree's part of it (``radix.place``)."""
    why = "no free slots for its kept cells and fewer slots of its own than it keeps; served dense"
    _report_whole(req, DENSE_REASON, why, prompt_len, config, cached)


def _report_whole(req: Any, reason: str, why: str, prompt_len: int, config: PolicyConfig, cached: bool) -> None:
    _set_meta(
        req,
        {
            "prompt_slots": prompt_len,
            "kept_slots": prompt_len,
            "reclaimed_slots": 0,
            "packing_waste_cells": 0,
            "compress_ms": 0.0,
            "layout": config.layout,
            "skipped": reason,
            "prompt_cached": cached,
        },
    )
    logger.info(format_skipped(req.rid, prompt_len, reason, why))
    record_skip(reason, policy=config.policy, layout=config.layout)


def _around_request_level_key(original: Any, streamer: Any, key: str, *args: Any, **kwargs: Any) -> bool:
    return key == META_KEY or bool(original(streamer, key, *args, **kwargs))


def _around_allocator_free(original: Any, allocator: Any, free_index: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    if free_index.numel():
        free_index = free_index[free_index != 0]
        if poison_enabled() and free_index.numel():
            _poison_slots(allocator, free_index)
    return original(allocator, free_index, *args, **kwargs)


def _poison_slots(allocator: Any, slots: torch.Tensor) -> None:
    kvcache = allocator.get_kvcache()
    for layer in range(kvcache.layer_num):
        layer_id = kvcache.start_layer + layer if hasattr(kvcache, "start_layer") else layer
        kvcache.get_key_buffer(layer_id)[slots] = float("nan")
        kvcache.get_value_buffer(layer_id)[slots] = float("nan")


def _around_kv_private_tokens(original: Any, kv: Any, *args: Any, **kwargs: Any) -> int:
    owned = int(original(kv, *args, **kwargs))
    shared = scheduler_state.current()
    if shared is None or kv.req_pool_idx is None:
        return owned
    return owned - shared.returned(kv.req_pool_idx)


def _around_free_rows(original: Any, pool: Any, indices: Any, *args: Any, **kwargs: Any) -> Any:
    shared = scheduler_state.current()
    if shared is not None:
        for row in indices:
            shared.drop(int(row))
    return original(pool, indices, *args, **kwargs)


__all__ = ["META_KEY", "REPLAY_ATTR", "Replay", "install_hooks", "request_policy"]
