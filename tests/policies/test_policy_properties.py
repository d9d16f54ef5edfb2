"""Invariants of every policy over random shapes and budgets (docs/design.md §2), plus hand-computed golden cases."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from madakv_sglang.config import ConfigError, PolicyConfig
from madakv_sglang.layout import slot_count
from madakv_sglang.policies import PolicyInputs, get_policy, policy_names
from madakv_sglang.policies.base import NOT_SKIPPED, SKIP_SHORT_PROMPT, SKIP_SMALL_SAVING, skip_codes
from madakv_sglang.policies.baselines import ADAKV_ALPHA, PYRAMID_BETA
from madakv_sglang.policies.budget import bounded_proportional_fill
from madakv_sglang.policies.registry import policy_options
from madakv_sglang.settings import parse_settings
from tests.random_scores import random_request

ALL = [p for p in policy_names() if p != "h2o"] + ["h2o"]
# These properties are about compressing: the skip rule (a floor on the prompt length, a minimum saving) is off
# here and tested on its own below.
COMPRESS = dict(min_prompt=0, min_reclaim=0.0)


def protected_counts(B: int, cfg: PolicyConfig, policy: str) -> tuple[int, int]:
    """(kept window, sinks) for budget B, written from the README's rule: the window keeps min(W, max(1,
    floor(window_share * (B - S)))) positions, the sinks what is left of S; random keeps no sinks."""
    sinks = 0 if policy == "random" else cfg.sink
    window = min(cfg.window, max(1, math.floor(cfg.window_share_fraction * (B - sinks))), B)
    return window, min(sinks, B - window)


def inputs_for(cfg: PolicyConfig, scores: torch.Tensor, visual: torch.Tensor, lengths: list[int]) -> PolicyInputs:
    """A batch: scores ``[R, L, H, N]`` (zeroed past each prompt), visual ``[R, N]``."""
    return PolicyInputs(
        visual=visual,
        prompt_len=torch.tensor(lengths),
        nominal_budget=torch.tensor([cfg.budget.tokens_for(n) for n in lengths]),
        num_layers=scores.shape[1],
        total_heads=scores.shape[2],
        scores=scores,
    )


def batch(seed: int, L: int, H: int, lengths: list[int], visual_frac: float):
    width = max(lengths)
    scores = torch.zeros(len(lengths), L, H, width)
    visual = torch.zeros(len(lengths), width, dtype=torch.bool)
    for r, n in enumerate(lengths):
        s, v = random_request(seed + r, L, H, n, visual_frac)
        scores[r, ..., :n], visual[r, :n] = s, v
    return scores, visual


shapes = dict(
    seed=st.integers(0, 10_000),
    L=st.integers(1, 8),
    H=st.integers(1, 6),
    lengths=st.lists(st.integers(1, 120), min_size=1, max_size=3),
    visual_frac=st.sampled_from([0.0, 0.4, 0.8, 1.0]),
    policy=st.sampled_from(ALL),
    budget=st.sampled_from(["0.05", "0.1", "0.2", "0.5", "16", "64"]),
    hcc=st.sampled_from(["global", "paper", "off"]),
    head_split=st.sampled_from(["uniform", "demand"]),
    cap=st.sampled_from([1.0, 1.25, 1.5, None]),
)


@settings(max_examples=200, deadline=None)
@given(**shapes)
def test_budget_caps_floor_and_window(seed, L, H, lengths, visual_frac, policy, budget, hcc, head_split, cap):
    cfg = PolicyConfig(policy=policy, budget=budget, window=4, hcc=hcc, head_split=head_split, cap=cap, **COMPRESS)
    scores, visual = batch(seed, L, H, lengths, visual_frac)
    sel = get_policy(policy).select(inputs_for(cfg, scores, visual, lengths), cfg)
    slots = slot_count(sel.all_head_counts, layout="per-layer")
    shared = slot_count(sel.all_head_counts, layout="shared")
    for r, n in enumerate(lengths):
        keep = sel.keep[r]
        counts = keep.sum(-1)
        assert torch.equal(counts, sel.head_counts[r]) and torch.equal(counts, sel.all_head_counts[r])
        assert not keep[..., n:].any(), "nothing past the prompt"
        B = int(sel.budget[r])
        assert (n if policy == "full" else min(cfg.budget.tokens_for(n), n)) == B, "the budget is never raised"
        if n <= B or policy == "full":
            assert keep[..., :n].all(), "budget >= n is the identity"
            continue
        window, sinks = protected_counts(B, cfg, policy)
        assert keep[..., n - window : n].all(), "kept window always kept"
        assert keep[..., :sinks].all(), "sinks always kept"
        if window < cfg.window and sinks + 2 <= B:
            assert B - window - sinks >= window, "below S + 2W, at least as many tokens by score as by recency"
        assert counts.min() >= window + sinks and counts.max() <= n, "every head within [protected, n]"
        total = int(counts.sum())
        # The fewest slots whose cells hold every kept cell: of all layers together (shared), of the fullest layer
        # (per-layer); stated as what fits, not as the code's ceiling formula.
        m_shared, m_layer, fullest = int(shared[r]), int(slots[r]), int(counts.sum(-1).max())
        assert (m_shared - 1) * L * H < total <= m_shared * L * H, "shared: the fewest slots that fit every cell"
        assert (m_layer - 1) * H < fullest <= m_layer * H, "per-layer: the fewest that fit the fullest layer"
        assert m_shared <= m_layer
        if policy == "pyramidkv":
            assert total == L * H * B
            continue
        assert total <= L * H * B, "the budget is a ceiling"
        cap = cfg.cap_fraction
        layer_cap = H * n if cap is None else min(H * n, math.floor(cap * H * B))
        if policy == "madakv" and hcc != "off":
            assert int(counts.sum(-1).max()) <= layer_cap, "no layer above its cap, the last one included"
            if cap is not None:
                assert int(slots[r]) <= math.ceil(cap * B)
            if hcc == "global":
                assert total == min(L * H * B, L * layer_cap)
        else:
            assert total == L * H * B


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    L=st.integers(1, 5),
    H=st.integers(1, 4),
    lengths=st.lists(st.integers(10, 100), min_size=2, max_size=4),
    policy=st.sampled_from(ALL),
    budget=st.sampled_from(["0.1", "0.3", "24"]),
)
def test_batching_does_not_change_decisions(seed, L, H, lengths, policy, budget):
    """A request decides the same alone and inside a padded batch (the engine batches requests)."""
    cfg = PolicyConfig(policy=policy, budget=budget, window=4, **COMPRESS)
    scores, visual = batch(seed, L, H, lengths, 0.5)
    together = get_policy(policy).select(inputs_for(cfg, scores, visual, lengths), cfg)
    for r, n in enumerate(lengths):
        alone = get_policy(policy).select(inputs_for(cfg, scores[r : r + 1, ..., :n], visual[r : r + 1, :n], [n]), cfg)
        assert torch.equal(alone.keep[0], together.keep[r, ..., :n])


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    L=st.integers(1, 6),
    H=st.integers(1, 4),
    n=st.integers(80, 160),
    visual_frac=st.sampled_from([0.0, 0.4, 0.8]),
    budget=st.sampled_from(["0.1", "0.2", "0.3"]),
    hcc=st.sampled_from(["global", "paper"]),
    mpa=st.booleans(),
)
def test_hcc_keeps_a_subset_of_uniform_allotment_at_the_same_slots(seed, L, H, n, visual_frac, budget, hcc, mpa):
    """A request holds M slots, its fullest layer's cells per head, in every layer (docs/design.md §4). With the default
    uniform head split, uniform allotment at budget M (hcc off) keeps every cell HCC kept, in the same M slots:
    both select top-b per head and modality, and b only grows. So under this layout, at equal physical slots,
    HCC only ever keeps fewer cells. No sinks and B >= 2W (n >= 80, r >= 0.1), so both allotments protect the
    same last W tokens (below S + 2W the kept window shrinks with B); so does the flat budget M when M >= 2W."""
    scores, visual = batch(seed, L, H, [n], visual_frac)
    cfg = PolicyConfig(policy="madakv", budget=budget, window=4, hcc=hcc, mpa=mpa, sink=0, **COMPRESS)
    hcc_sel = get_policy("madakv").select(inputs_for(cfg, scores, visual, [n]), cfg)
    slots = int(slot_count(hcc_sel.all_head_counts, layout="per-layer")[0])
    assume(slots >= 2 * 4)  # the flat budget M keeps the same last W = 4 tokens only from 2W on
    flat = PolicyConfig(policy="madakv", budget=str(slots), window=4, hcc="off", mpa=mpa, sink=0, **COMPRESS)
    flat_sel = get_policy("madakv").select(inputs_for(flat, scores, visual, [n]), flat)
    assert int(slot_count(flat_sel.all_head_counts, layout="per-layer")[0]) == slots
    assert not (hcc_sel.keep[0] & ~flat_sel.keep[0]).any(), "a cell HCC kept that the flat allotment dropped"


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(40, 120),
    budget=st.sampled_from(["0.2", "0.3", "0.4"]),
    hcc=st.sampled_from(["global", "paper", "off"]),
)
def test_mpa_moves_budget_toward_the_attended_modality(seed, n, budget, hcc):
    """Raising a head's attention on visual tokens never lowers its visual quota, and the split follows the
    masses: |b_v - (b_h - W) * share| <= 1/2 unless a modality runs out of tokens. No sinks, and budgets of at
    least 2W (n >= 40, r >= 0.2), so the protected tokens are exactly the last W = 4."""
    cfg = PolicyConfig(policy="madakv", budget=budget, window=4, hcc=hcc, sink=0, **COMPRESS)
    scores, visual = batch(seed, 3, 4, [n], 0.5)
    base = get_policy("madakv").select(inputs_for(cfg, scores, visual, [n]), cfg)
    boosted_scores = scores.clone()
    boosted_scores[0, :, 0, :] = torch.where(visual[0], scores[0, :, 0, :] * 8, scores[0, :, 0, :])
    boosted = get_policy("madakv").select(inputs_for(cfg, boosted_scores, visual, [n]), cfg)
    same_budget = boosted.head_counts[0, :, 0] == base.head_counts[0, :, 0]
    assert torch.all(boosted.kept_visual[0, :, 0][same_budget] >= base.kept_visual[0, :, 0][same_budget])
    vis_rest = visual[0, : n - 4]
    share_rest = scores[0, ..., : n - 4].double()
    mass_v = (share_rest * vis_rest).sum(-1)
    mass_t = (share_rest * ~vis_rest).sum(-1)
    rest = base.head_counts[0] - 4
    b_v = base.kept_visual[0] - int(visual[0, n - 4 : n].sum())
    expected = rest.double() * mass_v / (mass_v + mass_t)
    room = (b_v < int(vis_rest.sum())) & (rest - b_v < int((~vis_rest).sum()))
    assert torch.all((b_v.double() - expected).abs()[room] <= 0.5 + 1e-9)


class ThreadComm:
    """Simulated TP ranks in threads: all-reduce and all-gather through a barrier."""

    def __init__(self, ranks: int):
        # A rank that never arrives fails the test instead of hanging it.
        self.ranks, self.barrier, self.slots = ranks, threading.Barrier(ranks, timeout=60), [None] * ranks

    def for_rank(self, rank: int):
        comm = self

        class Rank:
            def _exchange(self, tensor):
                comm.slots[rank] = tensor
                comm.barrier.wait()
                gathered = list(comm.slots)
                comm.barrier.wait()
                return gathered

            def all_reduce_sum(self, tensor):
                return sum(self._exchange(tensor))

            def all_gather_heads(self, tensor):
                return torch.cat(self._exchange(tensor), dim=2)

        return Rank()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    L=st.integers(1, 5),
    heads_per_rank=st.integers(1, 3),
    ranks=st.sampled_from([2, 4]),
    lengths=st.lists(st.integers(8, 90), min_size=1, max_size=3),
    policy=st.sampled_from(ALL),
    hcc=st.sampled_from(["global", "paper", "off"]),
    head_split=st.sampled_from(["uniform", "demand"]),
)
def test_heads_partitioned_over_ranks_give_identical_kept_sets(
    seed, L, heads_per_rank, ranks, lengths, policy, hcc, head_split
):
    cfg = PolicyConfig(policy=policy, budget="0.2", window=4, hcc=hcc, head_split=head_split, **COMPRESS)
    H = heads_per_rank * ranks
    scores, visual = batch(seed, L, H, lengths, 0.5)
    whole = get_policy(policy).select(inputs_for(cfg, scores, visual, lengths), cfg)
    comm = ThreadComm(ranks)
    results: list = [None] * ranks

    def run(rank: int) -> None:
        lo = rank * heads_per_rank
        part = inputs_for(cfg, scores[:, :, lo : lo + heads_per_rank], visual, lengths)
        part.total_heads, part.head_offset = H, lo
        results[rank] = get_policy(policy).select(part, cfg, comm.for_rank(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert torch.equal(torch.cat([res.keep for res in results], dim=2), whole.keep)
    for res in results:
        assert torch.equal(res.all_head_counts, whole.all_head_counts), "every rank knows every rank's counts"
        for layout in ("shared", "per-layer"):
            assert torch.equal(
                slot_count(res.all_head_counts, ranks, layout=layout),
                slot_count(whole.all_head_counts, ranks, layout=layout),
            )


# ---- golden cases, computed by hand (see the comments) ----


def test_bounded_fill_golden():
    def fill(w, lo, hi, total):
        return bounded_proportional_fill(
            torch.tensor([w]), torch.tensor([lo]), torch.tensor([hi]), torch.tensor([total])
        )[0].tolist()

    assert fill([1, 2, 3], [0, 0, 0], [10, 10, 10], 12) == [2, 4, 6]  # exactly proportional
    assert fill([1, 1, 1], [0, 0, 0], [10, 10, 10], 10) == [4, 3, 3]  # 3.33 each, remainder to the lowest index
    assert fill([1, 10], [2, 2], [5, 5], 8) == [3, 5]  # item 2 capped at 5, item 1 takes the rest
    assert fill([0, 1], [1, 1], [9, 9], 6) == [1, 5]  # weight 0 stays at its floor


def golden_request():
    """L=2, H=2, n=8, W=2, no sinks; positions 0-3 visual, 4-5 text, 6-7 window. Dyadic values keep sums
    exact."""
    scores = torch.tensor(
        [
            [[0.75, 0.125, 0.125, 0.125, 0.25, 0.125, 1, 1], [0.0625] * 4 + [0.5, 0.25, 1, 1]],
            [[0.125] * 4 + [0.25, 0.25, 1, 1], [0.0625] * 4 + [0.125, 0.125, 1, 1]],
        ]
    )
    visual = torch.tensor([True] * 4 + [False] * 4)
    return scores[None], visual[None]


def kept_sets(sel) -> list[list[list[int]]]:
    keep = sel.keep[0]
    return [[keep[l, h].nonzero().flatten().tolist() for h in range(keep.shape[1])] for l in range(keep.shape[0])]


def test_madakv_golden_global():
    # Demands with theta = 0.5: L0 heads (2+1+1, 2+2+1) = 9, L1 heads (2+2+1, 2+2+1) = 10.
    # Budget B=4: total 16, layer bounds [4, min(16, floor(1.25*2*4)=10)]; 16*9/19 = 7.58, 16*10/19 = 8.42
    # -> floors 7, 8, the remainder to layer 0 (larger fraction) -> T = [8, 8] -> 4 per head.
    # MPA: L0H0 share 1.125/1.5 -> b_v = floor(2*0.75+0.5) = 2: {0, 3 (tie -> later)}; L0H1 share 0.25 ->
    # b_v = 1: {3}, b_t = 1: {4}; L1 heads share 0.5 -> {3} + {5} (ties -> later positions).
    cfg = PolicyConfig(policy="madakv", budget=4, window=2, theta=0.5, pooling="none", hcc="global", sink=0, **COMPRESS)
    scores, visual = golden_request()
    sel = get_policy("madakv").select(inputs_for(cfg, scores, visual, [8]), cfg)
    assert sel.layer_totals.tolist() == [[8, 8]]
    assert kept_sets(sel) == [[[0, 3, 6, 7], [3, 4, 6, 7]], [[3, 5, 6, 7], [3, 5, 6, 7]]]
    assert slot_count(sel.all_head_counts, layout="per-layer").tolist() == [4]
    assert slot_count(sel.all_head_counts, layout="shared").tolist() == [4]  # ceil(16 / (2 * 2))


def test_madakv_golden_paper():
    # R0 = 16. Layer 1: hi = min(16, 16-4, floor(1.25*16/2)=10) -> T = clamp(9, 4, 10) = 9, R = 7.
    # Layer 2: hi = min(16, 7, floor(1.25*7)=8) = 7 -> T = clamp(10, 4, 7) = 7. Heads: [5, 4] and [4, 3].
    # L0H0 rest 3: b_v = floor(3*0.75+0.5) = 2 -> {0, 3}, b_t = 1 -> {4}; L1H1 rest 1: b_v = 1 -> {3}.
    # Per-layer M = ceil(9/2) = 5, waste = 5*2*2 - 16 = 4; shared M = ceil(16 / (2*2)) = 4, no waste.
    cfg = PolicyConfig(policy="madakv", budget=4, window=2, theta=0.5, pooling="none", hcc="paper", sink=0, **COMPRESS)
    scores, visual = golden_request()
    sel = get_policy("madakv").select(inputs_for(cfg, scores, visual, [8]), cfg)
    assert sel.layer_totals.tolist() == [[9, 7]]
    assert kept_sets(sel) == [[[0, 3, 4, 6, 7], [3, 4, 6, 7]], [[3, 5, 6, 7], [3, 6, 7]]]
    assert slot_count(sel.all_head_counts, layout="per-layer").tolist() == [5]
    assert slot_count(sel.all_head_counts, layout="shared").tolist() == [4]


def test_snapkv_golden():
    # B=4 per head, top 2 non-window by score, no modality split: L0H0 {0 (0.75), 4 (0.25)}.
    cfg = PolicyConfig(policy="snapkv", budget=4, window=2, pooling="none", sink=0, **COMPRESS)
    scores, visual = golden_request()
    assert kept_sets(get_policy("snapkv").select(inputs_for(cfg, scores, visual, [8]), cfg))[0][0] == [0, 4, 6, 7]


@pytest.mark.parametrize(
    "changes",
    [
        dict(budget=0),
        dict(budget="-0.1"),
        dict(budget="1.5"),
        dict(window=0),
        dict(theta=0.0),
        dict(hcc="x"),
        dict(cap=0.9),
        dict(pool_kernel=4),
        dict(min_keep=0),
        dict(sink=-1),
        dict(min_prompt=-1),
        dict(min_reclaim=1.0),
        dict(min_reclaim=-0.1),
        dict(window_share=0.0),
        dict(window_share=1.5),
        dict(layout="paged"),
        dict(cap=65.0),
    ],
)
def test_invalid_config_is_refused_with_a_message(changes):
    with pytest.raises(ConfigError) as err:
        PolicyConfig(**changes)
    assert str(err.value).startswith(f"{next(iter(changes))}:"), "the message names the setting"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"policy": "nope"}, "policy"),
        ({"seed": "-1"}, "seed"),
        ({"seed": "x"}, "seed"),
        ({"pyramid_beta": "0"}, "pyramid_beta"),
        ({"adakv_alpha": "1.5"}, "adakv_alpha"),
        ({"cap": "0.5"}, "cap"),
        ({"alpha": "0.3"}, "unknown policy setting 'alpha'"),
    ],
)
def test_settings_are_checked_against_the_registry_at_the_edge(values, named):
    """Policy names and policy options are known only to the registry, so ``parse_settings`` checks them."""
    with pytest.raises(ConfigError) as err:
        parse_settings(values)
    assert str(err.value).startswith(named), err.value
    if named == "policy":
        assert "choose one of full, madakv" in str(err.value)


def test_policy_options_have_their_policies_defaults_and_survive_the_text_form():
    assert PYRAMID_BETA.of(PolicyConfig()) == 20 and ADAKV_ALPHA.of(PolicyConfig()) == 0.2
    set_once = parse_settings({"policy": "adakv", "adakv_alpha": "0.35", "pyramid_beta": "20"})
    assert set_once.options == (("adakv_alpha", 0.35),), "an option at its default is not stored"
    assert parse_settings(set_once.to_strings()) == set_once
    assert parse_settings({"adakv_alpha": "0.2"}) == PolicyConfig(), "equal settings give equal configs"
    assert sorted(policy_options()) == ["adakv_alpha", "pyramid_beta", "seed"]


def test_importing_the_config_imports_neither_torch_nor_a_policy():
    """``config`` is a leaf: building a PolicyConfig must stay cheap in every process (a fresh interpreter)."""
    code = (
        "import sys; from madakv_sglang.config import PolicyConfig; PolicyConfig(); "
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('madakv_sglang.')); "
        "print(loaded)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MADAKV_DISABLE_CPU_SHIMS": "1"},
    ).stdout.strip()
    assert out == "['madakv_sglang.config']", out


def test_no_cap_and_the_layout_survive_their_text_form():
    """The environment carries every setting as text; ``cap=None`` must not fall back to the 1.25 default."""
    cfg = PolicyConfig(cap=None, layout="per-layer")
    assert cfg.to_strings()["cap"] == "none"
    assert PolicyConfig.from_strings(cfg.to_strings()) == cfg
    assert PolicyConfig.from_strings({"cap": "None"}).cap is None


def test_budget_ratio_is_exact():
    assert PolicyConfig(budget="0.1").budget.tokens_for(30) == 3  # float 0.1*30 would ceil to 4
    assert PolicyConfig(budget="512").budget.tokens_for(30) == 512
    assert PolicyConfig.from_strings({"budget": "0.2", "mpa": "off", "hcc": "paper"}).mpa is False


# ---- short prompts, sinks and the budget below the floor (README "Short prompts, sinks and the floor") ----


def _one_request(n: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return batch(seed, 2, 2, [n], 0.4)


def test_budget_below_the_floor_splits_between_window_and_scores():
    # B = ceil(0.1 * 100) = 10 < S + 2W = 68: kept window = (10 - 4) // 2 = 3, sinks 4, 3 tokens by score.
    cfg = PolicyConfig(policy="snapkv", budget="0.1", window=32, pooling="none", **COMPRESS)
    scores, visual = _one_request(100)
    sel = get_policy("snapkv").select(inputs_for(cfg, scores, visual, [100]), cfg)
    keep = sel.keep[0]
    assert sel.head_counts.unique().tolist() == [10]
    assert keep[..., :4].all() and keep[..., 97:].all() and not keep[..., 94:97].any()
    for layer in range(2):
        for head in range(2):
            middle = scores[0, layer, head, 4:97]
            best = set((middle.topk(3).indices + 4).tolist())
            assert set(keep[layer, head, 4:97].nonzero().flatten().add(4).tolist()) == best


def test_sinks_off_gives_the_window_half_of_a_small_budget():
    cfg = PolicyConfig(policy="madakv", budget="0.1", window=32, sink=0, **COMPRESS)
    scores, visual = _one_request(100)
    keep = get_policy("madakv").select(inputs_for(cfg, scores, visual, [100]), cfg).keep[0]
    # B = 10, no sinks: the last 10 // 2 = 5 positions, and 5 by score in every head.
    assert keep[..., 95:].all() and keep[..., :95].sum(-1).unique().tolist() == [5]


def test_streamingllm_keeps_sinks_and_recent_and_random_keeps_no_sinks():
    cfg = PolicyConfig(policy="streamingllm", budget="0.1", window=32, **COMPRESS)
    scores, visual = _one_request(100)
    keep = get_policy("streamingllm").select(inputs_for(cfg, scores, visual, [100]), cfg).keep[0]
    expected = torch.zeros(100, dtype=torch.bool)
    expected[:4] = True
    expected[94:] = True  # 4 sinks, then the 6 most recent
    assert torch.equal(keep, expected.expand_as(keep))
    whole = cfg.replace(window_share=1.0)  # the kept window takes all the sinks leave: 4 sinks, the last 6
    assert torch.equal(get_policy("streamingllm").select(inputs_for(whole, scores, visual, [100]), whole).keep[0], keep)
    rand = cfg.replace(policy="random")
    kept = get_policy("random").select(inputs_for(rand, scores, visual, [100]), rand).keep[0]
    assert kept[..., 95:].all() and kept.sum(-1).unique().tolist() == [10]  # window 5, nothing reserved for sinks


@pytest.mark.parametrize(
    ("n", "budget", "changes", "expected"),
    [
        (255, "0.1", {}, SKIP_SHORT_PROMPT),  # below the default min_prompt of 256
        (256, "0.1", {}, NOT_SKIPPED),
        (100, "0.1", dict(min_prompt=100), NOT_SKIPPED),
        (300, "271", {}, SKIP_SMALL_SAVING),  # reclaims 29 < 0.1 * 300
        (300, "270", {}, NOT_SKIPPED),  # reclaims exactly 30
        (300, "1.0", {}, SKIP_SMALL_SAVING),
        (300, "10", dict(min_keep=280), SKIP_SMALL_SAVING),  # the raised budget counts
        (300, "0.95", dict(min_reclaim=0.0), NOT_SKIPPED),
    ],
)
def test_skip_rule(n, budget, changes, expected):
    cfg = PolicyConfig(policy="madakv", budget=budget, **changes)
    scores, visual = _one_request(n)
    sel = get_policy("madakv").select(inputs_for(cfg, scores, visual, [n]), cfg)
    assert sel.skipped.tolist() == [expected]
    assert bool(sel.keep[0].all()) == (expected != NOT_SKIPPED or sel.budget.item() >= n)
    assert skip_codes(torch.tensor([n]), torch.tensor([cfg.budget.tokens_for(n)]), cfg).tolist() == [expected]


def test_full_never_reports_a_skip():
    cfg = PolicyConfig(policy="full")
    scores, visual = _one_request(40)
    assert get_policy("full").select(inputs_for(cfg, scores, visual, [40]), cfg).skipped.tolist() == [0]
