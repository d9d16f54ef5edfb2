"""Baselines on the same interface as MadaKV. Each one only says how it ranks tokens and how it spreads the
budget over layers and heads; selection, the window and the floor are shared (policies/base.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from madakv_sglang.config import PolicyOption
from madakv_sglang.policies import budget as budget_math
from madakv_sglang.policies.base import (
    LOCAL,
    BudgetState,
    Comm,
    PolicyInputs,
    ScoreSource,
    Selection,
    budget_state,
    finish,
    ranking_scores,
    uniform_heads,
    unprotected_quota,
)
from madakv_sglang.policies.registry import register_policy

if TYPE_CHECKING:
    from madakv_sglang.config import PolicyConfig


def _integer_at_least(lo: int) -> Callable[[Any], str | None]:
    def problem(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
        return None if ok else f"must be an integer >= {lo}"

    return problem


SEED = PolicyOption("seed", 0, int, _integer_at_least(0), "seed of the random policy")
PYRAMID_BETA = PolicyOption(
    "pyramid_beta", 20, int, _integer_at_least(1), "PyramidKV's beta: how steeply its layer budgets fall"
)
ADAKV_ALPHA = PolicyOption(
    "adakv_alpha",
    0.2,
    float,
    lambda value: None if 0.0 <= value <= 1.0 else "must be in [0, 1]",
    "AdaKV's safeguard: the share of B every head keeps before the cross-head top-k",
)


def _positions(inputs: PolicyInputs) -> Tensor:
    return torch.arange(inputs.visual.shape[-1], device=inputs.device)


def _broadcast(rank: Tensor, inputs: PolicyInputs) -> Tensor:
    """``[R, N]`` or ``[N]`` ranking -> ``[R, L, H_r, N]``."""
    shape = (inputs.visual.shape[0], inputs.num_layers, inputs.heads_here, inputs.visual.shape[-1])
    return rank.expand(shape) if rank.dim() == 4 else rank.reshape(-1, 1, 1, shape[-1]).expand(shape)


def _uniform_select(inputs: PolicyInputs, state: BudgetState, rank: Tensor) -> Selection:
    """Every layer H*B, every head B: the protected tokens plus the top (B - P) others by ``rank``."""
    layer_totals = budget_math.allot_layers_uniform(inputs.num_layers, state.budget, inputs.total_heads)
    head_budget, everyone = uniform_heads(inputs, layer_totals)
    return finish(inputs, state, rank, head_budget, everyone, layer_totals, unprotected_quota(head_budget, state))


@register_policy("full")
class Full:
    """No eviction (the reference every policy is compared with)."""

    name = "full"
    score_source: ScoreSource = "none"

    def select(self, inputs: PolicyInputs, cfg: PolicyConfig, comm: Comm = LOCAL) -> Selection:
        state = budget_state(inputs, cfg)
        state.budget = state.prompt_len  # B = n is the identity
        state.skipped = torch.zeros_like(state.skipped)  # nothing to skip: full never compresses
        return _uniform_select(inputs, state, _broadcast(torch.zeros_like(inputs.visual, dtype=torch.float32), inputs))


@register_policy("random")
class RandomEviction:
    """The kept window plus uniformly random tokens per head (a floor for every informed policy; it scores
    nothing, so it keeps no attention sinks).

    The draw is a hash of (seed, layer, global head, position), so it does not depend on how heads are spread
    over TP ranks or on the device.
    """

    name = "random"
    score_source: ScoreSource = "none"
    options = (SEED,)

    def select(self, inputs: PolicyInputs, cfg: PolicyConfig, comm: Comm = LOCAL) -> Selection:
        state = budget_state(inputs, cfg, sinks=False)
        layer = torch.arange(inputs.num_layers, device=inputs.device)[:, None, None]
        head = torch.arange(inputs.head_offset, inputs.head_offset + inputs.heads_here, device=inputs.device)
        x = _positions(inputs)[None, None, :] * 2654435761 + layer * 40503 + head[None, :, None] * 2246822519
        x = _mix(x + SEED.of(cfg) * 3266489917)
        return _uniform_select(inputs, state, _broadcast(x[None].expand(inputs.visual.shape[0], -1, -1, -1), inputs))


def _mix(x: Tensor) -> Tensor:
    """A 31-bit integer hash (xorshift-multiply rounds); every product stays below 2**62."""
    x = x % 2147483647
    for mult in (1274126177, 1911520717):
        x = x ^ (x >> 13)
        x = (x * mult) % 2147483647
    return x


@register_policy("streamingllm")
class StreamingLLM:
    """Attention sinks (the first ``sink`` tokens) plus the most recent tokens (Xiao et al., 2023): the shared
    protected tokens, and the rest of the budget by recency."""

    name = "streamingllm"
    score_source: ScoreSource = "none"

    def select(self, inputs: PolicyInputs, cfg: PolicyConfig, comm: Comm = LOCAL) -> Selection:
        state = budget_state(inputs, cfg)
        return _uniform_select(inputs, state, _broadcast(_positions(inputs).double(), inputs))


@register_policy("h2o")
class H2O:
    """Heavy hitters by accumulated attention of all prompt queries plus the recent window (Zhang et al., 2023).

    Needs every prompt query's attention, so it runs in the HF path only.
    """

    name = "h2o"
    score_source: ScoreSource = "accumulated"

    def select(self, inputs: PolicyInputs, cfg: PolicyConfig, comm: Comm = LOCAL) -> Selection:
        assert inputs.scores is not None, "h2o needs accumulated attention scores"
        return _uniform_select(inputs, budget_state(inputs, cfg), inputs.scores)


@register_policy("snapkv")
class SnapKV:
    """Window scores, pooled, the same budget for every layer and head (Li et al., 2024)."""

    name = "snapkv"
    score_source: ScoreSource = "window"

    def select(self, inputs: PolicyInputs, cfg: PolicyConfig, comm: Comm = LOCAL) -> Selection:
        assert inputs.scores is not None, "snapkv needs window scores"
        state = budget_state(inputs, cfg)
        return _uniform_select(inputs, state, ranking_scores(inputs.scores, state, inputs.visual, cfg))


@register_policy("pyramidkv")
class PyramidKV:
    """SnapKV selection under pyramidal layer budgets: lower layers keep more (Cai et al., 2024)."""

    name = "pyramidkv"
    score_source: ScoreSource = "window"
    options = (PYRAMID_BETA,)

    def select(self, inputs: PolicyInputs, cfg: PolicyConfig, comm: Comm = LOCAL) -> Selection:
        assert inputs.scores is not None, "pyramidkv needs window scores"
        state = budget_state(inputs, cfg)
        layer_totals = budget_math.allot_layers_pyramid(
            inputs.num_layers, state.prompt_len, state.budget, state.floor, inputs.total_heads, PYRAMID_BETA.of(cfg)
        )
        head_budget, everyone = uniform_heads(inputs, layer_totals)
        rank = ranking_scores(inputs.scores, state, inputs.visual, cfg)
        return finish(inputs, state, rank, head_budget, everyone, layer_totals, unprotected_quota(head_budget, state))


@register_policy("adakv")
class AdaKV:
    """Per layer H*B cells, spread over heads by a cross-head top-k of the scores (Feng et al., 2024).

    Every head first keeps max(floor, floor(alpha * B)) tokens (the safeguard); the rest of the layer's cells go
    to the best remaining tokens of any head. Under TP this needs every head's scores (an all-gather).
    """

    name = "adakv"
    score_source: ScoreSource = "window"
    options = (ADAKV_ALPHA,)

    def select(self, inputs: PolicyInputs, cfg: PolicyConfig, comm: Comm = LOCAL) -> Selection:
        assert inputs.scores is not None, "adakv needs window scores"
        state = budget_state(inputs, cfg)
        rank = ranking_scores(inputs.scores, state, inputs.visual, cfg)
        layer_totals = budget_math.allot_layers_uniform(inputs.num_layers, state.budget, inputs.total_heads)
        everyone = _adaptive_head_budgets(rank, state, cfg, comm, inputs.total_heads)
        head_budget = everyone[..., inputs.head_offset : inputs.head_offset + inputs.heads_here]
        return finish(inputs, state, rank, head_budget, everyone, layer_totals, unprotected_quota(head_budget, state))


def _adaptive_head_budgets(rank: Tensor, state: BudgetState, cfg: PolicyConfig, comm: Comm, heads: int) -> Tensor:
    """``[R, L, H]`` head budgets: the safeguard plus each head's share of the layer's cross-head top-k."""
    alpha_floor = torch.floor(ADAKV_ALPHA.of(cfg) * state.budget.double()).long()
    guaranteed = torch.minimum(torch.maximum(alpha_floor, state.floor), state.budget)  # [R]
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=rank.device)
    # Each head's unprotected scores, best first (later position first among equals, as in selection).
    masked = torch.where(state.rest[:, None, None, :], rank.double(), neg_inf).flip(-1)
    ordered = masked.sort(dim=-1, descending=True, stable=True).values
    ordered = comm.all_gather_heads(ordered)  # [R, L, H, N]
    skip = (guaranteed - state.protected)[:, None, None, None]
    ordinal = torch.arange(ordered.shape[-1], device=rank.device)
    candidates = torch.where(ordinal < skip, neg_inf, ordered)
    flat = candidates.flatten(2)  # head-major, so equal scores favour the lower head
    picks = heads * (state.budget - guaranteed)  # [R]
    order = flat.sort(dim=-1, descending=True, stable=True).indices
    chosen = torch.arange(flat.shape[-1], device=rank.device)[None, None, :] < picks[:, None, None]
    owner = order // ordered.shape[-1]
    extra = torch.zeros(flat.shape[:2] + (heads,), dtype=torch.long, device=rank.device)
    extra.scatter_add_(-1, owner, chosen.long().expand_as(owner))
    return guaranteed[:, None, None] + extra


@register_policy("lookm")
class LookM:
    """LOOK-M's text-prior eviction (Wan et al., 2024): text tokens are kept before any visual token, each
    modality ranked by the window scores. Its merge variant (folding evicted K/V into kept ones) is not
    implemented: the packed layout has no merge plan."""

    name = "lookm"
    score_source: ScoreSource = "window"

    def select(self, inputs: PolicyInputs, cfg: PolicyConfig, comm: Comm = LOCAL) -> Selection:
        assert inputs.scores is not None, "lookm needs window scores"
        state = budget_state(inputs, cfg)
        layer_totals = budget_math.allot_layers_uniform(inputs.num_layers, state.budget, inputs.total_heads)
        head_budget, everyone = uniform_heads(inputs, layer_totals)
        rest = head_budget - state.protected[:, None, None]
        b_t = torch.minimum(rest, state.text_rest.sum(-1)[:, None, None].expand_as(rest))
        quotas = [(state.text_rest, b_t), (state.visual_rest, rest - b_t)]
        rank = ranking_scores(inputs.scores, state, inputs.visual, cfg)
        return finish(inputs, state, rank, head_budget, everyone, layer_totals, quotas)
