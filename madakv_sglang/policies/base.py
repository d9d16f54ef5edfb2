"""The one interface every policy implements, and the shared budget pipeline most of them are built from.

A policy maps (scores, modality mask, budget state) to kept positions, nothing else (docs/design.md §2). It runs once
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
_SEG_PAD, _SEG_PROTECTED = -1, 0


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
        budget: ``[R]`` int64 effective B (``min_keep`` applied, at most n; n when skipped).
        raised: ``[R]`` bool, the nominal budget was below ``min_keep`` and was raised to it.
        skipped: ``[R]`` int64, why a request keeps its whole prompt (``SKIP_REASONS``), 0 when compressed.
        kept_visual: ``[R, L, H_r]`` int64 kept visual positions per local head (protected ones included).
    """

    keep: Tensor
    head_counts: Tensor
    all_head_counts: Tensor
    layer_totals: Tensor
    budget: Tensor
    raised: Tensor
    skipped: Tensor
    kept_visual: Tensor


class Policy(Protocol):
    """The interface of every policy in the registry. A policy with knobs of its own also declares them as
    ``options: tuple[PolicyOption, ...]`` (read by the registry; absent means none)."""

    name: str
    score_source: ScoreSource

    def select(self, inputs: PolicyInputs, cfg: PolicyConfig, comm: Comm = LOCAL) -> Selection: ...


# Why a request is served uncompressed (``Selection.skipped``); 0 means it was compressed.
NOT_SKIPPED, SKIP_SHORT_PROMPT, SKIP_SMALL_SAVING = 0, 1, 2
SKIP_REASONS = {SKIP_SHORT_PROMPT: "short prompt", SKIP_SMALL_SAVING: "small saving"}


def raised_budget(prompt_len: Tensor, nominal_budget: Tensor, cfg: PolicyConfig) -> Tensor:
    """B before the skip rule: the nominal budget raised to ``min_keep`` (when set), at most n."""
    return torch.minimum(torch.clamp(nominal_budget.long(), min=cfg.min_keep or 1), prompt_len.long())


def skip_codes(prompt_len: Tensor, nominal_budget: Tensor, cfg: PolicyConfig) -> Tensor:
    """Which requests are served uncompressed, and why: ``[R]`` int64 codes (``SKIP_REASONS``).

    A prompt shorter than ``min_prompt`` is a short prompt; one whose budget B (after ``min_keep``, at most n)
    would reclaim fewer than ``min_reclaim * n`` slots is a small saving. Exact integer arithmetic, so every
    path (engine, HF, plan) and every TP rank decides the same.
    """
    n = prompt_len.long()
    budget = raised_budget(n, nominal_budget, cfg)
    share = cfg.min_reclaim_fraction
    small = (n - budget) * share.denominator < share.numerator * n
    short = n < cfg.min_prompt
    codes = torch.where(small, SKIP_SMALL_SAVING, NOT_SKIPPED)
    return torch.where(short, SKIP_SHORT_PROMPT, codes)


@dataclass
class BudgetState:
    """Per-request quantities every budgeted policy derives first (all ``[R]`` int64 unless noted).

    The protected tokens of a head are its sinks (the first ``sinks`` positions) and its kept window (the last
    ``window`` positions); they are kept in every head, inside the budget, and everything else (``rest``)
    competes for what the budget leaves.
    """

    prompt_len: Tensor
    budget: Tensor  # effective B: max(nominal, min_keep), at most n; n when skipped
    raised: Tensor  # bool: the nominal budget was below min_keep
    skipped: Tensor  # SKIP_* codes
    floor: Tensor  # per-head minimum: max(protected, min_keep), at most n
    window: Tensor  # kept window length (at most W)
    sinks: Tensor  # kept sink count (at most S)
    valid: Tensor  # [R, N] bool
    protected_mask: Tensor  # [R, N] bool: sinks and kept window
    visual_rest: Tensor  # [R, N] bool: visual, not protected
    text_rest: Tensor  # [R, N] bool: text, not protected

    @property
    def protected(self) -> Tensor:
        return self.window + self.sinks

    @property
    def rest(self) -> Tensor:
        return self.visual_rest | self.text_rest


