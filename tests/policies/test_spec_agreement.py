"""The vectorized policies agree with the loop-by-loop spec of docs/design.md §2 on random inputs
(tests/spec_impl.py)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from madakv_sglang.config import PolicyConfig
from madakv_sglang.policies import PolicyInputs, get_policy
from tests.random_scores import random_request
from tests.spec_impl import spec_select

SPEC_POLICIES = ["full", "madakv", "snapkv", "pyramidkv", "adakv", "lookm", "streamingllm"]


def run_package(cfg: PolicyConfig, scores: torch.Tensor, visual: torch.Tensor) -> list[list[list[int]]]:
    L, H, n = scores.shape
    inputs = PolicyInputs(
        visual=visual[None],
        prompt_len=torch.tensor([n]),
        nominal_budget=torch.tensor([cfg.budget.tokens_for(n)]),
        num_layers=L,
        total_heads=H,
        scores=scores[None],
    )
    keep = get_policy(cfg.policy).select(inputs, cfg).keep[0]
    return [[keep[l, h].nonzero().flatten().tolist() for h in range(H)] for l in range(L)]


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    L=st.integers(1, 6),
    H=st.integers(1, 5),
    n=st.integers(1, 90),
    visual_frac=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    policy=st.sampled_from(SPEC_POLICIES),
    budget=st.sampled_from(["0.05", "0.1", "0.2", "0.5", "1.0", "12", "40"]),
    window=st.integers(1, 8),
    hcc=st.sampled_from(["global", "paper", "off"]),
    head_split=st.sampled_from(["uniform", "demand"]),
    mpa=st.booleans(),
    pooling=st.sampled_from(["none", "max", "avg"]),
    kernel=st.sampled_from([1, 3, 7]),
    theta=st.sampled_from([0.5, 0.9, 1.0]),
    cap=st.sampled_from([1.0, 1.25, 2.0, None]),
    ties=st.booleans(),
    sink=st.sampled_from([0, 1, 4]),
    min_prompt=st.sampled_from([0, 0, 30]),
    min_reclaim=st.sampled_from([0.0, 0.1, 0.5]),
    min_keep=st.sampled_from([None, None, 3, 10]),
    window_share=st.sampled_from([0.5, 0.5, 0.3, 1.0]),
)
def test_vectorized_policy_equals_spec(
    seed,
    L,
    H,
    n,
    visual_frac,
    policy,
    budget,
    window,
    hcc,
    head_split,
    mpa,
    pooling,
    kernel,
    theta,
    cap,
    ties,
    sink,
    min_prompt,
    min_reclaim,
    min_keep,
    window_share,
):
    cfg = PolicyConfig(
        policy=policy,
        budget=budget,
        window=window,
        hcc=hcc,
        head_split=head_split,
        mpa=mpa,
        pooling=pooling,
        pool_kernel=kernel,
        theta=theta,
        cap=cap,
        sink=sink,
        min_prompt=min_prompt,
        min_reclaim=min_reclaim,
        min_keep=min_keep,
        window_share=window_share,
    )
    scores, visual = random_request(seed, L, H, n, visual_frac, ties)
    expected = spec_select(scores.tolist(), visual.tolist(), n, cfg, H)
    assert run_package(cfg, scores, visual) == expected
