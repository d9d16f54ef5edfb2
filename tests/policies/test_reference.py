"""The torch references against dense attention with an explicit mask (an independent formulation)."""

from __future__ import annotations

import pytest
import torch

from madakv_sglang.config import PolicyConfig
from madakv_sglang.kernels.torch_decode import headwise_decode
from madakv_sglang.layout import pack_plan, packing_waste, slot_count
from tests.oracles import apply_pack, compress_dense, merge_attention


def dense_masked(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, allowed: torch.Tensor, scale: float):
    """Plain softmax attention of q ``[B, Hq, D]`` over every slot of ``pool_k`` ``[S, H, D]``, with
    ``allowed`` ``[B, H, S]`` masking per request and KV head. Returns (out, lse)."""
    batch, hq, _ = q.shape
    heads = pool_k.shape[1]
    g = hq // heads
    k = pool_k.repeat_interleave(g, dim=1)  # [S, Hq, D]
    v = pool_v.repeat_interleave(g, dim=1)
    logits = torch.einsum("bqd,sqd->bqs", q, k) * scale
    mask = allowed.repeat_interleave(g, dim=1)
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.einsum("bqs,sqd->bqd", probs, v), lse


def random_subsets(batch: int, heads: int, slots: int, gen: torch.Generator, allow_empty: bool = True):
    allowed = torch.rand(batch, heads, slots, generator=gen) < 0.4
    allowed[..., 0] = False  # slot 0 is the pool's padding slot
    if allow_empty:
        allowed[0, 0] = False  # one empty head
    indptr = torch.zeros(batch * heads + 1, dtype=torch.long)
    indices = []
    for b in range(batch):
        for h in range(heads):
            slots_bh = allowed[b, h].nonzero().flatten()
            indices.append(slots_bh * heads + h)
            indptr[b * heads + h + 1] = indptr[b * heads + h] + slots_bh.numel()
    return allowed, indptr, torch.cat(indices)


@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("dim", [64, 128])
def test_headwise_decode_equals_dense_masked_float64(group: int, dim: int):
    gen = torch.Generator().manual_seed(group * 1000 + dim)
    batch, heads, slots = 3, 2, 40
    pool_k = torch.randn(slots, heads, dim, generator=gen, dtype=torch.float64)
    pool_v = torch.randn(slots, heads, dim, generator=gen, dtype=torch.float64)
    q = torch.randn(batch, heads * group, dim, generator=gen, dtype=torch.float64)
    allowed, indptr, indices = random_subsets(batch, heads, slots, gen)
    scale = dim**-0.5
    out, lse = headwise_decode(q, pool_k.view(-1, dim), pool_v.view(-1, dim), indptr, indices, heads, scale)
    ref_out, ref_lse = dense_masked(q, pool_k, pool_v, allowed, scale)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    assert torch.all(out[0, :group] == 0) and torch.all(torch.isneginf(lse[0, :group])), "empty head: 0 and -inf"


def test_headwise_decode_bf16_inputs():
    gen = torch.Generator().manual_seed(7)
    batch, heads, group, slots, dim = 2, 4, 7, 64, 128
    pool_k = torch.randn(slots, heads, dim, generator=gen).bfloat16()
    pool_v = torch.randn(slots, heads, dim, generator=gen).bfloat16()
    q = torch.randn(batch, heads * group, dim, generator=gen).bfloat16()
    allowed, indptr, indices = random_subsets(batch, heads, slots, gen, allow_empty=False)
    out, lse = headwise_decode(q, pool_k.view(-1, dim), pool_v.view(-1, dim), indptr, indices, heads, dim**-0.5)
    ref_out, ref_lse = dense_masked(q.double(), pool_k.double(), pool_v.double(), allowed, dim**-0.5)
    # Same bf16 values, float32 accumulation vs float64: only summation rounding (~1e-6 relative) differs.
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


