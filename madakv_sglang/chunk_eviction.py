"""Eviction between prefill chunks (``--kv-prefill-evict chunk``, docs/design.md §5).

Engine-free. Without it a prompt holds all n of its slots until its last chunk has run, so for long prompts the
transient, not the kept size, sets the memory. With it, after every chunk but the last, the prompt seen so far is
*cut*: positions are dropped from every layer and every head at once, because only a position dropped everywhere
frees its slot before the prompt is packed. The survivors, in prompt order, are a shorter prompt over which the
policy makes its normal decision when the last chunk has run, with the prompt's real observation window.

A cut at the end e of a chunk:

- scores every surviving position by the attention the chunk's last W queries pay it (the policy's window scores),
  summed over layers and KV heads, and over the TP ranks;
- protects the first S survivors (the sinks) and the chunk's last W positions, so the final window is whole
  whatever the length of the last chunk;
- keeps ``ceil(keep · B)`` survivors, B the final budget of the whole prompt, at least the protected ones;
- chooses the rest by score, pooled as the policy pools, after splitting them between the modalities in proportion
  to their attention mass as MPA splits a head's budget (``split="modality"``) or in one ranking (``"none"``);
  equal scores prefer the later position.

A position's fate is one number, ``cut_at``: the end of the chunk after which it was dropped (:data:`NEVER` for a
survivor). Query p sees key q iff ``q <= p < cut_at[q]``: in the chunk that dropped q every query still saw it, and
no later one does. A retraction's re-prefill reproduces the original attention from ``cut_at`` alone, however
SGLang chunks it.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from madakv_sglang.policies import budget as budget_math
from madakv_sglang.policies.base import Comm, pooled_within_modalities
from madakv_sglang.policies.select import select_top

if TYPE_CHECKING:
    from madakv_sglang.config import PolicyConfig

NEVER = 2**31 - 1  # cut_at of a position no cut dropped
SPLITS: tuple[str, ...] = ("modality", "none")


def survivor_target(final_budget: int, keep: Fraction, protected: int, alive: int) -> int:
    """How many positions a cut leaves: ``ceil(keep · B)``, at least the ``protected`` ones, at most the ``alive``
    ones (exact: ``keep`` is a fraction)."""
    return min(alive, max(protected, math.ceil(keep * final_budget)))


def protected_positions(alive: int, sinks: int, tail: int, device: torch.device | None = None) -> Tensor:
    """``[alive]`` bool: the first ``sinks`` and the last ``tail`` of the surviving positions."""
    index = torch.arange(alive, device=device)
    return (index < sinks) | (index >= alive - tail)


def position_scores(
    scores: Tensor, comm: Comm, replicas: int = 1, padding: slice | None = None, gqa: str = "mean"
) -> Tensor:
    """``[L, H_r, T]`` window scores of this rank's heads -> ``[T]`` summed over layers and every rank's heads.

    A KV head replicated over ``replicas`` ranks sees part of its query group on each: the partial scores are
    merged first, and each replica then counts 1 / replicas of the head. Padding heads (SGLang's CPU TP pads the
    KV heads with zero weights) count nothing.
    """
    if replicas > 1:
        scores = comm.merge_replica_scores(scores[None], gqa)[0] / replicas
    if padding is not None:
        scores = scores.clone()
        scores[:, padding] = 0
    return comm.all_reduce_sum(scores.double().sum(dim=(0, 1)))


def cut(
    scores: Tensor, visual: Tensor, protected: Tensor, target: int, cfg: PolicyConfig, split: str = "modality"
) -> Tensor:
    """Which of T surviving positions survive this cut: ``[T]`` bool, ``target`` of them (the protected ones
    among them).

    Args:
        scores: ``[T]`` position scores (:func:`position_scores`).
        visual / protected: ``[T]`` bool.
        target: survivors, at least the protected count (:func:`survivor_target`).
        cfg: the request's settings (its pooling).
        split: ``modality`` or ``none``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    total = scores.shape[-1]
    n_protected = int(protected.sum())
    if target < n_protected or target > total:
        raise ValueError(f"target {target} must be in [{n_protected}, {total}]")
    rest = ~protected
    valid = torch.ones_like(protected)
    rank = pooled_within_modalities(scores.double()[None, None, None], visual[None], protected[None], valid[None], cfg)
    quota = torch.tensor([[[target - n_protected]]], device=scores.device)
    if split == "none":
        groups = [(rest[None], quota)]
    else:
        visual_rest, text_rest = rest & visual, rest & ~visual
        mass_v = budget_math.modality_masses(scores.double()[None, None, None], visual_rest[None])
        mass_t = budget_math.modality_masses(scores.double()[None, None, None], text_rest[None])
        b_v, b_t = budget_math.split_modalities(
            quota,
            torch.zeros(1, dtype=torch.long, device=scores.device),
            mass_v,
            mass_t,
            visual_rest.sum()[None],
            text_rest.sum()[None],
        )
        groups = [(visual_rest[None], b_v), (text_rest[None], b_t)]
    return select_top(rank, protected[None], groups)[0, 0, 0]


def visible(query_pos: Tensor, key_pos: Tensor, cut_at: Tensor) -> Tensor:
    """``[Tq, Tk]`` bool: query at ``query_pos[i]`` sees key at ``key_pos[j]`` (causal, and not yet cut)."""
    return (key_pos[None, :] <= query_pos[:, None]) & (query_pos[:, None] < cut_at[None, :].long())


def attend(queries: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Attention of ``[Tq, Hq, D]`` queries over ``[Tk, H, D]`` keys and ``[Tk, H, Dv]`` values under a ``[Tq, Tk]``
    or per-KV-head ``[H, Tq, Tk]`` bool mask (query head j reads KV head j // G), in float32 -> ``[Tq, Hq, Dv]``.
    Every query must see at least one key (its own position)."""
    tq, hq, dim = queries.shape
    heads = keys.shape[1]
    grouped = queries.float().view(tq, heads, hq // heads, dim)
    logits = torch.einsum("thgd,shd->hgts", grouped, keys.float()) * scale
    per_head = mask if mask.dim() == 3 else mask[None]
    logits = logits.masked_fill(~per_head[:, None], float("-inf"))
    out = torch.einsum("hgts,shd->thgd", torch.softmax(logits, dim=-1), values.float())
    return out.reshape(tq, hq, values.shape[-1])


__all__ = [
    "NEVER",
    "SPLITS",
    "attend",
    "cut",
    "position_scores",
    "protected_positions",
    "survivor_target",
    "visible",
]
