"""Decide and pack, once per batch, for the requests whose prompt just finished (DESIGN §2-§3).

Engine-free: it takes the scores the backend gathered, the request rows' slots and the pool's per-layer K/V
buffers, runs the policy (grouped by configuration, since requests may override it), lays the kept cells out
in each request's first M slots and returns what the scheduler must free. The caller zeroes nothing and frees
nothing; ``PackedRow.pending_free`` says which slots to give back.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from madakv_sglang.config import PolicyConfig
from madakv_sglang.kernels.pack import pack_cells, pack_moves
from madakv_sglang.layout import pack_plan, packing_waste, slot_count
from madakv_sglang.policies import get_policy
from madakv_sglang.policies.base import LOCAL, NOT_SKIPPED, Comm, PolicyInputs, skip_codes
from madakv_sglang.sglang.ledger import PackedRow, Replay

POISON_ENV = "MADAKV_DEBUG_POISON"


def poison_enabled() -> bool:
    """Debug mode: evicted and freed cells are overwritten with NaN so any read of them shows in the output."""
    return os.environ.get(POISON_ENV, "0") not in ("", "0", "false", "off")


@dataclass
class Finishing:
    """One request whose prompt (or re-prefill) ends in this batch.

    Attributes:
        row: its ``req_to_token`` row.
        prompt_len: n; positions ``[0, n)`` are the compressed range.
        visual: ``[n]`` bool.
        config: its policy settings.
        scores: ``[L, H_r, n]`` float32 window scores (filled layer by layer), ``None`` when not needed.
        replay: a stored decision to apply instead of running the policy.
        skipped: why the prompt is kept whole without running the policy (``policies.base.SKIP_REASONS``), 0 when
            it is compressed.
    """

    row: int
    prompt_len: int
    visual: Tensor
    config: PolicyConfig
    scores: Tensor | None = None
    replay: Replay | None = None
    skipped: int = NOT_SKIPPED


@dataclass
class Decision:
    keep: Tensor  # [L, H_r, n] bool
    all_head_counts: Tensor  # [L, H] int64


@dataclass(frozen=True)
class Geometry:
    """The model as this rank sees it (``replicas`` ranks share each KV head when heads < TP size)."""

    num_layers: int
    total_heads: int
    local_heads: int
    head_offset: int
    tp_size: int
    replicas: int = 1
    tp_rank: int = 0
    real_heads: int | None = None  # heads from this index on are zero padding (SGLang's CPU TP pads KV heads)

    def padding_columns(self) -> slice | None:
        """This rank's local head columns that are padding, or ``None``."""
        if self.real_heads is None or self.head_offset + self.local_heads <= self.real_heads:
            return None
        return slice(max(0, self.real_heads - self.head_offset), self.local_heads)


def decide(requests: list[Finishing], geometry: Geometry, comm: Comm = LOCAL) -> list[Decision]:
    """The policy's kept sets, batched per configuration (every rank runs the same groups in the same order,
    so the collectives inside the policies line up). Replicated heads merge their partial scores first; the
    merged scores replace ``Finishing.scores``, so a dump shows what the policy saw."""
    decisions: list[Decision | None] = [None] * len(requests)
    groups: dict[PolicyConfig, list[int]] = {}
    for index, request in enumerate(requests):
        if request.replay is not None:
            decisions[index] = _replayed(request, request.replay)
        elif request.skipped != NOT_SKIPPED:
            decisions[index] = _whole(request, geometry)
        else:
            groups.setdefault(request.config, []).append(index)
    for config, members in groups.items():
        policy = get_policy(config.policy)
        chosen = [requests[i] for i in members]
        width = max(r.prompt_len for r in chosen)
        device = chosen[0].visual.device
        visual = torch.zeros(len(chosen), width, dtype=torch.bool, device=device)
        scores = None
        if policy.score_source != "none":
            scores = torch.zeros(len(chosen), geometry.num_layers, geometry.local_heads, width, device=device)
        for slot, request in enumerate(chosen):
            visual[slot, : request.prompt_len] = request.visual
            if scores is not None:
                assert request.scores is not None, "window scores missing for a policy that ranks by them"
                scores[slot, :, :, : request.prompt_len] = request.scores
        if scores is not None and geometry.replicas > 1:
            scores = comm.merge_replica_scores(scores, config.gqa)
        padding = geometry.padding_columns()
        if scores is not None and padding is not None:
            # A padding head's values are zero whatever it keeps: no attention mass, so it asks only for its window.
            scores[:, :, padding] = 0
        if scores is not None and (geometry.replicas > 1 or padding is not None):
            for slot, request in enumerate(chosen):
                request.scores = scores[slot, :, :, : request.prompt_len]
        inputs = PolicyInputs(
            visual=visual,
            prompt_len=torch.tensor([r.prompt_len for r in chosen], device=device),
            nominal_budget=torch.tensor([config.budget.tokens_for(r.prompt_len) for r in chosen], device=device),
            num_layers=geometry.num_layers,
            total_heads=geometry.total_heads,
            scores=scores,
            head_offset=geometry.head_offset,
            local_heads=geometry.local_heads,
        )
        selection = policy.select(inputs, config, comm)
        for slot, index in enumerate(members):
            n = requests[index].prompt_len
            decisions[index] = Decision(selection.keep[slot, :, :, :n], selection.all_head_counts[slot])
    return [d for d in decisions if d is not None]


