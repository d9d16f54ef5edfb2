"""SGLang's prefix cache with compressing policies (``--kv-radix``, docs/design.md §5).

MadaKV's kept set depends on the question, so a compressed prompt cannot be shared, but its dense prefix can. With
the radix tree on, a compressing request matches its prompt's prefix as stock SGLang does and prefills only the
tokens past it. After its prefill the tree takes the dense prompt as evictable cache, and the request keeps a
compressed copy in slots of its own:

1. At the match (``Req._compute_max_prefix_len``) SGLang's own inserts are held off for a request that will be
   compressed (``skip_radix_cache_insert``): it would insert every prefill chunk, and the packed row at the end.
2. The backend decides as usual but leaves the pack to the scheduler (``RowState.pending_pack``): the row's first
   ``cache_protected_len`` slots are the tree's, possibly shared, and must not be overwritten.
3. Before SGLang processes the batch result, :func:`place` allocates M fresh slots (evicting unlocked tree entries
   first, as SGLang's own allocations do), inserts the dense prompt into the tree (SGLang's ``checkpoint``), copies
   the kept cells into the fresh slots and points the row at them. The request then drops its tree lock, so the
   prompt is LRU cache the tree gives up under pressure; at finish, retraction and abort SGLang frees ``[0, owned)``
   of the row and inserts nothing.
4. No fresh slots: the kept cells are packed in place into the request's own slots (those past the matched
   prefix), and the prompt is not cached. When those are fewer than M the prompt is served dense and cached as
   stock SGLang caches it.

The matched prefix stops W tokens before the prompt's end (:func:`prefix_limit`), so the request computes its own
observation window's queries. A retracted request's match stops at its stored prompt: the positions generated
before the retraction are re-prefilled through its kept set, and never inserted. A request that cuts between
prefill chunks neither matches nor inserts.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch

from madakv_sglang.config import PolicyConfig
from madakv_sglang.engine.environment import is_compressing
from madakv_sglang.engine.state import PendingPack, RowState
from madakv_sglang.packing import skip_code

# cached: compressed, and the dense prompt is the tree's; uncached: compressed, the prompt not inserted; dense: kept
# whole for want of room; whole: the decision kept every position
Placement = Literal["cached", "uncached", "dense", "whole"]
# Set on a request whose dense prompt ``place`` inserts into the tree (SGLang's own inserts are held off for it).
DEFERRED_ATTR = "_madakv_deferred_insert"
# Debug: every packed copy finds the pool full, so the fallbacks run (tests; like the NaN-poison mode).
NO_FRESH_SLOTS_ENV = "MADAKV_DEBUG_NO_FRESH_SLOTS"


def install_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len", _around_max_prefix_len, HookType.AROUND
    )


def uses_prefix_cache(config: PolicyConfig) -> bool:
    """Whether a request of ``config`` matches and inserts through the tree: a chunk-evicting one frees prompt
    slots between chunks, which the tree could not share."""
    return config.prefill_evict != "chunk"


def prefix_limit(input_len: int, config: PolicyConfig, replay_len: int | None) -> int | None:
    """The longest prefix a compressing request of ``input_len`` tokens may take from the tree (``None``: SGLang's
    own limit): none for a chunk-evicting one, its stored prompt for a retracted one, and for a prompt it will
    compress all but the last W tokens, whose queries score the prompt."""
    if not uses_prefix_cache(config):
        return 0
    if replay_len is not None:
        return replay_len
    if skip_code(input_len, config):
        return None  # served dense: any prefix does
    return max(input_len - config.window, 0)


def place(scheduler: Any, req: Any, state: RowState, pending: PendingPack) -> Placement:
    """Put a compressed prompt's kept cells where the tree cannot reach them and give the tree its dense prompt
    (module docstring); returns where the cells went. Every TP rank runs the same steps on the same pool state."""
    tree = scheduler.tree_cache
    allocator = scheduler.token_to_kv_pool_allocator
    rows_map = scheduler.req_to_token_pool.req_to_token
    row, n, slots = req.kv.req_pool_idx, pending.prompt_len, pending.slots
    state.pending_pack = None
    insert = bool(getattr(req, DEFERRED_ATTR, False))
    setattr(req, DEFERRED_ATTR, False)
    if pending.pack is None:
        _serve_dense(tree, req, n, insert)
        return "whole"
    fresh = _allocate(tree, allocator, slots)
    cached = fresh is not None and insert
    if cached:
        tree.checkpoint(req, up_to=n)  # may swap the row's slots for identical copies the tree already held
    own = rows_map[row, req.kv.cache_protected_len : n].clone()  # the prompt slots the tree does not hold
    if fresh is None:
        if own.numel() < slots:
            _serve_dense(tree, req, n, insert)
            return "dense"
        fresh, own = own[:slots], own[slots:]
    state.packed = pending.pack(fresh.to(rows_map.dtype))
    allocator.free(own)  # the request's own prompt slots that the packed cells do not use
    tree.unlock(req.lock)
    req.lock = None
    req.kv.cache_protected_len = 0
    state.returned = n - slots
    return "cached" if cached else "uncached"


def _serve_dense(tree: Any, req: Any, prompt_len: int, insert: bool) -> None:
    """The prompt stays whole: it is cached as stock SGLang caches it (now, and with its output at the end)."""
    if insert:
        req.skip_radix_cache_insert = False
        tree.checkpoint(req, up_to=prompt_len)


def _allocate(tree: Any, allocator: Any, slots: int) -> torch.Tensor | None:
    if os.environ.get(NO_FRESH_SLOTS_ENV, "0") not in ("", "0"):
        return None
    from sglang.srt.mem_cache.common import evict_from_tree_cache

    evict_from_tree_cache(tree, slots)
    return allocator.alloc(slots)


def _around_max_prefix_len(original: Any, req: Any, input_len: int, *args: Any, **kwargs: Any) -> int:
    from madakv_sglang.engine.reclaim import REPLAY_ATTR, request_policy

    limit = int(original(req, input_len, *args, **kwargs))
    config = request_policy(req)
    if not is_compressing(config):
        return limit
    replay = getattr(req, REPLAY_ATTR, None)
    replay_len = None if replay is None else int(replay.keep.shape[-1])
    cap = prefix_limit(input_len, config, replay_len)
    if cap is None:
        return limit  # served dense: SGLang's own matches and inserts
    if not req.skip_radix_cache_insert:
        # SGLang would insert every prefill chunk, handing the tree slots this request packs or frees; the dense
        # prompt goes in once, when it is placed (never for a replay or a request that cuts between chunks).
        req.skip_radix_cache_insert = True
        setattr(req, DEFERRED_ATTR, replay_len is None and uses_prefix_cache(config))
    return min(limit, cap)


__all__ = ["Placement", "install_hooks", "place", "prefix_limit", "uses_prefix_cache"]
