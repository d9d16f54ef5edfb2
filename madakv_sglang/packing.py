"""Decide and pack, once per batch, for the requests whose prompt just finished (docs/design.md §2, §4).

Engine-free; the backend calls it. It takes the scores the backend gathered, the request rows' slots and the
pool's K/V buffers (:class:`PoolView`), runs the policy (grouped by configuration, since requests may override
it), lays the kept cells out in each request's first M slots (``layout``: per layer, or shared across layers)
points each packed row at its M slots (positions ``[M, n)`` at the padding slot 0) and returns what the scheduler
must free; it frees nothing itself: ``PackedRow.pending_free`` says which slots to give back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from madakv_sglang.config import PolicyConfig
from madakv_sglang.kernels.dispatch import layer_packer
from madakv_sglang.kernels.pack import PackMoves, layer_stack_view, pack_moves, pack_shared_cells
from madakv_sglang.layout import PackPlan, pack_plan, packing_waste, slot_count
from madakv_sglang.policies import get_policy
from madakv_sglang.policies.base import LOCAL, NOT_SKIPPED, Comm, PolicyInputs, skip_codes

POISON_ENV = "MADAKV_DEBUG_POISON"


def poison_enabled() -> bool:
    """Debug mode: evicted and freed cells are overwritten with NaN so any read of them shows in the output."""
    return os.environ.get(POISON_ENV, "0") not in ("", "0", "false", "off")


@dataclass
class PackedRow:
    """A request whose prompt was compressed: where its kept cells are and what it gave back.

    Attributes:
        prompt_len: n, positions ``[0, n)`` were compressed; decode tokens from n on are dense.
        slots: M, the slots ``req_to_token[row, :M]`` that hold the packed cells.
        cells: per layer ``[C_l]`` cell ids ordered by head (``madakv_sglang.layout``: ``slot * H_r + column`` of the
            layer's buffer under ``per-layer``, ids into the all-layer allocation under ``shared``).
        indptr: ``[L, H_r + 1]`` head h of layer l owns ``cells[l][indptr[l, h]:indptr[l, h + 1]]``.
        pending_free: slots ``req_to_token[row, M:n]`` held until the scheduler returns them
            (``None`` once freed); the row already points them at the padding slot 0.
        evicted: slots the prompt gave back once packed (chunk eviction's cuts included), for the report.
        waste_cells: empty cells inside the M slots over all layers.
        compress_seconds: wall time of policy + pack for the batch this row was part of.
    """

    prompt_len: int
    slots: int
    cells: list[Tensor]
    indptr: Tensor
    pending_free: Tensor | None
    waste_cells: int
    compress_seconds: float
    evicted: int = 0


@dataclass
class Replay:
    """A decision kept for re-prefill after a retraction: ``keep [L, H_r, n0]`` over the original prompt and
    every rank's head counts ``[L, H]`` (what the slot count needs)."""

    keep: Tensor
    all_head_counts: Tensor
    cut_at: Tensor | None = None  # [n0] int32: where chunk eviction dropped each position (chunk_eviction.NEVER)


@dataclass
class Finishing:
    """One request whose prompt (or re-prefill) ends in this batch.

    Attributes:
        row: its ``req_to_token`` row.
        prompt_len: n; positions ``[0, n)`` are the compressed range.
        visual: ``[T]`` bool over the decided positions.
        config: its policy settings.
        scores: ``[L, H_r, T]`` float32 window scores (filled layer by layer), ``None`` when not needed.
        positions: ``[T]`` the positions the policy decides over, in order: those that chunk eviction left
            (``madakv_sglang.chunk_eviction``); ``None`` means all n (T = n). The budget is always n's.
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
    positions: Tensor | None = None

    @property
    def decided_len(self) -> int:
        """T, the length of the prompt the policy sees."""
        return self.prompt_len if self.positions is None else int(self.positions.numel())


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
        elif request.positions is not None:
            # The skip rule was applied to the whole prompt before its first cut; the survivors are decided.
            groups.setdefault(request.config.replace(min_prompt=0, min_reclaim=0.0), []).append(index)
        else:
            groups.setdefault(request.config, []).append(index)
    for config, members in groups.items():
        policy = get_policy(config.policy)
        chosen = [requests[i] for i in members]
        width = max(r.decided_len for r in chosen)
        device = chosen[0].visual.device
        visual = torch.zeros(len(chosen), width, dtype=torch.bool, device=device)
        scores = None
        if policy.score_source != "none":
            scores = torch.zeros(len(chosen), geometry.num_layers, geometry.local_heads, width, device=device)
        for slot, request in enumerate(chosen):
            visual[slot, : request.decided_len] = request.visual
            if scores is not None:
                assert request.scores is not None, "window scores missing for a policy that ranks by them"
                scores[slot, :, :, : request.decided_len] = request.scores
        if scores is not None and geometry.replicas > 1:
            scores = comm.merge_replica_scores(scores, config.gqa)
        padding = geometry.padding_columns()
        if scores is not None and padding is not None:
            # A padding head's values are zero whatever it keeps: no attention mass, so it asks only for its window.
            scores[:, :, padding] = 0
        if scores is not None and (geometry.replicas > 1 or padding is not None):
            for slot, request in enumerate(chosen):
                request.scores = scores[slot, :, :, : request.decided_len]
        inputs = PolicyInputs(
            visual=visual,
            prompt_len=torch.tensor([r.decided_len for r in chosen], device=device),
            nominal_budget=torch.tensor([config.budget.tokens_for(r.prompt_len) for r in chosen], device=device),
            num_layers=geometry.num_layers,
            total_heads=geometry.total_heads,
            scores=scores,
            head_offset=geometry.head_offset,
            local_heads=geometry.local_heads,
        )
        selection = policy.select(inputs, config, comm)
        for slot, index in enumerate(members):
            request = requests[index]
            keep = selection.keep[slot, :, :, : request.decided_len]
            if request.positions is not None:
                logical = keep.new_zeros(*keep.shape[:2], request.prompt_len)
                logical[:, :, request.positions] = keep
                keep = logical
            decisions[index] = Decision(keep, selection.all_head_counts[slot])
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


@dataclass(frozen=True)
class PoolView:
    """The pool's K/V buffers as the packer and the decode see them.

    Attributes:
        k_layers / v_layers: SGLang's per-layer buffers ``[rows, H_r, D]``.
        layout: ``shared`` (the layers are views of one allocation, cell ids address all of it) or ``per-layer``.
        k_cells / v_cells: ``shared`` only, the all-layer views ``[L * rows * H_r, D]``.
        pack_layers: ``per-layer`` only, applies ``PackMoves`` to the layer buffers with the chosen layout kernel
            (``kernels.dispatch.layer_packer``). In ``shared`` one gather and one scatter over ``k_cells`` and
            ``v_cells`` already move every layer's cells, in torch on any device.
    """

    k_layers: list[Tensor]
    v_layers: list[Tensor]
    layout: str
    k_cells: Tensor | None = None
    v_cells: Tensor | None = None
    pack_layers: Callable[[PackMoves], None] | None = None

    @classmethod
    def of(cls, k_layers: list[Tensor], v_layers: list[Tensor], layout: str, kernel: str = "torch") -> PoolView:
        """Check that a ``shared`` pool really is one allocation per K and V (``pool.create_shared_buffers``).
        ``kernel`` is the layout kernel (``kernels.dispatch.layout_kernel_for``)."""
        if layout == "per-layer":
            return cls(k_layers, v_layers, layout, pack_layers=layer_packer(kernel, k_layers, v_layers))
        k_stack, v_stack = layer_stack_view(k_layers), layer_stack_view(v_layers)
        if k_stack is None or v_stack is None:
            raise ValueError(
                "madakv: --kv-layout shared needs the KV pool's layers to be views of one allocation, but this "
                "pool's are not (a KV pool class other than SGLang's MHATokenToKVPool?); serve it with "
                "--kv-layout per-layer"
            )
        return cls(k_layers, v_layers, layout, k_stack.view(-1, k_stack.shape[-1]), v_stack.view(-1, v_stack.shape[-1]))

    @property
    def rows(self) -> int:
        return int(self.k_layers[0].shape[0])

    @property
    def heads(self) -> int:
        return int(self.k_layers[0].shape[1])

    @property
    def layer_cells(self) -> int:
        """The distance between two layers' cell ids (0: every layer numbers its own cells)."""
        return self.rows * self.heads if self.layout == "shared" else 0


def packed_slots(decision: Decision, tp_size: int, layout: str) -> int:
    """M, the slots a request holds once its decision is packed under ``layout`` (the same on every TP rank)."""
    return int(slot_count(decision.all_head_counts[None], tp_size, layout=layout)[0])


def pack_batch(
    requests: list[Finishing],
    decisions: list[Decision],
    rows_map: Tensor,
    pool: PoolView,
    tp_size: int,
    targets: list[Tensor] | None = None,
) -> list[PackedRow | None]:
    """Move the kept cells of every request into its first M slots, all requests of the batch in one gather and
    one scatter (per layer for ``per-layer``). ``rows_map`` is ``req_to_token``. A request whose heads keep every
    position gets ``None`` (nothing to pack or free).

    ``targets`` (one per request, M slots each) packs into those slots instead of the row's own first M: slots
    the caller allocated, or a part of the row it owns (``engine.radix``, where the row's prompt slots stay the
    prefix tree's). Then the caller frees what the row no longer needs: ``pending_free`` is ``None``."""
    start = time.perf_counter()
    plans: list[tuple[int, int, Tensor, PackPlan] | None] = []
    for index, (request, decision) in enumerate(zip(requests, decisions, strict=True)):
        if bool(decision.keep.all()):
            plans.append(None)
            continue
        n = request.prompt_len
        row_slots = rows_map[request.row, :n].long()
        slots = packed_slots(decision, tp_size, pool.layout)
        if targets is None:
            # The slots the row still owns, in order: all n, or fewer once chunk eviction has cut the prompt (a cut
            # position points at the padding slot 0, which SGLang never allocates).
            owned = row_slots[row_slots != 0]
        else:
            owned = targets[index].long()
            assert owned.numel() == slots, f"{owned.numel()} target slots for a decision that packs into {slots}"
        rows = pool.rows if pool.layout == "shared" else None
        plans.append((request.row, slots, owned, pack_plan(decision.keep, row_slots, owned[:slots], rows=rows)))
    chosen = [p for p in plans if p is not None]
    if not chosen:
        return [None] * len(plans)
    if pool.layout == "shared":
        assert pool.k_cells is not None and pool.v_cells is not None
        src = torch.cat([c for *_, plan in chosen for c in plan.src])
        dst = torch.cat([c for *_, plan in chosen for c in plan.dst])
        pack_shared_cells(pool.k_cells, pool.v_cells, src, dst)
    else:
        layers = len(pool.k_layers)
        src_layers = [torch.cat([plan.src[layer] for *_, plan in chosen]) for layer in range(layers)]
        dst_layers = [torch.cat([plan.dst[layer] for *_, plan in chosen]) for layer in range(layers)]
        assert pool.pack_layers is not None
        pool.pack_layers(pack_moves(src_layers, dst_layers))
    if poison_enabled():
        for _, slots, owned, plan in chosen:
            _poison_unused(pool, owned[:slots], plan)
    seconds = (time.perf_counter() - start) / len(chosen)
    out: list[PackedRow | None] = []
    for request, decision, planned in zip(requests, decisions, plans, strict=True):
        if planned is None:
            out.append(None)
            continue
        row, slots, owned, plan = planned
        n = request.prompt_len
        waste = int(packing_waste(decision.all_head_counts[None], torch.tensor([slots]))[0])
        pending = owned[slots:].to(rows_map.dtype) if targets is None else None
        rows_map[row, :slots] = owned[:slots].to(rows_map.dtype)
        rows_map[row, slots:n] = 0  # evicted positions -> the padding slot
        out.append(
            PackedRow(
                prompt_len=n,
                slots=slots,
                cells=plan.dst,
                indptr=plan.indptr,
                pending_free=pending,
                waste_cells=waste,
                compress_seconds=seconds,
            )
        )
    return out


def _poison_unused(pool: PoolView, target_slots: Tensor, plan: PackPlan) -> None:
    """NaN into the cells of the M slots that hold no kept entry (packing waste), so a stray read shows."""
    heads = pool.heads
    every = (target_slots[:, None] * heads + torch.arange(heads, device=target_slots.device)).reshape(-1)
    if pool.layout == "shared":
        assert pool.k_cells is not None and pool.v_cells is not None
        layers = torch.arange(len(pool.k_layers), device=every.device)[:, None] * pool.layer_cells
        every = (layers + every[None, :]).reshape(-1)
        targets = [(pool.k_cells, pool.v_cells, every, torch.cat(plan.dst))]
    else:
        targets = [
            (k.view(-1, k.shape[-1]), v.view(-1, v.shape[-1]), every, used)
            for k, v, used in zip(pool.k_layers, pool.v_layers, plan.dst, strict=True)
        ]
    for k_cells, v_cells, cells, used in targets:
        empty = cells[~torch.isin(cells, used)]
        k_cells[empty] = float("nan")
        v_cells[empty] = float("nan")