def skip_code(prompt_len: int, config: PolicyConfig) -> int:
    """Why a prompt of ``prompt_len`` tokens is not compressed under ``config`` (0: it is), decided before any
    score is computed; the policies apply the same rule (``policies.base.skip_codes``)."""
    nominal = config.budget.tokens_for(prompt_len)
    return int(skip_codes(torch.tensor([prompt_len]), torch.tensor([nominal]), config)[0])


def _whole(request: Finishing, geometry: Geometry) -> Decision:
    """A skipped prompt keeps every position in every head (and a retraction replays exactly that)."""
    n = request.prompt_len
    keep = torch.ones(geometry.num_layers, geometry.local_heads, n, dtype=torch.bool, device=request.visual.device)
    counts = torch.full((geometry.num_layers, geometry.total_heads), n, dtype=torch.long, device=keep.device)
    return Decision(keep, counts)


def _replayed(request: Finishing, replay: Replay) -> Decision:
    """Re-prefill after a retraction: the old prompt decision plus every token generated before it."""
    layers, heads, n0 = replay.keep.shape
    keep = torch.ones(layers, heads, request.prompt_len, dtype=torch.bool, device=replay.keep.device)
    keep[:, :, :n0] = replay.keep
    return Decision(keep, replay.all_head_counts + (request.prompt_len - n0))


def pack(
    request: Finishing,
    decision: Decision,
    row_slots: Tensor,
    k_layers: list[Tensor],
    v_layers: list[Tensor],
    tp_size: int,
) -> PackedRow | None:
    """Move the kept cells into the request's first M slots. ``row_slots`` is ``req_to_token[row, :n]``;
    ``k_layers``/``v_layers`` are the pool's per-layer buffers ``[slots, H_r, D]``. Returns ``None`` when every
    head keeps every position (nothing to pack or free)."""
    start = time.perf_counter()
    n = request.prompt_len
    if bool(decision.keep.all()):
        return None
    heads = decision.keep.shape[1]
    slots = int(slot_count(decision.all_head_counts[None], tp_size)[0])
    plan = pack_plan(decision.keep, row_slots[:n].long(), row_slots[:slots].long())
    pack_cells(k_layers, v_layers, pack_moves(plan.src, plan.dst))
    if poison_enabled():
        for layer, (keys, values) in enumerate(zip(k_layers, v_layers, strict=True)):
            k_cells, v_cells = keys.view(-1, keys.shape[-1]), values.view(-1, values.shape[-1])
            _poison_unused(k_cells, v_cells, row_slots[:slots].long(), plan.dst[layer], heads)
    waste = int(packing_waste(decision.all_head_counts[None], torch.tensor([slots]))[0])
    return PackedRow(
        prompt_len=n,
        slots=slots,
        cells=plan.dst,
        indptr=plan.indptr,
        pending_free=row_slots[slots:n].clone(),
        waste_cells=waste,
        compress_seconds=time.perf_counter() - start,
    )


def _poison_unused(k_cells: Tensor, v_cells: Tensor, target_slots: Tensor, used: Tensor, heads: int) -> None:
    """NaN into the cells of the M slots that hold no kept entry (packing waste), so a stray read shows."""
    every = (target_slots[:, None] * heads + torch.arange(heads, device=target_slots.device)).reshape(-1)
    empty = every[~torch.isin(every, used)]
    k_cells[empty] = float("nan")
    v_cells[empty] = float("nan")
