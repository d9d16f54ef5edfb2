"""The batch decide-and-pack step (``madakv_sglang.packing``) against the dense references: packed
cells hold exactly the kept K/V, the slot count is the plan's, and head-wise decode over the packed cells
equals attention over the dense kept set."""

from __future__ import annotations

import pytest
import torch

from madakv_sglang.config import PolicyConfig
from madakv_sglang.kernels.torch_decode import headwise_decode
from madakv_sglang.packing import Finishing, Geometry, PoolView, Replay, decide, pack_batch
from madakv_sglang.policies import get_policy
from madakv_sglang.policies.base import PolicyInputs
from tests.oracles import compress_layer

LAYERS, HEADS, DIM = 3, 2, 8


def _pool(slots: int, seed: int, layout: str = "per-layer") -> PoolView:
    """Random K/V; ``shared`` as SGLang's pool is under that layout (``engine.pool``): one ``[2, L, ...]`` block."""
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(2, LAYERS, slots, HEADS, DIM, generator=gen, dtype=torch.float64)
    if layout == "shared":
        return PoolView.of(list(block[0].unbind(0)), list(block[1].unbind(0)), layout)
    return PoolView.of([k.clone() for k in block[0]], [v.clone() for v in block[1]], layout)


def _request(row: int, n: int, seed: int, policy: str = "madakv", budget: str = "0.25") -> Finishing:
    gen = torch.Generator().manual_seed(seed)
    visual = torch.zeros(n, dtype=torch.bool)
    visual[n // 4 : n // 2] = True
    config = PolicyConfig.from_strings({"policy": policy, "budget": budget, "window": "4", "min_prompt": "0"})
    scores = torch.rand(LAYERS, HEADS, n, generator=gen) ** 4
    return Finishing(row=row, prompt_len=n, visual=visual, config=config, scores=scores)


GEOMETRY = Geometry(num_layers=LAYERS, total_heads=HEADS, local_heads=HEADS, head_offset=0, tp_size=1)


@pytest.mark.parametrize("policy", ["madakv", "snapkv", "pyramidkv", "adakv", "streamingllm", "lookm", "random"])
def test_batched_decisions_equal_single_request_policy(policy: str) -> None:
    requests = [_request(1, 40, 1, policy), _request(2, 23, 2, policy), _request(3, 61, 3, policy, budget="9")]
    decisions = decide(requests, GEOMETRY)
    for request, decision in zip(requests, decisions, strict=True):
        alone = get_policy(policy).select(
            PolicyInputs.for_request(request.scores, request.visual, request.config), request.config
        )
        assert torch.equal(decision.keep, alone.keep[0, :, :, : request.prompt_len])
        assert torch.equal(decision.all_head_counts, alone.all_head_counts[0])


@pytest.mark.parametrize("layout", ["shared", "per-layer"])
def test_pack_moves_exactly_the_kept_cells_and_decode_matches_dense(layout: str) -> None:
    n, total_slots = 50, 200
    pool = _pool(total_slots, seed=7, layout=layout)
    dense_k = [k.clone() for k in pool.k_layers]
    dense_v = [v.clone() for v in pool.v_layers]
    rows_map = torch.zeros(8, 64, dtype=torch.int32)
    order = torch.randperm(total_slots - 1, generator=torch.Generator().manual_seed(3)) + 1
    rows_map[5, :n], rows_map[2, :30] = order[:n], order[n : n + 30]
    requests = [_request(5, n, 11), _request(2, 30, 12, policy="pyramidkv")]
    decisions = decide(requests, GEOMETRY)
    before = rows_map.clone()
    packed_rows = pack_batch(requests, decisions, rows_map, pool, tp_size=1)
    query = torch.randn(1, 2 * HEADS, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for request, decision, packed in zip(requests, decisions, packed_rows, strict=True):
        row_slots = before[request.row, : request.prompt_len].long()
        assert packed is not None
        # The row keeps its first M slots and points the rest at the padding slot; the rest is to be freed.
        assert torch.equal(rows_map[request.row, : packed.slots], before[request.row, : packed.slots])
        assert not rows_map[request.row, packed.slots : request.prompt_len].any()
        # M is the fewest slots whose cells hold the kept cells: of all layers (shared) or of the fullest layer.
        kept = decision.keep.sum(-1)  # [L, H]
        need, per_slot = (int(kept.sum()), LAYERS * HEADS) if layout == "shared" else (int(kept.sum(-1).max()), HEADS)
        assert (packed.slots - 1) * per_slot < need <= packed.slots * per_slot
        assert torch.equal(packed.pending_free, before[request.row, packed.slots : request.prompt_len])
        for layer in range(LAYERS):
            if layout == "shared":
                flat_k, flat_v = pool.k_cells, pool.v_cells
                slot_of = packed.cells[layer] // HEADS % total_slots
            else:
                flat_k, flat_v = pool.k_layers[layer].view(-1, DIM), pool.v_layers[layer].view(-1, DIM)
                slot_of = packed.cells[layer] // HEADS
            expect = compress_layer(dense_k[layer][row_slots], dense_v[layer][row_slots], decision.keep[layer])
            for head in range(HEADS):
                lo, hi = packed.indptr[layer, head], packed.indptr[layer, head + 1]
                cells = packed.cells[layer][lo:hi]
                assert torch.equal(
                    flat_k[cells], expect.keys[expect.indptr[head] : expect.indptr[head + 1]]
                )  # moved: bit-exact
                assert torch.equal(flat_v[cells], expect.values[expect.indptr[head] : expect.indptr[head + 1]])
            assert bool(torch.isin(slot_of, row_slots[: packed.slots]).all()), "packed cells lie in the first M slots"
            out, _ = headwise_decode(query, flat_k, flat_v, packed.indptr[layer], packed.cells[layer], HEADS, DIM**-0.5)
            masked = []
            for head in range(HEADS):
                kept = decision.keep[layer, head]
                k = dense_k[layer][row_slots][kept, head]
                v = dense_v[layer][row_slots][kept, head]
                q = query[0, head * 2 : head * 2 + 2]
                masked.append(torch.softmax(q @ k.T * DIM**-0.5, dim=-1) @ v)
            torch.testing.assert_close(out[0], torch.cat(masked), rtol=0, atol=1e-12)  # fp64: summation order only


def test_shared_and_per_layer_hold_the_cells_the_layout_formula_says() -> None:
    """pyramidkv's uneven layers: per-layer holds its fullest layer's slots, shared the mean over layers."""
    request = _request(1, 60, 4, policy="pyramidkv")
    (decision,) = decide([request], GEOMETRY)
    counts = decision.all_head_counts
    rows_map = torch.arange(64, dtype=torch.int32)[None].repeat(2, 1) + 1
    held = {}
    for layout in ("shared", "per-layer"):
        # Each layout packs the same row afresh (packing points the row's evicted positions at the padding slot).
        (packed,) = pack_batch([request], [decision], rows_map.clone(), _pool(100, 1, layout), tp_size=1)
        assert packed is not None
        held[layout] = packed.slots
        assert packed.waste_cells == packed.slots * LAYERS * HEADS - int(counts.sum())
    assert held["shared"] == -(-int(counts.sum()) // (LAYERS * HEADS))
    assert held["per-layer"] == -(-int(counts.sum(-1).max()) // HEADS) > held["shared"]


def test_a_pool_of_separate_layers_cannot_run_shared() -> None:
    separate = [torch.zeros(10, HEADS, DIM) for _ in range(LAYERS)]
    with pytest.raises(ValueError, match="views of one allocation"):
        PoolView.of(separate, [torch.zeros(10, HEADS, DIM) for _ in range(LAYERS)], "shared")


def test_pack_returns_none_when_everything_is_kept() -> None:
    request = _request(1, 20, 5, budget="1.0")
    (decision,) = decide([request], GEOMETRY)
    assert bool(decision.keep.all())
    rows_map = torch.arange(1, 22, dtype=torch.int32)[None].repeat(2, 1)
    for layout in ("shared", "per-layer"):
        assert pack_batch([request], [decision], rows_map, _pool(40, 1, layout), tp_size=1) == [None]


def test_replay_keeps_the_stored_prompt_decision_and_every_later_position() -> None:
    stored = torch.rand(LAYERS, HEADS, 30, generator=torch.Generator().manual_seed(9)) > 0.6
    counts = stored.sum(dim=-1)
    request = Finishing(
        row=1,
        prompt_len=36,
        visual=torch.zeros(36, dtype=torch.bool),
        config=PolicyConfig(),
        replay=Replay(stored, counts),
    )
    (decision,) = decide([request], GEOMETRY)
    assert torch.equal(decision.keep[:, :, :30], stored)
    assert bool(decision.keep[:, :, 30:].all())
    assert torch.equal(decision.all_head_counts, counts + 6)


def test_models_with_logit_caps_or_sliding_windows_are_refused_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The packed decode implements neither; the backend factory names what the model has instead of failing at
    the first decode step."""
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    from sglang.srt.layers.radix_attention import RadixAttention

    from madakv_sglang.engine.backend import unsupported_attention_layers

    plain = RadixAttention(4, 16, 0.25, 2, layer_id=0)
    capped = RadixAttention(4, 16, 0.25, 2, layer_id=1, logit_cap=30.0)
    windowed = RadixAttention(4, 16, 0.25, 2, layer_id=2, sliding_window_size=128)
    assert unsupported_attention_layers(torch.nn.ModuleList([plain])) == []
    assert unsupported_attention_layers(torch.nn.ModuleList([plain, capped, windowed])) == [
        "attention logit soft-capping (30.0)",
        "sliding-window layers (window 128)",
    ]


@pytest.mark.parametrize("layout", ["shared", "per-layer"])
def test_a_cut_prompt_is_decided_over_its_survivors_and_packed_into_the_slots_it_still_owns(layout: str) -> None:
    """Chunk eviction left 30 of 50 positions: the policy decides over those 30 with the whole prompt's budget
    (as if they were the prompt), and packing moves their kept cells into the first M slots the row still owns."""
    n, total_slots = 50, 200
    gen = torch.Generator().manual_seed(21)
    positions = torch.sort(torch.randperm(n - 4, generator=gen)[:26]).values
    positions = torch.cat([positions, torch.arange(n - 4, n)])  # the kept window always survives
    full = _request(3, n, 22)
    request = Finishing(
        row=3,
        prompt_len=n,
        visual=full.visual[positions],
        config=full.config.replace(min_prompt=256),  # the skip rule was the whole prompt's, before the first cut
        scores=full.scores[:, :, positions],
        positions=positions,
    )
    pool = _pool(total_slots, seed=23, layout=layout)
    dense_k = [k.clone() for k in pool.k_layers]
    rows_map = torch.zeros(8, 64, dtype=torch.int32)
    rows_map[3, :n] = torch.randperm(total_slots - 1, generator=gen)[:n].int() + 1
    dense_row = rows_map[3, :n].clone()
    cut = torch.ones(n, dtype=torch.bool)
    cut[positions] = False
    rows_map[3, :n][cut] = 0  # what the cuts did to the row
    owned = rows_map[3, :n][rows_map[3, :n] != 0].clone()

    (decision,) = decide([request], GEOMETRY)
    compact = PolicyInputs(
        visual=request.visual[None],
        prompt_len=torch.tensor([len(positions)]),
        nominal_budget=torch.tensor([full.config.budget.tokens_for(n)]),
        num_layers=LAYERS,
        total_heads=HEADS,
        scores=request.scores[None],
    )
    alone = get_policy("madakv").select(compact, full.config)
    assert torch.equal(decision.keep[..., positions], alone.keep[0])
    assert not decision.keep[..., cut].any()

    (packed,) = pack_batch([request], [decision], rows_map, pool, tp_size=1)
    assert packed is not None
    assert torch.equal(rows_map[3, : packed.slots], owned[: packed.slots])
    assert not rows_map[3, packed.slots : n].any()
    assert torch.equal(packed.pending_free, owned[packed.slots :])
    for layer in range(LAYERS):
        flat_k = pool.k_cells if layout == "shared" else pool.k_layers[layer].view(-1, DIM)
        assert flat_k is not None
        for head in range(HEADS):
            kept = torch.nonzero(decision.keep[layer, head]).flatten()
            cells = packed.cells[layer][packed.indptr[layer, head] : packed.indptr[layer, head + 1]]
            assert torch.equal(flat_k[cells], dense_k[layer][dense_row[kept].long(), head])  # moved: bit-exact
