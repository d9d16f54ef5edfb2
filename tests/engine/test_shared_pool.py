"""The ``shared`` layout's pool (``madakv_sglang.engine.pool``) on SGLang's real ``MHATokenToKVPool``: every
layer's K and V are views of one allocation that SGLang's own writes land in, and a pool whose cell ids would not
fit in int32 is refused before anything is allocated."""

from __future__ import annotations

import pytest
import torch

from madakv_sglang.engine.pool import check_cell_ids_fit, create_shared_buffers
from madakv_sglang.layout import MAX_CELLS
from madakv_sglang.packing import PoolView

LAYERS, HEADS, DIM, SIZE = 3, 2, 4, 16


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return MHATokenToKVPool(
        size=SIZE,
        page_size=1,
        dtype=torch.float32,
        head_num=HEADS,
        head_dim=DIM,
        layer_num=LAYERS,
        device="cpu",
        enable_memory_saver=False,
    )


def test_sglang_writes_land_in_the_one_allocation(pool) -> None:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    stock_bytes = sum(b.numel() * b.element_size() for b in pool.k_buffer + pool.v_buffer)
    create_shared_buffers(pool)
    pool._init_data_ptrs_and_strides()  # what SGLang's _create_buffers does after _create_buffers_normal
    assert sum(b.numel() * b.element_size() for b in pool.k_buffer + pool.v_buffer) == stock_bytes, "same bytes"
    view = PoolView.of(pool.k_buffer, pool.v_buffer, "shared")
    rows = SIZE + 1  # slot 0 is SGLang's padding slot
    assert view.k_cells is not None and view.v_cells is not None
    assert view.k_cells.shape == (LAYERS * rows * HEADS, DIM) and view.layer_cells == rows * HEADS
    assert view.k_cells.untyped_storage().data_ptr() == view.v_cells.untyped_storage().data_ptr()
    assert pool.k_data_ptrs.tolist() == [b.data_ptr() for b in pool.k_buffer]
    slots = torch.tensor([3, 7])
    for layer_id in range(LAYERS):
        layer = RadixAttention(2 * HEADS, DIM, 1.0, HEADS, layer_id=layer_id)
        keys = torch.full((2, HEADS, DIM), 10.0 * layer_id + 1)
        pool.set_kv_buffer(layer, KVWriteLoc(slots, None), keys, -keys)
    for layer_id in range(LAYERS):
        for slot in slots.tolist():
            for head in range(HEADS):
                cell = (layer_id * rows + slot) * HEADS + head  # the cell id of madakv_sglang.layout
                assert torch.equal(view.k_cells[cell], torch.full((DIM,), 10.0 * layer_id + 1))
                assert torch.equal(view.v_cells[cell], torch.full((DIM,), -10.0 * layer_id - 1))
    assert int((view.k_cells != 0).any(dim=-1).sum()) == LAYERS * 2 * HEADS, "nothing else was written"


def test_a_pool_too_large_for_int32_cell_ids_is_refused_before_allocating(pool) -> None:
    pool.size = MAX_CELLS // (LAYERS * HEADS)  # rows = size + 1: one row too many
    with pytest.raises(ValueError) as error:
        create_shared_buffers(pool)
    message = str(error.value)
    assert "2^31" in message and "--max-total-tokens" in message and "--kv-layout per-layer" in message
    most = MAX_CELLS // (LAYERS * HEADS) - 1
    assert f"--max-total-tokens {most} or less" in message
    check_cell_ids_fit(LAYERS, most + 1, HEADS)  # the largest pool it names fits
    assert pool.k_buffer[0].shape[0] == SIZE + 1, "the stock buffers were left alone"


def test_the_limit_is_exact() -> None:
    check_cell_ids_fit(1, MAX_CELLS, 1)  # ids 0 .. 2^31 - 1
    with pytest.raises(ValueError, match="must be at most 2"):
        check_cell_ids_fit(1, MAX_CELLS + 1, 1)
