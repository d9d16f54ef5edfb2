"""MadaKV (Li et al., ACL 2025, arXiv 2506.15724): modality preference adaptation + hierarchical compression
compensation, as built in docs/design.md §2."""

from __future__ import annotations

from typing import TYPE_CHECKING

from madakv_sglang.policies import budget as budget_math
from madakv_sglang.policies.base import (
    LOCAL,
    Comm,
    PolicyInputs,
    ScoreSource,
    Selection,
    budget_state,
    finish,
    head_demands,
    ranking_scores,
    uniform_heads,
    unprotected_quota,
)
from madakv_sglang.policies.registry import register_policy

if TYPE_CHECKING:
    from madakv_sglang.config import PolicyConfig


@register_policy("madakv")
class MadaKV:
    """Per head: split the budget between modalities by the window's attention mass (MPA); per layer: allot the
    model-wide budget by each layer's theta-coverage demand (HCC).

    Ablations: ``mpa=False`` ranks all unprotected tokens together; ``hcc="off"`` gives every layer H*B.
    """

    name = "madakv"
    score_source: ScoreSource = "window"

    def select(self, inputs: PolicyInputs, cfg: PolicyConfig, comm: Comm = LOCAL) -> Selection:
        assert inputs.scores is not None, "madakv needs window scores"
        state = budget_state(inputs, cfg)
        heads = inputs.total_heads
        needs_demand = cfg.hcc != "off" or cfg.head_split == "demand"
        demand = head_demands(inputs.scores, state, cfg.theta) if needs_demand else None

        if cfg.hcc == "off":
            layer_totals = budget_math.allot_layers_uniform(inputs.num_layers, state.budget, heads)
        else:
            assert demand is not None
            layer_demand = comm.all_reduce_sum(demand.sum(dim=-1))
            allot = budget_math.allot_layers_global if cfg.hcc == "global" else budget_math.allot_layers_paper
            layer_totals = allot(layer_demand, state.prompt_len, state.budget, state.floor, heads, cfg.cap_fraction)

        if cfg.head_split == "uniform":
            head_budget, everyone = uniform_heads(inputs, layer_totals)
        else:
            assert demand is not None
            all_demand = comm.all_gather_heads(demand)
            everyone = budget_math.split_heads_by_demand(layer_totals, all_demand, state.prompt_len, state.floor)
            head_budget = everyone[..., inputs.head_offset : inputs.head_offset + inputs.heads_here]

        if cfg.mpa:
            mass_v = budget_math.modality_masses(inputs.scores, state.visual_rest)
            mass_t = budget_math.modality_masses(inputs.scores, state.text_rest)
            b_v, b_t = budget_math.split_modalities(
                head_budget, state.protected, mass_v, mass_t, state.visual_rest.sum(-1), state.text_rest.sum(-1)
            )
            quotas = [(state.visual_rest, b_v), (state.text_rest, b_t)]
        else:
            quotas = unprotected_quota(head_budget, state)
        rank = ranking_scores(inputs.scores, state, inputs.visual, cfg)
        return finish(inputs, state, rank, head_budget, everyone, layer_totals, quotas)
