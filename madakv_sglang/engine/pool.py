"""The ``shared`` layout's pool: every layer's K and V buffers as views of one allocation (docs/design.md §4).

SGLang's ``MHATokenToKVPool._create_buffers_normal`` gives each layer its own ``[2, rows, H_r, D]`` tensor (K and
V halves). With ``--kv-layout shared`` an AROUND hook (installed by ``reclaim``) allocates ``[2, L, rows, H_r, D]``
instead, in the same memory-saver region and memory pool, and hands SGLang the same per-layer ``[rows, H_r, D]``
views it would have had. Every SGLang kernel keeps writing and reading its layer through them; our packer and
decode also address the whole K (or V) half as one ``[L * rows * H_r, D]`` array of cells
(``madakv_sglang.layout``). The bytes are the same, so SGLang's memory sizing is unchanged.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch

from madakv_sglang.layout import MAX_CELLS, shared_cell_count

logger = logging.getLogger(__name__)


def check_cell_ids_fit(num_layers: int, rows: int, heads: int) -> None:
    """Refuse a shared pool whose cell ids would not fit in int32 (FlashInfer's and the Triton tables' type)."""
    cells = shared_cell_count(num_layers, rows, heads)
    if cells > MAX_CELLS:
        most = MAX_CELLS // (num_layers * heads) - 1  # rows = slots + the padding slot
        raise ValueError(
            f"madakv: --kv-layout shared numbers every (layer, slot, head) cell of the KV pool with an int32 id, so "
            f"layers x slots x KV heads must be at most 2^31 = {MAX_CELLS}; this pool has {num_layers} x {rows} x "
            f"{heads} = {cells}. Give --max-total-tokens {most} or less (or a smaller --mem-fraction-static), or "
            f"serve with --kv-layout per-layer"
        )


def create_shared_buffers(pool: Any) -> None:
    """Fill ``pool.k_buffer`` / ``pool.v_buffer`` with views of one allocation (SGLang's MHA pool, NHD layout)."""
    from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE

    if getattr(pool, "use_hnd", False) or getattr(pool, "kv_cache_layout", None) == "vectorized_5d":
        raise ValueError(
            "madakv: --kv-layout shared needs SGLang's token-major (NHD) KV layout; unset SGLANG_USE_HND_KVCACHE or "
            "serve with --kv-layout per-layer"
        )
    k_shape, v_shape = pool._kv_buffer_shapes()
    check_cell_ids_fit(pool.layer_num, k_shape[0], k_shape[1])
    custom = torch.cuda.use_mem_pool(pool.custom_mem_pool) if pool.enable_custom_mem_pool else nullcontext()
    with pool.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE), custom:
        if k_shape == v_shape:
            both = torch.zeros((2, pool.layer_num, *k_shape), dtype=pool.store_dtype, device=pool.device)
            keys, values = both[0], both[1]
        else:  # different K and V head sizes: one allocation each
            keys = torch.zeros((pool.layer_num, *k_shape), dtype=pool.store_dtype, device=pool.device)
            values = torch.zeros((pool.layer_num, *v_shape), dtype=pool.store_dtype, device=pool.device)
    pool.k_buffer = list(keys.unbind(0))
    pool.v_buffer = list(values.unbind(0))
    logger.info(
        "madakv: KV pool of %d layers x %d slots x %d KV heads allocated as one block of cells (layout shared)",
        pool.layer_num,
        k_shape[0],
        k_shape[1],
    )


def around_create_buffers_normal(original: Any, pool: Any, *args: Any, **kwargs: Any) -> Any:
    """The hook on ``MHATokenToKVPool._create_buffers_normal``: the server's layout decides."""
    from madakv_sglang.engine.environment import server_config

    if server_config().layout != "shared":
        return original(pool, *args, **kwargs)
    create_shared_buffers(pool)
    return None
