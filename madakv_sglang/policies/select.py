"""Selection (docs/design.md §2 step 8): keep the protected tokens (sinks, kept window) plus the top-scored tokens of
each group up to its quota."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def select_top(rank_scores: Tensor, always: Tensor, groups: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """Keep ``always`` plus, for every (members, quota) group, its ``quota`` best members.

    Ranking is by score, descending; equal scores prefer the later position (the documented tie rule). One
    stable sort serves all groups: members of a group are ranked by their order of appearance in it.

    Args:
        rank_scores: ``[R, L, H, N]`` scores used for ranking (pooled or not; any real dtype).
        always: ``[R, N]`` bool, positions kept unconditionally (sinks and kept window).
        groups: pairs of ``[R, N]`` (or ``[R, L, H, N]``) bool member masks, disjoint from each other and from
            ``always``, and ``[R, L, H]`` int64 quotas (at most the member count).
    Returns:
        ``[R, L, H, N]`` bool keep mask.
    """
    n = rank_scores.shape[-1]
    # Flipping makes the stable sort list later positions first among equal scores.
    order = torch.sort(rank_scores.flip(-1), dim=-1, descending=True, stable=True).indices
    positions = (n - 1) - order
    keep = always[:, None, None, :].expand_as(rank_scores).clone()
    for members, quota in groups:
        if members.dim() == 2:
            members = members[:, None, None, :]
        in_group = members.expand_as(rank_scores).gather(-1, positions)
        rank = in_group.long().cumsum(dim=-1) - 1
        chosen = in_group & (rank < quota[..., None])
        keep.scatter_(-1, positions, chosen | keep.gather(-1, positions))
    return keep
