"""The one interface every policy implements, and the shared budget pipeline most of them are built from.

A policy maps (scores, modality mask, budget state) to kept positions, nothing else (DESIGN §2). It runs once
per batch of requests whose prompts just finished, batched on the device, without host syncs.

Tensor-parallel runs hold a slice of the KV heads. A policy only ever communicates through ``Comm`` (one integer
all-reduce of layer demands, or an all-gather along heads), so splitting the heads across ranks and combining
the per-rank numbers gives the same kept sets as one rank holding every head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import Tensor

from madakv_sglang.policies import budget as budget_math
from madakv_sglang.policies.scoring import pool_within_segments
from madakv_sglang.policies.select import select_top

if TYPE_CHECKING:
    from madakv_sglang.config import PolicyConfig

ScoreSource = Literal["window", "accumulated", "none"]

# Segment ids for pooling: scores pool only within runs of the same id.
_SEG_PAD, _SEG_WINDOW = -1, 0


class Comm(Protocol):
    """Collectives over the TP ranks that share a request's KV heads (identity on one rank)."""

    def all_reduce_sum(self, tensor: Tensor) -> Tensor: ...

    def all_gather_heads(self, tensor: Tensor) -> Tensor:
        """Concatenate every rank's ``[R, L, H_r, ...]`` tensor along dim 2, in rank order."""
        ...

    def merge_replica_scores(self, scores: Tensor, reduce: str) -> Tensor:
        """A KV head replicated over ranks sees part of its query group on each: combine the partial scores
        ``[R, L, H_r, N]`` (each reduced over its query heads with ``reduce``) into the whole group's."""
        ...


class LocalComm:
    """One rank holds every head: collectives are the identity."""

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def all_gather_heads(self, tensor: Tensor) -> Tensor:
        return tensor

    def merge_replica_scores(self, scores: Tensor, reduce: str) -> Tensor:
        return scores


LOCAL = LocalComm()


@dataclass
class PolicyInputs:
    """What the engine hands a policy for a batch of R requests whose prompts just finished.

    Attributes:
        scores: ``[R, L, H_r, N]`` float32 psi of this rank's heads (window or accumulated attention, per the
            policy's ``score_source``), zero past each prompt; ``None`` for policies that need no scores.
        visual: ``[R, N]`` bool, True at visual (image or video) positions.
        prompt_len: ``[R]`` int64 n per request (N >= max n).
        nominal_budget: ``[R]`` int64 B per request before the floor (``PolicyConfig.budget.tokens_for(n)``,
            or a per-request override).
        num_layers: L.
        total_heads: H, the KV heads of the model (all ranks).
        head_offset: global index of this rank's first head; this rank holds ``H_r = scores.shape[2]`` heads
            (``local_heads`` when ``scores`` is None).
        local_heads: H_r.
    """

    visual: Tensor
    prompt_len: Tensor
    nominal_budget: Tensor
    num_layers: int
    total_heads: int
    scores: Tensor | None = None
    head_offset: int = 0
    local_heads: int | None = None

    def __post_init__(self) -> None:
        if self.local_heads is None:
            self.local_heads = self.total_heads if self.scores is None else self.scores.shape[2]

    @classmethod
    def for_request(cls, scores: Tensor, visual: Tensor, cfg: PolicyConfig) -> PolicyInputs:
        """One request holding every head: scores ``[L, H, n]``, visual ``[n]``, the budget from ``cfg``."""
        layers, heads, n = scores.shape
        return cls(
            visual=visual[None],
            prompt_len=torch.tensor([n], device=visual.device),
            nominal_budget=torch.tensor([cfg.budget.tokens_for(n)], device=visual.device),
            num_layers=layers,
            total_heads=heads,
            scores=scores[None],
        )

    @property
    def heads_here(self) -> int:
        assert self.local_heads is not None
        return self.local_heads

    @property
    def device(self) -> torch.device:
        return self.visual.device


@dataclass
class Selection:
    """A policy's decision for a batch.

    Attributes:
        keep: ``[R, L, H_r, N]`` bool, kept positions of this rank's heads.
        head_counts: ``[R, L, H_r]`` int64 kept per local head.
        all_head_counts: ``[R, L, H]`` int64 kept per head for *every* rank's heads (what the slot count
            needs; derived locally for uniform splits, gathered otherwise).
        layer_totals: ``[R, L]`` int64 cells per layer over all heads.
        budget: ``[R]`` int64 effective B (floor applied, at most n).
        raised: ``[R]`` bool, the nominal budget was below the per-head floor and was raised to it.
        kept_visual: ``[R, L, H_r]`` int64 kept visual positions per local head (window included).
    """

    keep: Tensor
    head_counts: Tensor
    all_head_counts: Tensor
    layer_totals: Tensor
    budget: Tensor
    raised: Tensor
    kept_visual: Tensor


