"""Budget arithmetic of docs/design.md §2 steps 3-7: modality masses, demands, layer allotment (HCC), head split,
modality split. All counts are int64 tensors and every decision is exact integer arithmetic, so TP ranks fed the same
integers agree bit for bit and no step needs a host sync.

Shapes: R requests, L layers, H heads (global), H_r heads on this rank, N padded prompt length.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import Tensor


def modality_masses(scores: Tensor, members: Tensor) -> Tensor:
    """w(h) = sum of psi over the member positions (MPA step 2), in float64.

    Args:
        scores: ``[R, L, H, N]`` psi; members: ``[R, N]`` bool (e.g. unprotected visual positions).
    Returns:
        ``[R, L, H]`` float64.
    """
    return (scores.double() * members[:, None, None, :]).sum(dim=-1)


def coverage_counts(scores: Tensor, members: Tensor, theta: float) -> Tensor:
    """k = the fewest member tokens whose psi covers theta of the members' mass (the HCC demand, step 3).

    The mass is the sum of the same sorted float64 values the prefix sums come from, so theta = 1 never asks for
    more tokens than the members hold. Zero mass needs zero tokens.

    Returns:
        ``[R, L, H]`` int64 in ``[0, members.sum(-1)]``.
    """
    masked = torch.where(members[:, None, None, :], scores.double(), torch.zeros((), dtype=torch.float64))
    ordered = masked.sort(dim=-1, descending=True).values
    prefix = ordered.cumsum(dim=-1)
    mass = prefix[..., -1:]
    needed = (prefix < theta * mass).sum(dim=-1) + 1
    available = members.sum(dim=-1)[:, None, None]
    return torch.where(mass[..., 0] > 0, torch.minimum(needed, available), torch.zeros_like(needed))


def bounded_proportional_fill(weights: Tensor, lo: Tensor, hi: Tensor, total: Tensor) -> Tensor:
    """Integers x_k in [lo_k, hi_k] with sum ``total``, proportional to ``weights`` where the bounds allow.

    The real-valued water-fill x*_k = clamp(s * w_k, lo_k, hi_k) with sum(x*) = total is unique; its floor is
    completed by the largest remainders (ties: lower index). All of it is exact: whether item k sits at a bound at
    the solution is decided by the sign of g(s) = sum_j clamp(s w_j, lo_j, hi_j) - total at the item's own
    breakpoints s = lo_k / w_k and hi_k / w_k, evaluated in integers after multiplying through by w_k.

    Args:
        weights: ``[..., K]`` int64 >= 0 (an item of weight 0 stays at its lower bound).
        lo, hi: ``[..., K]`` int64 with lo <= hi.
        total: ``[...]`` int64 with sum(lo) <= total <= sum(hi).
    Returns:
        ``[..., K]`` int64.
    """
    w = weights.long()
    lo, hi, total = lo.long().expand_as(w), hi.long().expand_as(w), total.long()

    def g_at(p: Tensor, q: Tensor) -> Tensor:
        # g(p_c / q_c) * q_c for every candidate c: [..., C]; items along the last axis.
        scaled = p[..., :, None] * w[..., None, :]
        clamped = torch.minimum(
            torch.maximum(scaled, q[..., :, None] * lo[..., None, :]), q[..., :, None] * hi[..., None, :]
        )
        return clamped.sum(dim=-1) - q * total[..., None]

    positive = w > 0
    q = torch.where(positive, w, torch.ones_like(w))
    at_lo = (g_at(lo, q) >= 0) | ~positive
    at_hi = (g_at(hi, q) <= 0) & positive & ~at_lo
    free = ~(at_lo | at_hi)
    fixed = torch.where(at_lo, lo, torch.where(at_hi, hi, torch.zeros_like(lo)))
    remaining = total - fixed.sum(dim=-1)
    free_weight = (w * free).sum(dim=-1)
    numer = w * remaining[..., None] * free
    denom = torch.where(free_weight > 0, free_weight, torch.ones_like(free_weight))[..., None]
    base = fixed + numer // denom
    frac = torch.where(free, numer % denom, torch.full_like(numer, -1))
    short = total - base.sum(dim=-1)
    order = torch.sort(frac, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    bump = (rank < short[..., None]) & (frac > 0)
    return base + bump.long()


def layer_bounds(
    prompt_len: Tensor, budget: Tensor, floor: Tensor, heads: int, cap: Fraction | None
) -> tuple[Tensor, Tensor]:
    """Per-layer cell bounds ``[H * floor, min(H * n, floor(cap * H * B))]`` for each request: ``[R]`` each
    (without a cap the upper bound is the prompt, ``H * n``)."""
    lo = heads * floor
    hi = heads * prompt_len
    if cap is not None:
        hi = torch.minimum(hi, (cap.numerator * heads * budget) // cap.denominator)
    return lo, hi


def allot_layers_global(
    demand: Tensor, prompt_len: Tensor, budget: Tensor, floor: Tensor, heads: int, cap: Fraction | None
) -> Tensor:
    """``hcc="global"``: water-fill L*H*B over layers in proportion to the layer demands D_l, within the bounds.

    Args:
        demand: ``[R, L]`` int64 D_l (summed over all heads of all ranks).
    Returns:
        ``[R, L]`` int64 T_l with sum = min(L*H*B, sum of the caps).
    """
    num_layers = demand.shape[-1]
    lo, hi = layer_bounds(prompt_len, budget, floor, heads, cap)
    total = torch.minimum(num_layers * heads * budget, num_layers * hi)
    return bounded_proportional_fill(demand, lo[:, None].expand_as(demand), hi[:, None].expand_as(demand), total)


def allot_layers_paper(
    demand: Tensor, prompt_len: Tensor, budget: Tensor, floor: Tensor, heads: int, cap: Fraction | None
) -> Tensor:
    """``hcc="paper"``: the paper's layer-by-layer recurrence, in integers (docs/design.md §2 step 5).

    T_l = clamp(D_l, H*floor, min(H*n, R - (L-l)*H*floor, floor(cap * R / (L-l+1)), floor(cap * H * B))),
    R -= T_l, with R starting at L*H*B. The last term is ours: the running cap floor(cap * H * phi_l) never binds
    the last layer (there H * phi_L = R), so without a fixed cap the savings of concentrated middle layers pile
    into the last layers and the slot count M is not bounded by cap * B. Without a cap (``None``) both cap
    terms go and only the prompt and the floors of the layers left bound T_l.
    """
    num_layers = demand.shape[-1]
    remaining = num_layers * heads * budget
    lo = heads * floor
    out = torch.empty_like(demand)
    for layer in range(num_layers):
        layers_left = num_layers - layer  # including this one
        hi = torch.minimum(heads * prompt_len, remaining - (layers_left - 1) * heads * floor)
        if cap is not None:
            hi = torch.minimum(hi, (cap.numerator * remaining) // (cap.denominator * layers_left))
            hi = torch.minimum(hi, (cap.numerator * heads * budget) // cap.denominator)
        out[:, layer] = torch.minimum(torch.maximum(demand[:, layer], lo), hi)
        remaining = remaining - out[:, layer]
    return out


def allot_layers_uniform(num_layers: int, budget: Tensor, heads: int) -> Tensor:
    """``hcc="off"``: T_l = H*B for every layer. Returns ``[R, L]``."""
    return (heads * budget)[:, None].expand(-1, num_layers).clone()


def allot_layers_pyramid(
    num_layers: int, prompt_len: Tensor, budget: Tensor, floor: Tensor, heads: int, beta: int
) -> Tensor:
    """PyramidKV: per-head budgets fall linearly from 2B - B/beta at layer 0 to B/beta at the last layer.

    Weights w_l = (L-1) + (2*beta-2)*(L-1-l) are proportional to that line and sum to L*(L-1)*beta, so the fill
    spends L*H*B exactly (bounded by the floor and the prompt, no cap: PyramidKV has none).
    """
    layer = torch.arange(num_layers, device=budget.device)
    weights = (num_layers - 1) + (2 * beta - 2) * (num_layers - 1 - layer)
    if num_layers == 1:
        weights = torch.ones_like(layer)
    weights = weights[None, :].expand(budget.shape[0], -1)
    lo = (heads * floor)[:, None].expand_as(weights)
    hi = (heads * prompt_len)[:, None].expand_as(weights)
    total = torch.minimum(num_layers * heads * budget, num_layers * heads * prompt_len)
    return bounded_proportional_fill(weights, lo, hi, total)


def split_heads_uniform(layer_totals: Tensor, heads: int, head_offset: int, local_heads: int) -> Tensor:
    """Every head gets T_l // H; the remainder goes to the lowest global head indices, so TP ranks agree without
    communication. Returns ``[R, L, H_r]`` for global heads ``head_offset .. head_offset + H_r - 1``."""
    base = layer_totals // heads
    extra = layer_totals % heads
    global_head = torch.arange(head_offset, head_offset + local_heads, device=layer_totals.device)
    return base[..., None] + (global_head < extra[..., None]).long()


def split_heads_by_demand(layer_totals: Tensor, head_demand: Tensor, prompt_len: Tensor, floor: Tensor) -> Tensor:
    """``head_split="demand"``: T_l over the heads of layer l in proportion to d_h, within [floor, n].

    Args:
        head_demand: ``[R, L, H]`` for *all* heads (all-gathered under TP).
    Returns:
        ``[R, L, H]`` int64.
    """
    lo = floor[:, None, None].expand_as(head_demand)
    hi = prompt_len[:, None, None].expand_as(head_demand)
    return bounded_proportional_fill(head_demand, lo, hi, layer_totals)


def split_modalities(
    head_budget: Tensor, protected: Tensor, mass_visual: Tensor, mass_text: Tensor, n_visual: Tensor, n_text: Tensor
) -> tuple[Tensor, Tensor]:
    """MPA step 6: split what a head's budget leaves after its protected tokens (sinks and kept window) between
    modalities in proportion to their attention mass.

    b_v = floor((b_h - P) * w_v / (w_v + w_t) + 1/2) (token counts when both masses are 0), then clamped so that
    neither modality is asked for more tokens than it has (the surplus goes to the other).

    Args:
        head_budget: ``[R, L, H_r]`` b_h; protected: ``[R]`` P; masses ``[R, L, H_r]`` float64;
        n_visual / n_text: ``[R]`` unprotected token counts of each modality.
    Returns:
        (b_v, b_t), each ``[R, L, H_r]`` int64.
    """
    rest = head_budget - protected[:, None, None]
    mass_sum = mass_visual + mass_text
    count_share = n_visual.double() / (n_visual + n_text).clamp(min=1).double()
    share = torch.where(
        mass_sum > 0, mass_visual / torch.where(mass_sum > 0, mass_sum, 1.0), count_share[:, None, None]
    )
    b_v = torch.floor(rest.double() * share + 0.5).long()
    b_v = torch.minimum(torch.maximum(b_v, rest - n_text[:, None, None]), n_visual[:, None, None].expand_as(b_v))
    return b_v, rest - b_v
