"""The batch decide-and-pack step (``madakv_sglang.sglang.compress``) against the dense references: packed
cells hold exactly the kept K/V, the slot count is the plan's, and head-wise decode over the packed cells
equals attention over the dense kept set."""

from __future__ import annotations

import pytest
import torch

from madakv_sglang.config import PolicyConfig
from madakv_sglang.layout import slot_count
from madakv_sglang.policies.base import PolicyInputs
from madakv_sglang.policies import get_policy
from madakv_sglang.reference import compress_layer, headwise_decode
from madakv_sglang.sglang.compress import Finishing, Geometry, decide, pack
from madakv_sglang.sglang.ledger import Replay

LAYERS, HEADS, DIM = 3, 2, 8


def _pool(slots: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(slots, HEADS, DIM, generator=gen, dtype=torch.float64) for _ in range(LAYERS)]
    values = [torch.randn(slots, HEADS, DIM, generator=gen, dtype=torch.float64) for _ in range(LAYERS)]
    return keys, values


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


def test_pack_moves_exactly_the_kept_cells_and_decode_matches_dense() -> None:
    n, total_slots = 50, 200
    keys, values = _pool(total_slots, seed=7)
    dense_k = [k.clone() for k in keys]
    dense_v = [v.clone() for v in values]
    row_slots = torch.randperm(total_slots - 1, generator=torch.Generator().manual_seed(3))[:n] + 1
    request = _request(5, n, 11)
    (decision,) = decide([request], GEOMETRY)
    packed = pack(request, decision, row_slots, keys, values, tp_size=1)
    assert packed is not None
    assert packed.slots == int(slot_count(decision.all_head_counts[None])[0])
    assert torch.equal(packed.pending_free, row_slots[packed.slots : n])
    query = torch.randn(1, 2 * HEADS, DIM, dtype=torch.float64)
    for layer in range(LAYERS):
        expect = compress_layer(dense_k[layer][row_slots], dense_v[layer][row_slots], decision.keep[layer])
        flat_k = keys[layer].view(-1, DIM)
        flat_v = values[layer].view(-1, DIM)
        for head in range(HEADS):
            lo, hi = packed.indptr[layer, head], packed.indptr[layer, head + 1]
            got = flat_k[packed.cells[layer][lo:hi]]
            want = expect.keys[expect.indptr[head] : expect.indptr[head + 1]]
            assert torch.equal(got, want)  # moved, not recomputed: bit-exact
            assert torch.equal(flat_v[packed.cells[layer][lo:hi]], expect.values[expect.indptr[head] : expect.indptr[head + 1]])
        # every packed cell lies in the request's first M slots
        assert bool(torch.isin(packed.cells[layer] // HEADS, row_slots[: packed.slots]).all())
        out, _ = headwise_decode(query, flat_k, flat_v, packed.indptr[layer], packed.cells[layer], HEADS, DIM**-0.5)
        masked = []
        for head in range(HEADS):
            kept = decision.keep[layer, head]
            k = dense_k[layer][row_slots][kept, head]
            v = dense_v[layer][row_slots][kept, head]
            q = query[0, head * 2 : head * 2 + 2]
            masked.append(torch.softmax(q @ k.T * DIM**-0.5, dim=-1) @ v)
        torch.testing.assert_close(out[0], torch.cat(masked), rtol=0, atol=1e-12)  # fp64: summation order only


def test_pack_returns_none_when_everything_is_kept() -> None:
    keys, values = _pool(40, seed=1)
    request = _request(1, 20, 5, budget="1.0")
    (decision,) = decide([request], GEOMETRY)
    assert bool(decision.keep.all())
    assert pack(request, decision, torch.arange(1, 21), keys, values, tp_size=1) is None


def test_replay_keeps_the_stored_prompt_decision_and_every_later_position() -> None:
    stored = torch.rand(LAYERS, HEADS, 30) > 0.6
    counts = stored.sum(dim=-1)
    request = Finishing(row=1, prompt_len=36, visual=torch.zeros(36, dtype=torch.bool),
                        config=PolicyConfig(), replay=Replay(stored, counts))
    (decision,) = decide([request], GEOMETRY)
    assert torch.equal(decision.keep[:, :, :30], stored)
    assert bool(decision.keep[:, :, 30:].all())
    assert torch.equal(decision.all_head_counts, counts + 6)


def test_models_with_logit_caps_or_sliding_windows_are_refused_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The packed decode implements neither; the backend factory names what the model has instead of failing at
    the first decode step."""
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    from sglang.srt.layers.radix_attention import RadixAttention

    from madakv_sglang.sglang.backend import unsupported_attention_layers

    plain = RadixAttention(4, 16, 0.25, 2, layer_id=0)
    capped = RadixAttention(4, 16, 0.25, 2, layer_id=1, logit_cap=30.0)
    windowed = RadixAttention(4, 16, 0.25, 2, layer_id=2, sliding_window_size=128)
    assert unsupported_attention_layers(torch.nn.ModuleList([plain])) == []
    assert unsupported_attention_layers(torch.nn.ModuleList([plain, capped, windowed])) == [
        "attention logit soft-capping (30.0)",
        "sliding-window layers (window 128)",
    ]