def test_merge_attention_equals_attention_over_union():
    gen = torch.Generator().manual_seed(3)
    batch, heads, group, slots, dim = 2, 2, 4, 30, 64
    pool_k = torch.randn(slots, heads, dim, generator=gen, dtype=torch.float64)
    pool_v = torch.randn(slots, heads, dim, generator=gen, dtype=torch.float64)
    q = torch.randn(batch, heads * group, dim, generator=gen, dtype=torch.float64)
    allowed = torch.rand(batch, heads, slots, generator=gen) < 0.5
    split = torch.rand(batch, heads, slots, generator=gen) < 0.5
    part_a, part_b = allowed & split, allowed & ~split
    part_a[0, 1] = False  # one side empty for one head
    part_b[0, 1] = allowed[0, 1]
    out_a, lse_a = dense_masked(q, pool_k, pool_v, part_a, 0.125)
    out_b, lse_b = dense_masked(q, pool_k, pool_v, part_b, 0.125)
    merged, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    ref, ref_lse = dense_masked(q, pool_k, pool_v, allowed, 0.125)
    torch.testing.assert_close(merged, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)


def test_compress_dense_then_decode_equals_masked_dense():
    gen = torch.Generator().manual_seed(11)
    layers, heads, group, n, dim = 3, 2, 2, 50, 16
    cfg = PolicyConfig(policy="madakv", budget="0.3", window=4, min_prompt=0)
    keys = [torch.randn(n, heads, dim, generator=gen, dtype=torch.float64) for _ in range(layers)]
    values = [torch.randn(n, heads, dim, generator=gen, dtype=torch.float64) for _ in range(layers)]
    q_win = [torch.randn(4, heads * group, dim, generator=gen, dtype=torch.float64) for _ in range(layers)]
    visual = torch.zeros(n, dtype=torch.bool)
    visual[5:30] = True
    compressed, selection = compress_dense(q_win, keys, values, visual, cfg, scale=dim**-0.5)
    q = torch.randn(1, heads * group, dim, generator=gen, dtype=torch.float64)
    for layer, packed in enumerate(compressed):
        assert packed.keys.shape[0] == int(selection.head_counts[0, layer].sum())
        cells = torch.arange(packed.keys.shape[0])
        out, _ = headwise_decode(q, packed.keys, packed.values, packed.indptr, cells, heads, dim**-0.5)
        ref, _ = dense_masked(q, keys[layer], values[layer], selection.keep[:, layer], dim**-0.5)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_pack_moves_kept_cells_into_first_slots_and_decode_is_unchanged():
    gen = torch.Generator().manual_seed(5)
    layers, heads, n, dim = 3, 4, 24, 8
    pool = torch.randn(layers, 64, heads, dim, generator=gen, dtype=torch.float64)
    prompt_slots = torch.randperm(63, generator=gen)[:n] + 1
    keep = torch.rand(layers, heads, n, generator=gen) < 0.3
    keep[..., -2:] = True
    counts = keep.sum(-1)
    slots = int(slot_count(counts[None], layout="per-layer").item())
    # Oracles that do not restate the formulas: the fewest slots whose cells fit the fullest layer, and the waste
    # as the cells of those slots that the plan leaves unwritten.
    fullest = int(counts.sum(-1).max())
    assert (slots - 1) * heads < fullest <= slots * heads
    plan = pack_plan(keep, prompt_slots, prompt_slots[:slots])
    written = {(layer, int(cell)) for layer in range(layers) for cell in plan.dst[layer]}
    assert len(written) == int(counts.sum()), "no two kept cells share a destination"
    unwritten = [
        (layer, slot * heads + h)
        for layer in range(layers)
        for slot in prompt_slots[:slots].tolist()
        for h in range(heads)
        if (layer, slot * heads + h) not in written
    ]
    assert int(packing_waste(counts[None], torch.tensor([slots]))) == len(unwritten)
    q = torch.randn(1, heads, dim, generator=gen, dtype=torch.float64)
    for layer in range(layers):
        flat = pool[layer].reshape(-1, dim)
        before_idx = plan.src[layer]
        out_before, _ = headwise_decode(q, flat, flat, plan.indptr[layer], before_idx, heads, 1.0)
        expected = flat[plan.src[layer]].clone()
        apply_pack(flat, plan.src[layer], plan.dst[layer])
        assert torch.equal(flat[plan.dst[layer]], expected), "overlapping moves must not clobber sources"
        assert set((plan.dst[layer] // heads).tolist()) <= set(prompt_slots[:slots].tolist())
        out_after, _ = headwise_decode(q, flat, flat, plan.indptr[layer], plan.dst[layer], heads, 1.0)
        torch.testing.assert_close(out_after, out_before, atol=0, rtol=0)


def test_shared_pack_moves_every_layer_into_the_first_slots_and_decode_is_unchanged():
    """Shared layout: one ``[L * rows * H, D]`` array of cells; a layer's kept cells may land in another layer's
    cells of the M slots, and decode over the moved ids equals decode over the original ones, bit for bit."""
    gen = torch.Generator().manual_seed(6)
    layers, heads, n, dim, rows = 4, 2, 30, 8, 64
    pool = torch.randn(layers, rows, heads, dim, generator=gen, dtype=torch.float64)
    cells = pool.view(-1, dim)
    prompt_slots = torch.randperm(rows - 1, generator=gen)[:n] + 1
    keep = torch.rand(layers, heads, n, generator=gen) < 0.15
    keep[0] = torch.rand(heads, n, generator=gen) < 0.9  # one full layer: per-layer would hold ~0.9 n slots
    keep[..., -2:] = True
    counts = keep.sum(-1)
    slots = int(slot_count(counts[None], layout="shared").item())
    assert slots == -(-int(counts.sum()) // (layers * heads)) < int(slot_count(counts[None], layout="per-layer"))
    plan = pack_plan(keep, prompt_slots, prompt_slots[:slots], rows=rows)
    q = torch.randn(1, heads, dim, generator=gen, dtype=torch.float64)
    before = [headwise_decode(q, cells, cells, plan.indptr[l], plan.src[l], heads, 1.0)[0] for l in range(layers)]
    for layer in range(layers):  # the sources are the kept positions' own cells of their own layer
        want = (layer * rows + prompt_slots[plan.positions[layer]]) * heads
        assert torch.equal(plan.src[layer] - plan.src[layer] % heads, want)
    src, dst = torch.cat(plan.src), torch.cat(plan.dst)
    expected = cells[src].clone()
    apply_pack(cells, src, dst)
    assert torch.equal(cells[dst], expected), "overlapping moves must not clobber sources"
    target = set(prompt_slots[:slots].tolist())
    assert {int(c) // heads % rows for c in dst} <= target, "every packed cell lies in the first M slots"
    assert len(set(dst.tolist())) == dst.numel() == int(counts.sum())
    assert any(int(c) // (rows * heads) != 0 for c in plan.dst[0]), "the full layer spills into other layers' cells"
    for layer in range(layers):
        after, _ = headwise_decode(q, cells, cells, plan.indptr[layer], plan.dst[layer], heads, 1.0)
        torch.testing.assert_close(after, before[layer], atol=0, rtol=0)


def test_slot_count_under_tp_takes_the_fullest_rank():
    counts = torch.tensor([[[5, 1, 2, 2]]])  # one layer, 4 heads
    assert int(slot_count(counts, tp_size=1, layout="per-layer")) == 3  # ceil(10 / 4)
    assert int(slot_count(counts, tp_size=2, layout="per-layer")) == 3  # rank 0 holds 6 cells in 2 heads
    assert int(slot_count(counts, tp_size=4, layout="per-layer")) == 5
    two = torch.tensor([[[5, 1, 2, 2], [1, 1, 0, 2]]])  # two layers: shared pools a rank's layers
    assert int(slot_count(two, tp_size=1, layout="shared")) == 2  # ceil(14 / 8)
    assert int(slot_count(two, tp_size=2, layout="shared")) == 2  # rank 0: ceil(8 / 4)
    assert int(slot_count(two, tp_size=4, layout="shared")) == 3  # rank 0: ceil(6 / 2)


def test_slot_count_with_replicated_heads_takes_the_fullest_head():
    counts = torch.tensor([[[5, 2], [1, 3]]])  # two layers, 2 KV heads over 4 ranks: each rank holds one head
    assert int(slot_count(counts, tp_size=4, layout="per-layer")) == 5  # ranks 0-1 hold head 0 with 5 cells in layer 0
    assert int(slot_count(counts, tp_size=4, layout="shared")) == 3  # head 0: ceil(6 / 2)
    with pytest.raises(ValueError, match="cannot be split"):
        slot_count(torch.ones(1, 1, 3, dtype=torch.long), tp_size=2, layout="shared")
    with pytest.raises(ValueError, match="unknown layout"):
        slot_count(counts, layout="paged")
