"""The cut between prefill chunks (``madakv_sglang.chunk_eviction``) against loop oracles and hand cases."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from madakv_sglang.chunk_eviction import (
    NEVER,
    attend,
    cut,
    position_scores,
    protected_positions,
    survivor_target,
    visible,
)
from madakv_sglang.config import PolicyConfig
from madakv_sglang.policies.base import LOCAL

NO_POOLING = PolicyConfig(pooling="none")


def test_survivor_target_is_the_budget_multiple_within_protected_and_alive() -> None:
    assert survivor_target(10, Fraction(3, 2), protected=4, alive=100) == 15
    assert survivor_target(10, Fraction(1), protected=12, alive=100) == 12  # the protected ones always stay
    assert survivor_target(10, Fraction(2), protected=4, alive=9) == 9  # never more than there are
    assert survivor_target(7, Fraction(11, 10), protected=0, alive=100) == 8  # ceil(7.7), exact


def test_protected_positions_are_the_first_sinks_and_the_last_tail() -> None:
    assert protected_positions(8, sinks=2, tail=3).tolist() == [True, True, False, False, False, True, True, True]
    assert protected_positions(3, sinks=2, tail=2).tolist() == [True, True, True]
    assert not protected_positions(4, sinks=0, tail=0).any()


def _ranked(scores: list[float], members: list[int], count: int) -> set[int]:
    """The ``count`` best members by score, equal scores preferring the later position (the house tie rule)."""
    return set(sorted(members, key=lambda i: (-scores[i], -i))[:count])


@settings(max_examples=150, deadline=None)
@given(
    total=st.integers(4, 60),
    seed=st.integers(0, 10_000),
    sinks=st.integers(0, 4),
    tail=st.integers(0, 6),
    extra=st.integers(0, 60),
    coarse=st.booleans(),
)
def test_cut_without_split_keeps_the_protected_and_the_best_of_the_rest(
    total: int, seed: int, sinks: int, tail: int, extra: int, coarse: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(total, generator=gen, dtype=torch.float64)
    if coarse:  # many equal scores exercise the tie rule
        scores = torch.round(scores * 3) / 3
    visual = torch.rand(total, generator=gen) < 0.5
    protected = protected_positions(total, sinks, tail)
    target = min(total, int(protected.sum()) + extra)
    kept = cut(scores, visual, protected, target, NO_POOLING, split="none")
    rest = [i for i in range(total) if not protected[i]]
    expect = {i for i in range(total) if protected[i]} | _ranked(scores.tolist(), rest, target - int(protected.sum()))
    assert set(torch.nonzero(kept).flatten().tolist()) == expect


@settings(max_examples=150, deadline=None)
@given(total=st.integers(4, 60), seed=st.integers(0, 10_000), extra=st.integers(0, 60), visual_frac=st.floats(0, 1))
def test_cut_with_the_modality_split_gives_each_modality_its_share_of_the_mass(
    total: int, seed: int, extra: int, visual_frac: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.exp(2 * torch.randn(total, generator=gen, dtype=torch.float64))
    visual = torch.rand(total, generator=gen) < visual_frac
    protected = protected_positions(total, 2, 3)
    target = min(total, int(protected.sum()) + extra)
    kept = cut(scores, visual, protected, target, NO_POOLING)
    assert int(kept.sum()) == target
    assert bool(kept[protected].all())
    quota = target - int(protected.sum())
    shares = {}
    for modality in (True, False):
        members = [i for i in range(total) if not protected[i] and bool(visual[i]) == modality]
        chosen = {i for i in members if kept[i]}
        # Within a modality the best ones are kept.
        assert chosen == _ranked(scores.tolist(), members, len(chosen))
        shares[modality] = (len(chosen), len(members), float(scores[members].sum()) if members else 0.0)
    (k_v, n_v, m_v), (k_t, n_t, m_t) = shares[True], shares[False]
    if m_v + m_t > 0 and quota:
        ideal = quota * m_v / (m_v + m_t)
        # Rounding moves a modality by at most half a token; a modality with too few tokens gives its surplus away.
        low, high = max(0, quota - n_t), min(n_v, quota)
        assert low <= k_v <= high and abs(k_v - min(high, max(low, ideal))) <= 0.5 + 1e-9
    assert k_v + k_t == quota


def test_cut_pools_scores_as_the_policy_does() -> None:
    """A lone peak pulls its neighbours in under max pooling (kernel 3), and never across a modality change."""
    scores = torch.tensor([0.0, 0.1, 0.1, 5.0, 0.2, 0.1, 0.1, 0.0], dtype=torch.float64)
    visual = torch.tensor([False, False, False, False, True, True, True, False])
    protected = torch.zeros(8, dtype=torch.bool)
    pooled = PolicyConfig(pooling="max", pool_kernel=3)
    kept = cut(scores, visual, protected, 2, pooled, split="none")
    assert torch.nonzero(kept).flatten().tolist() == [2, 3]  # 2 pools to 5.0; 4 (visual) does not
    plain = cut(scores, visual, protected, 2, NO_POOLING, split="none")
    assert torch.nonzero(plain).flatten().tolist() == [3, 4]


def test_cut_refuses_a_target_outside_the_protected_and_the_alive() -> None:
    scores = torch.ones(6, dtype=torch.float64)
    protected = protected_positions(6, 1, 2)
    with pytest.raises(ValueError, match=r"target 2 must be in \[3, 6\]"):
        cut(scores, torch.zeros(6, dtype=torch.bool), protected, 2, NO_POOLING)
    with pytest.raises(ValueError, match="split must be one of modality, none"):
        cut(scores, torch.zeros(6, dtype=torch.bool), protected, 4, NO_POOLING, split="mass")


def test_visible_is_causal_until_the_cut() -> None:
    key_pos = torch.arange(6)
    cut_at = torch.tensor([NEVER, 4, NEVER, 4, NEVER, NEVER], dtype=torch.int32)  # 1 and 3 dropped after chunk [0, 4)
    query_pos = torch.arange(6)
    got = visible(query_pos, key_pos, cut_at)
    for p in range(6):
        for q in range(6):
            assert bool(got[p, q]) == (q <= p and not (q in (1, 3) and p >= 4)), (p, q)


def test_position_scores_sum_layers_and_heads_and_ignore_padding_heads() -> None:
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(3, 4, 9, generator=gen)
    assert torch.allclose(position_scores(scores, LOCAL), scores.double().sum(dim=(0, 1)))
    padded = position_scores(scores, LOCAL, padding=slice(2, 4))
    assert torch.allclose(padded, scores[:, :2].double().sum(dim=(0, 1)))


@pytest.mark.parametrize("per_head", [False, True])
def test_attend_equals_sdpa_with_the_same_explicit_mask(per_head: bool) -> None:
    """An independent formulation: torch's scaled_dot_product_attention over the KV heads repeated per query head,
    with the mask as an additive bias. float32 both ways; 1e-5 covers their different summation orders."""
    gen = torch.Generator().manual_seed(11)
    tq, tk, heads, group, dim = 5, 9, 2, 3, 8
    queries = torch.randn(tq, heads * group, dim, generator=gen)
    keys = torch.randn(tk, heads, dim, generator=gen)
    values = torch.randn(tk, heads, dim, generator=gen)
    cut_at = torch.tensor([NEVER, 6, NEVER, NEVER, 7, NEVER, NEVER, NEVER, NEVER], dtype=torch.int32)
    mask = visible(torch.arange(4, 9), torch.arange(tk), cut_at)
    if per_head:  # a replay's rows past the stored prompt read each head's own kept set
        mask = mask[None].repeat(heads, 1, 1)
        mask[1, :, 2] = False
    got = attend(queries, keys, values, mask, scale=0.3)
    bias = torch.zeros(heads, tq, tk).masked_fill(~(mask if per_head else mask[None].expand(heads, -1, -1)), -torch.inf)
    expect = torch.nn.functional.scaled_dot_product_attention(
        queries.permute(1, 0, 2),
        keys.repeat_interleave(group, dim=1).permute(1, 0, 2),
        values.repeat_interleave(group, dim=1).permute(1, 0, 2),
        attn_mask=bias.repeat_interleave(group, dim=0),
        scale=0.3,
    ).permute(1, 0, 2)
    assert torch.allclose(got, expect, atol=1e-5)