def budget_state(inputs: PolicyInputs, cfg: PolicyConfig, sinks: bool = True) -> BudgetState:
    """Budget, skip rule and protected tokens of every request (README "Short prompts, sinks and the floor").

    Kept window and sinks share the budget: the window keeps min(W, max(1, floor(a * (B - S)))) positions (a =
    ``window_share``, 0.5 by default) and the sinks min(S, B - window). So once B >= S + W / a nothing changes
    (S sinks, W window, the rest by score); below it the window shrinks and, at a = 0.5, at least as many tokens
    are chosen by score as by recency: the budget is never spent on the window alone (below S + 2 tokens it
    holds the last token and what it can of the sinks). ``sinks=False`` (policies that do not score) keeps no
    sinks.
    """
    n = inputs.prompt_len.long()
    width = inputs.visual.shape[-1]
    nominal = inputs.nominal_budget.long()
    skipped = skip_codes(n, nominal, cfg)
    budget = torch.where(skipped != NOT_SKIPPED, n, raised_budget(n, nominal, cfg))
    sink_tokens = cfg.sink if sinks else 0
    share = cfg.window_share_fraction
    window = torch.clamp(
        torch.clamp((budget - sink_tokens) * share.numerator // share.denominator, min=1), max=cfg.window
    )
    window = torch.minimum(window, budget)
    sink_count = torch.clamp(budget - window, max=sink_tokens)
    floor = torch.minimum(torch.clamp(window + sink_count, min=cfg.min_keep or 0), n)
    pos = torch.arange(width, device=inputs.device)[None, :]
    valid = pos < n[:, None]
    protected = valid & ((pos >= (n - window)[:, None]) | (pos < sink_count[:, None]))
    rest = valid & ~protected
    return BudgetState(
        prompt_len=n,
        budget=budget,
        raised=nominal < (cfg.min_keep or 0),
        skipped=skipped,
        floor=floor,
        window=window,
        sinks=sink_count,
        valid=valid,
        protected_mask=protected,
        visual_rest=rest & inputs.visual,
        text_rest=rest & ~inputs.visual,
    )


def ranking_scores(scores: Tensor, state: BudgetState, visual: Tensor, cfg: PolicyConfig) -> Tensor:
    """psi pooled for ranking only, never across a modality run or into the protected tokens (docs/design.md §2
    step 8)."""
    return pooled_within_modalities(scores, visual, state.protected_mask, state.valid, cfg)


def pooled_within_modalities(
    scores: Tensor, visual: Tensor, protected: Tensor, valid: Tensor, cfg: PolicyConfig
) -> Tensor:
    """``[R, L, H, N]`` scores pooled by ``cfg.pooling`` within runs of one modality, never into the ``[R, N]``
    protected positions or past the valid ones."""
    if cfg.pooling == "none":
        return scores
    # A segment is a maximal run of one modality; ids grow at every modality change.
    change = torch.zeros_like(visual, dtype=torch.long)
    change[:, 1:] = (visual[:, 1:] != visual[:, :-1]).long()
    run_id = change.cumsum(dim=-1) + 1
    segments = torch.where(protected, _SEG_PROTECTED, torch.where(valid, run_id, _SEG_PAD))
    return pool_within_segments(scores, segments[:, None, None, :], cfg.pool_kernel, cfg.pooling)


def head_demands(scores: Tensor, state: BudgetState, theta: float) -> Tensor:
    """HCC demands d = P + k_v + k_t of this rank's heads (P: sinks and kept window), ``[R, L, H_r]`` (two sorts:
    compute only if used)."""
    k_v = budget_math.coverage_counts(scores, state.visual_rest, theta)
    k_t = budget_math.coverage_counts(scores, state.text_rest, theta)
    return state.protected[:, None, None] + k_v + k_t


def finish(
    inputs: PolicyInputs,
    state: BudgetState,
    rank: Tensor,
    head_budget: Tensor,
    all_head_counts: Tensor,
    layer_totals: Tensor,
    quotas: list[tuple[Tensor, Tensor]],
) -> Selection:
    """Select the protected tokens plus each group's quota and package the decision. B >= n (a skipped request
    included) is the identity, whatever the layer allotment said (the ``paper`` recurrence keeps only the demand
    otherwise)."""
    keep = select_top(rank, state.protected_mask, quotas)
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
        skipped=state.skipped,
        kept_visual=(keep & inputs.visual[:, None, None, :]).sum(dim=-1),
    )


def uniform_heads(inputs: PolicyInputs, layer_totals: Tensor) -> tuple[Tensor, Tensor]:
    """(local head budgets, all heads' budgets) under the uniform split."""
    everyone = budget_math.split_heads_uniform(layer_totals, inputs.total_heads, 0, inputs.total_heads)
    local = everyone[..., inputs.head_offset : inputs.head_offset + inputs.heads_here]
    return local, everyone


def unprotected_quota(head_budget: Tensor, state: BudgetState) -> list[tuple[Tensor, Tensor]]:
    """One group: the top (b_h - P) of all unprotected tokens (no modality split)."""
    return [(state.rest, head_budget - state.protected[:, None, None])]
