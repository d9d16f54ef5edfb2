"""Scheduler hooks on SGLang's ``PrefillAdder`` for ``--kv-prefill-evict chunk`` (docs/design.md §5).

A cut is made at the end of a prefill chunk, and what it drops depends on where that end is. SGLang ends a chunk
wherever the batch's token budget runs out (a request admitted behind others gets what they left, a continuing
one what memory allows), so the same prompt would be cut at different places, and answered differently, depending
on what it was batched with and on memory pressure. These hooks end every chunk of a chunk-evicting request at a
multiple of ``--chunked-prefill-size`` S (or at the prompt's end):

- a new request whose first chunk would be shorter than S waits for a later batch (SGLang's own ``OTHER``);
- a continuing request whose chunk would be shorter than S runs a full S anyway, as SGLang itself does when its
  memory budget leaves nothing ("making no progress is worse").

Requests of other policies, and servers without chunked prefill, are not touched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STRIDE_ATTR = "_madakv_stride"  # S, the chunk size the adder was built with (None: no chunked prefill)
ALIGN_ATTR = "_madakv_align"  # set while the adder admits a chunk-evicting request


def install_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    adder = "sglang.srt.managers.schedule_policy.PrefillAdder"
    HookRegistry.register(f"{adder}.__init__", _around_init, HookType.AROUND)
    HookRegistry.register(f"{adder}.add_one_req", _around_add_one_req, HookType.AROUND)
    HookRegistry.register(f"{adder}.add_one_req_ignore_eos", _around_add_one_req_ignore_eos, HookType.AROUND)
    HookRegistry.register(f"{adder}.add_chunked_req", _around_add_chunked_req, HookType.AROUND)
    HookRegistry.register(f"{adder}.floor_chunked_tokens", _around_floor_chunked_tokens, HookType.AROUND)


def aligned_chunk(length: int, remaining: int, stride: int) -> int:
    """A chunk of ``length`` tokens out of ``remaining``: whole when it finishes the prompt, else rounded down to a
    multiple of ``stride``, and a full stride when that would be empty."""
    if length >= remaining:
        return length
    return length // stride * stride or min(stride, remaining)


def _evicts_chunks(req: Any) -> bool:
    from madakv_sglang.engine.environment import is_compressing
    from madakv_sglang.engine.reclaim import request_policy

    config = request_policy(req)
    return is_compressing(config) and config.prefill_evict == "chunk"


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
    with _aligning(adder, req):
        return original(adder, req, has_chunked_req, truncation_align_size, **kwargs)


def _around_add_one_req_ignore_eos(original: Any, adder: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    stride = getattr(adder, STRIDE_ATTR, None)
    if stride is not None and _evicts_chunks(req):
        remaining = len(req.full_untruncated_fill_ids) - req.prefix_len
        if remaining > adder.rem_chunk_tokens and adder.rem_chunk_tokens < stride:
            from sglang.srt.managers.schedule_policy import AddReqResult

            return AddReqResult.OTHER  # its first chunk would end off the grid: wait for a later batch
    with _aligning(adder, req):
        return original(adder, req, *args, **kwargs)


def _around_add_chunked_req(original: Any, adder: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    with _aligning(adder, req):
        return original(adder, req, *args, **kwargs)


def _around_floor_chunked_tokens(original: Any, adder: Any, trunc_len: int, remaining: int) -> int:
    length = int(original(adder, trunc_len, remaining))
    align = getattr(adder, ALIGN_ATTR, None)
    return length if align is None else aligned_chunk(length, remaining, align)


__all__ = ["aligned_chunk", "install_hooks"]
