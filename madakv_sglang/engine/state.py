"""What the ``madakv`` backend and the scheduler hooks of one scheduler process share (docs/design.md §5).

SGLang runs the model inside the scheduler process: the backend decides and packs, the hooks in ``reclaim`` free
slots and keep SGLang's accounting, and they meet in one :class:`SchedulerState`. SGLang identifies a running
request's KV by its ``req_to_token`` row. A row is re-used by later requests, so every row's entry carries the
row's ``req_generation`` and is dropped when SGLang frees the row (``ReqToTokenPool.free_rows``, hooked in
``reclaim``). What a retraction must replay lives on SGLang's ``Req`` itself: the backend hands each decision to
the request's :attr:`RequestInfo.remember` when it is made, so it lasts exactly as long as the request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor

from madakv_sglang.config import PolicyConfig
from madakv_sglang.packing import PackedRow, Replay


@dataclass
class RowState:
    generation: int
    query_tail: dict[int, Tensor] = field(default_factory=dict)  # layer -> last W prompt queries so far
    packed: PackedRow | None = None
    skipped: str | None = None  # why the prompt was kept whole, until the scheduler has reported it
    cut_at: Tensor | None = None  # chunk eviction: [n] int32, the chunk end that dropped each position
    cut_pending: Tensor | None = None  # slots the last cut dropped, until the scheduler frees them
    returned: int = 0  # row positions that no longer hold a slot of the request's own: what the accounting hook
    # subtracts (cuts and the pack; with the prefix cache, also the prompt slots the tree took over)
    pending_pack: PendingPack | None = None  # a decision the scheduler places once the tree has the prompt


@dataclass
class PendingPack:
    """A compressed prompt's decision, made by the backend while the prefix tree may share the row's prompt slots
    (``engine.radix``): the scheduler picks the slots the kept cells go to and calls ``pack`` with them."""

    pack: Callable[[Tensor], PackedRow] | None  # moves the kept cells into the given M slots and points the row at
    # them; None when the decision keeps every position
    slots: int  # M
    prompt_len: int  # n


@dataclass(frozen=True)
class RequestInfo:
    """Attributes:
    rid: the request id (for logs).
    full_len: ``len(origin_input_ids) + len(output_ids)``: the prefill is complete when the extend reaches it.
    config: the policy settings for this request (server flags, or its per-request override).
    replay: the kept set decided before a retraction (positions past its n0 are the outputs generated
        before it and are all kept), so re-prefill does not depend on memory pressure.
    remember: stores the decision made for this prompt on the request, where a retraction finds it as ``replay``.
    """

    rid: str
    full_len: int
    config: PolicyConfig
    replay: Replay | None = None
    remember: Callable[[Replay], None] | None = None


class SchedulerState:
    """Everything the backend and the scheduler hooks of one scheduler process share.

    Created with the ``madakv`` backend (:func:`create`), which SGLang builds once per scheduler process, and
    living as long as the process. It holds the per-row state (row -> :class:`RowState`, with generation checks so
    a recycled row never inherits a finished request's state), the requests of the batch about to run (what the
    scheduler knows and a ``ForwardBatch`` does not carry) and the slots returned so far.
    """

    def __init__(self) -> None:
        self._rows: dict[int, RowState] = {}
        self._batch: list[RequestInfo] | None = None
        self.reclaimed_total = 0  # slots returned over the process lifetime
        # Whether the scheduler runs a prefix tree (set by the scheduler hooks before every batch): then the
        # backend leaves a decision for the scheduler to place instead of packing the row's prompt slots in place.
        self.prefix_cache = False

    @contextmanager
    def running(self, infos: list[RequestInfo]) -> Iterator[None]:
        """Publish the requests of the batch the scheduler runs now, in batch order, for the length of the run."""
        previous, self._batch = self._batch, infos
        try:
            yield
        finally:
            self._batch = previous

    def batch(self) -> list[RequestInfo] | None:
        """The published requests; ``None`` outside a scheduler's run (``bench_one_batch``, warm-up forwards)."""
        return self._batch

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

    def returned(self, row: int) -> int:
        """Slots a live row has given back (the caller holds the row, so the generation is current)."""
        state = self._rows.get(row)
        return 0 if state is None else state.returned

    def drop(self, row: int) -> None:
        self._rows.pop(row, None)

    def rows(self) -> dict[int, RowState]:
        return self._rows

    def footprint(self) -> tuple[int, int]:
        """(live rows, bytes of tensors held): what the tests watch to show the backend keeps no KV copy."""
        total = 0
        for state in self._rows.values():
            tensors = list(state.query_tail.values())
            tensors += [t for t in (state.cut_at, state.cut_pending) if t is not None]
            if state.packed is not None:
                tensors += [*state.packed.cells, state.packed.indptr]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return len(self._rows), total


_STATE: SchedulerState | None = None


def create() -> SchedulerState:
    """The state of this process, made when the backend is built (a second backend in the process shares it)."""
    global _STATE
    if _STATE is None:
        _STATE = SchedulerState()
    return _STATE


def current() -> SchedulerState | None:
    """This process's state; ``None`` until a ``madakv`` backend exists (then no request is compressed yet)."""
    return _STATE
