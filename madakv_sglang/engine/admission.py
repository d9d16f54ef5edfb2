"""Scheduler hooks on SGLang's ``PrefillAdder`` for ``--kv-prefill-evict chunk`` (docs/design.md §5).

A cut is made at the end of a prefill chunk, and what it drops depends on where that end is. SGLang ends a chunk
wherever the batch's token budget runs out (a request admitted behind others gets what they left, a continuing
one what memory allows), so the same prompt would be cut at different places, and answered differently, depending
on what it was batched with and on memory pressure. These hooks end every chunk of a chunk-evicting request at a
multiple of ``--chunked-prefill-size`` S (or at the prompt's end):

- a new request whose first chunk would be shorter than S waits for a later batch (SGLang's own ``OTHER``);
- a continuing request whose chunk would be shorter than S runs a full S anyway, as SGLang itself does when its
  memory budget leaves nothing ("making no progress is worse").

They also make SGLang admit a compressing request by what it will hold at its peak instead of by its whole
prompt plus its reserved output (:func:`peak_slots`): while its gates run, SGLang's prefill budget is shown the
difference as free room, and the reservations it commits are SGLang's own. Not corrected: on the ``ignore_eos``
path SGLang's admission simulation counts a running request as freeing its whole prompt and output when it
finishes, which for a compressed one over-counts by the slots it already gave back (the simulation is a closure
inside SGLang's method; taking the over-count off every step at once stopped admission altogether). SGLang
retracts a request when decode runs out of room.

Requests of other policies, and servers without chunked prefill, are not touched by the chunk grid.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from madakv_sglang.chunk_eviction import survivor_target
from madakv_sglang.config import PolicyConfig
from madakv_sglang.engine.environment import is_compressing
from madakv_sglang.packing import skip_code

STRIDE_ATTR = "_madakv_stride"  # S, the chunk size the adder was built with (None: no chunked prefill)
ALIGN_ATTR = "_madakv_align"  # set while the adder admits a chunk-evicting request
CREDIT_ATTR = "_madakv_credited"  # set while an admission runs with the credit applied (never twice)


def install_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    adder = "sglang.srt.managers.schedule_policy.PrefillAdder"
    HookRegistry.register(f"{adder}.__init__", _around_init, HookType.AROUND)
    HookRegistry.register(f"{adder}.add_one_req", _around_add_one_req, HookType.AROUND)
    HookRegistry.register(f"{adder}.add_one_req_ignore_eos", _around_add_one_req_ignore_eos, HookType.AROUND)
    HookRegistry.register(f"{adder}.add_chunked_req", _around_add_chunked_req, HookType.AROUND)
    HookRegistry.register(f"{adder}.floor_chunked_tokens", _around_floor_chunked_tokens, HookType.AROUND)


def kept_slots(prompt_len: int, config: PolicyConfig) -> int:
    """The slots a compressed prompt of ``prompt_len`` tokens holds after prefill: B under ``shared``, the capped
    fullest layer under ``per-layer``, the whole prompt when the skip rule keeps it."""
    if skip_code(prompt_len, config):
        return prompt_len
    budget = config.effective_budget(prompt_len)
    if config.layout == "per-layer":
        cap = config.cap_fraction
        return prompt_len if cap is None else min(prompt_len, math.ceil(cap * budget))
    return budget


def prefill_peak_slots(prompt_len: int, config: PolicyConfig, stride: int | None) -> int:
    """The most slots a prompt holds while it is prefilled: all of it, or with chunk eviction and chunks of
    ``stride`` its cut size plus one chunk."""
    if skip_code(prompt_len, config) or config.prefill_evict != "chunk" or stride is None:
        return prompt_len
    budget = config.effective_budget(prompt_len)
    protected = min(prompt_len, config.sink + config.window)
    cut = survivor_target(budget, config.prefill_keep_fraction, protected, prompt_len)
    return min(prompt_len, cut + stride)


def peak_slots(prompt_len: int, max_new: int, config: PolicyConfig, stride: int | None, prefix_len: int = 0) -> int:
    """The most slots a request of ``prompt_len`` tokens and ``max_new`` output tokens holds under ``config``:
    its prefill peak (:func:`prefill_peak_slots`) or its kept slots plus its output, whichever is larger. The
    first ``prefix_len`` tokens, matched in the prefix tree, are the tree's: it allocates none for them, and still
    keeps the whole prompt's kept slots (``engine.radix``)."""
    prefill = prefill_peak_slots(prompt_len, config, stride) - prefix_len
    return max(prefill, kept_slots(prompt_len, config) + max_new)


def replay_peak_slots(prompt_len: int, fill_len: int, max_new: int, config: PolicyConfig, stride: int | None) -> int:
    """:func:`peak_slots` of a chunk-evicting request re-prefilled after a retraction: ``fill_len`` tokens (its
    ``prompt_len``-token prompt and the output it had) of which the prompt is cut again as the stored cuts say and
    the output is kept whole."""
    output = fill_len - prompt_len
    return max(prefill_peak_slots(prompt_len, config, stride), kept_slots(prompt_len, config) + output + max_new)


