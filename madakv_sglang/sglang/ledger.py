"""Per-row state the backend and the scheduler hooks share (one process: the scheduler runs the model).

SGLang identifies a running request's KV by its ``req_to_token`` row. A row is re-used by later requests,
so every entry carries the row's ``req_generation`` and is dropped when SGLang frees the row
(``ReqToTokenPool.free_rows``, hooked in ``reclaim``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


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
        evicted: slots returned to the allocator so far (what the accounting hook subtracts).
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


@dataclass
class RowState:
    generation: int
    query_tail: dict[int, Tensor] = field(default_factory=dict)  # layer -> last W prompt queries so far
    packed: PackedRow | None = None
    decision: Replay | None = None  # set when the prompt was decided; the scheduler copies it to the request
    skipped: str | None = None  # why the prompt was kept whole, until the scheduler has reported it


class Ledger:
    """Row -> state, with generation checks so a recycled row never inherits a finished request's state."""

    def __init__(self) -> None:
        self._rows: dict[int, RowState] = {}
        self.reclaimed_total = 0  # slots returned over the process lifetime

    def get(self, row: int, generation: int) -> RowState | None:
        state = self._rows.get(row)
        if state is not None and state.generation != generation:
            del self._rows[row]
            return None
        return state

    def open(self, row: int, generation: int) -> RowState:
        state = self.get(row, generation)
        if state is None:
            state = self._rows[row] = RowState(generation)
        return state

    def packed(self, row: int) -> PackedRow | None:
        """The packed state of a live row (the caller holds the row, so the generation is current)."""
        state = self._rows.get(row)
        return None if state is None else state.packed

    def drop(self, row: int) -> None:
        self._rows.pop(row, None)

    def rows(self) -> dict[int, RowState]:
        return self._rows

    def footprint(self) -> tuple[int, int]:
        """(live rows, bytes of tensors held): what the tests watch to show the backend keeps no KV copy."""
        total = 0
        for state in self._rows.values():
            tensors = list(state.query_tail.values())
            if state.packed is not None:
                tensors += [*state.packed.cells, state.packed.indptr]
            if state.decision is not None:
                tensors += [state.decision.keep, state.decision.all_head_counts]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return len(self._rows), total


LEDGER = Ledger()