class Policy(Protocol):
    """The interface of every policy in the registry."""

    name: str
    score_source: ScoreSource

    def select(self, inputs: PolicyInputs, cfg: PolicyConfig, comm: Comm = LOCAL) -> Selection: ...


@dataclass
class BudgetState:
    """Per-request quantities every budgeted policy derives first (all ``[R]`` int64 unless noted)."""

    prompt_len: Tensor
    budget: Tensor  # effective B: max(nominal, floor), at most n
    raised: Tensor  # bool
    floor: Tensor  # min(config floor, n)
    window: Tensor  # min(W, n)
    valid: Tensor  # [R, N] bool
    in_window: Tensor  # [R, N] bool
    visual_rest: Tensor  # [R, N] bool: visual, outside the window
    text_rest: Tensor  # [R, N] bool: text, outside the window

    @property
    def rest(self) -> Tensor:
        return self.visual_rest | self.text_rest


def budget_state(inputs: PolicyInputs, cfg: PolicyConfig) -> BudgetState:
    n = inputs.prompt_len.long()
    width = inputs.visual.shape[-1]
    floor = torch.clamp(torch.full_like(n, cfg.floor), max=n)
    nominal = inputs.nominal_budget.long()
    budget = torch.minimum(torch.maximum(nominal, floor), n)
    window = torch.clamp(torch.full_like(n, cfg.window), max=n)
    pos = torch.arange(width, device=inputs.device)[None, :]
    valid = pos < n[:, None]
    in_window = valid & (pos >= (n - window)[:, None])
    rest = valid & ~in_window
    return BudgetState(
        prompt_len=n,
        budget=budget,
        raised=nominal < floor,
        floor=floor,
        window=window,
        valid=valid,
        in_window=in_window,
        visual_rest=rest & inputs.visual,
        text_rest=rest & ~inputs.visual,
    )


def ranking_scores(scores: Tensor, state: BudgetState, visual: Tensor, cfg: PolicyConfig) -> Tensor:
    """psi pooled for ranking only, never across a modality run or into the window (DESIGN §2 step 1)."""
    if cfg.pooling == "none":
        return scores
    # A segment is a maximal run of one modality; ids grow at every modality change.
    change = torch.zeros_like(visual, dtype=torch.long)
    change[:, 1:] = (visual[:, 1:] != visual[:, :-1]).long()
    run_id = change.cumsum(dim=-1) + 1
    segments = torch.where(state.in_window, _SEG_WINDOW, torch.where(state.valid, run_id, _SEG_PAD))
    return pool_within_segments(scores, segments[:, None, None, :], cfg.pool_kernel, cfg.pooling)


def head_demands(scores: Tensor, state: BudgetState, theta: float) -> Tensor:
    """HCC demands d = W + k_v + k_t of this rank's heads, ``[R, L, H_r]`` (two sorts: compute only if used)."""
    k_v = budget_math.coverage_counts(scores, state.visual_rest, theta)
    k_t = budget_math.coverage_counts(scores, state.text_rest, theta)
    return state.window[:, None, None] + k_v + k_t


def finish(
    inputs: PolicyInputs,
    state: BudgetState,
    rank: Tensor,
    head_budget: Tensor,
    all_head_counts: Tensor,
    layer_totals: Tensor,
    quotas: list[tuple[Tensor, Tensor]],
) -> Selection:
    """Select the window plus each group's quota and package the decision. B >= n is the identity, whatever
    the layer allotment said (the ``paper`` recurrence keeps only the demand otherwise)."""
    keep = select_top(rank, state.in_window, quotas)
    identity = (state.budget >= state.prompt_len)[:, None, None]
    full = state.prompt_len[:, None, None]
    keep = torch.where(identity[..., None], state.valid[:, None, None, :], keep)
    head_budget = torch.where(identity, full.expand_as(head_budget), head_budget)
    all_head_counts = torch.where(identity, full.expand_as(all_head_counts), all_head_counts)
    layer_totals = all_head_counts.sum(dim=-1)
    return Selection(
        keep=keep,
        head_counts=head_budget,
        all_head_counts=all_head_counts,
        layer_totals=layer_totals,
        budget=state.budget,
        raised=state.raised,
        kept_visual=(keep & inputs.visual[:, None, None, :]).sum(dim=-1),
    )


def uniform_heads(inputs: PolicyInputs, layer_totals: Tensor) -> tuple[Tensor, Tensor]:
    """(local head budgets, all heads' budgets) under the uniform split."""
    everyone = budget_math.split_heads_uniform(layer_totals, inputs.total_heads, 0, inputs.total_heads)
    local = everyone[..., inputs.head_offset : inputs.head_offset + inputs.heads_here]
    return local, everyone


def non_window_quota(head_budget: Tensor, state: BudgetState) -> list[tuple[Tensor, Tensor]]:
    """One group: the top (b_h - W) of all non-window tokens (no modality split)."""
    return [(state.rest, head_budget - state.window[:, None, None])]