def aligned_chunk(length: int, remaining: int, stride: int) -> int:
    """A chunk of ``length`` tokens out of ``remaining``: whole when it finishes the prompt, else rounded down to a
    multiple of ``stride``, and a full stride when that would be empty."""
    if length >= remaining:
        return length
    return length // stride * stride or min(stride, remaining)


def _evicts_chunks(req: Any) -> bool:
    from madakv_sglang.engine.reclaim import request_policy

    config = request_policy(req)
    return is_compressing(config) and config.prefill_evict == "chunk"


def _credit(adder: Any, req: Any) -> int:
    """The room SGLang's count of ``req`` over-charges: its prompt and output (clipped as SGLang clips it) minus
    :func:`peak_slots`."""
    from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

    from madakv_sglang.engine.reclaim import REPLAY_ATTR, request_policy

    config = request_policy(req)
    if not is_compressing(config):
        return 0
    stride = getattr(adder, STRIDE_ATTR, None)
    replay = getattr(req, REPLAY_ATTR, None)
    fill = len(req.full_untruncated_fill_ids)
    max_new = min(max(req.sampling_params.max_new_tokens - len(req.output_ids), 0), CLIP_MAX_NEW_TOKENS)
    if replay is None:
        peak = peak_slots(fill, max_new, config, stride, req.prefix_len)
    elif replay.cut_at is not None:  # chunk eviction takes nothing from the tree: prefix_len is 0
        peak = replay_peak_slots(replay.keep.shape[-1], fill, max_new, config, stride)
    else:
        return 0  # a replay of a prompt decided whole holds it all again: SGLang's count is right
    return max(0, fill - req.prefix_len + max_new - peak)


@contextmanager
def _credited(adder: Any, req: Any) -> Iterator[None]:
    """Show SGLang's prefill budget ``_credit`` more free room for the length of one admission; what the admission
    reserves stays reserved."""
    budget = getattr(adder, "memory_budget", None)
    if budget is None or not hasattr(budget, "total_offset") or getattr(adder, CREDIT_ATTR, False):
        yield  # nested (add_one_req -> add_one_req_ignore_eos) or a budget of another shape: SGLang's count
        return
    credit = _credit(adder, req)
    setattr(adder, CREDIT_ATTR, True)
    budget.total_offset -= credit
    budget.current_offset -= credit
    try:
        yield
    finally:
        budget.total_offset += credit
        budget.current_offset += credit
        setattr(adder, CREDIT_ATTR, False)


@contextmanager
def _aligning(adder: Any, req: Any) -> Iterator[None]:
    stride = getattr(adder, STRIDE_ATTR, None)
    active = stride is not None and _evicts_chunks(req)
    if active:
        setattr(adder, ALIGN_ATTR, stride)
    try:
        yield
    finally:
        if active:
            setattr(adder, ALIGN_ATTR, None)


def _around_init(original: Any, adder: Any, *args: Any, **kwargs: Any) -> None:
    original(adder, *args, **kwargs)
    stride = adder.rem_chunk_tokens
    setattr(adder, STRIDE_ATTR, stride if stride is not None and stride > 0 else None)
    setattr(adder, ALIGN_ATTR, None)


def _around_add_one_req(
    original: Any, adder: Any, req: Any, has_chunked_req: bool, truncation_align_size: int | None, **kwargs: Any
) -> Any:
    stride = getattr(adder, STRIDE_ATTR, None)
    if stride is not None and _evicts_chunks(req):
        truncation_align_size = math.lcm(truncation_align_size or 1, stride)
    # A request SGLang sends on to add_one_req_ignore_eos is credited there.
    simulating = req.sampling_params.ignore_eos and getattr(adder.tree_cache, "disable", True)
    with _aligning(adder, req), contextlib.nullcontext() if simulating else _credited(adder, req):
        return original(adder, req, has_chunked_req, truncation_align_size, **kwargs)


def _around_add_one_req_ignore_eos(original: Any, adder: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    stride = getattr(adder, STRIDE_ATTR, None)
    if stride is not None and _evicts_chunks(req):
        remaining = len(req.full_untruncated_fill_ids) - req.prefix_len
        if remaining > adder.rem_chunk_tokens and adder.rem_chunk_tokens < stride:
            from sglang.srt.managers.schedule_policy import AddReqResult

            return AddReqResult.OTHER  # its first chunk would end off the grid: wait for a later batch
    with _aligning(adder, req), _credited(adder, req):
        return original(adder, req, *args, **kwargs)


def _around_add_chunked_req(original: Any, adder: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    with _aligning(adder, req):
        return original(adder, req, *args, **kwargs)


def _around_floor_chunked_tokens(original: Any, adder: Any, trunc_len: int, remaining: int) -> int:
    length = int(original(adder, trunc_len, remaining))
    align = getattr(adder, ALIGN_ATTR, None)
    return length if align is None else aligned_chunk(length, remaining, align)


__all__ = ["aligned_chunk", "install_hooks", "kept_slots", "peak_slots", "prefill_peak_slots", "replay_peak_slots"]
