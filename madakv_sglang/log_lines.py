"""The server log lines madakv writes, in both directions: the text the scheduler hooks log and the parsers that
read it back (docs/design.md §5).

The demo (when a response carries no ``meta_info``), the serving benchmark and the engine tests read these lines
out of SGLang's log. Each line has one template here: ``engine.reclaim`` formats it and the parsers' regexes are
built from the same template, so a changed line changes both, and a line written some other way parses to
nothing instead of to wrong numbers. Engine-free (no torch, no SGLang), so any reader can import it.

Under tensor parallelism SGLang's log prefix ends in ``TP<rank>`` (maybe followed by other parallel ranks) and
``] `` just before the message; the parsers report that rank, or None for a line without one.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

_COMPRESSED = (
    "madakv: request {rid} prompt slots {prompt_slots} -> {kept_slots} "
    "({reclaimed_pct:.1f}% reclaimed, waste {waste_cells} cells, layout {layout})"
)
_SKIPPED = "madakv: request {rid} prompt slots {prompt_slots} kept whole ({reason}: {detail})"
_CUT = "madakv: request {rid} cut after {seen} prompt tokens: holds {held} slots, dropped {dropped}"
_BATCH = (
    "madakv: reclaimed {reclaimed} slots in this batch ({since_start} since start); "
    "pool available {available} of {capacity}; backend state {state_rows} rows, {state_bytes} bytes"
)

# What each template field matches when the line is read back.
_FIELDS = {
    "rid": r"\S+",
    "prompt_slots": r"\d+",
    "kept_slots": r"\d+",
    "reclaimed_pct": r"\d+\.\d",
    "waste_cells": r"\d+",
    "layout": r"[\w-]+",
    "reason": r"[^:]+",
    "detail": r".*",
    "reclaimed": r"-?\d+",  # a batch's room can shrink: see BatchLine
    "since_start": r"-?\d+",
    "available": r"\d+",
    "capacity": r"\d+",
    "state_rows": r"\d+",
    "state_bytes": r"\d+",
    "seen": r"\d+",
    "held": r"\d+",
    "dropped": r"\d+",
}
_TP_PREFIX = r"(?:TP(?P<tp_rank>\d+)[^\]]*\] )?"


def _pattern(template: str) -> re.Pattern[str]:
    """A regex for one whole logged line of ``template``: its text literally, each field a named group, after
    SGLang's optional TP prefix; anchored at the line's end, so an extended line does not match."""
    parts = [_TP_PREFIX]
    for literal, field, _spec, _conversion in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(f"(?P<{field}>{_FIELDS[field]})")
    return re.compile("".join(parts) + "$")


_COMPRESSED_LINE = _pattern(_COMPRESSED)
_SKIPPED_LINE = _pattern(_SKIPPED)
_BATCH_LINE = _pattern(_BATCH)
_CUT_LINE = _pattern(_CUT)


def format_compressed(rid: str, prompt_slots: int, kept_slots: int, waste_cells: int, layout: str) -> str:
    """The line of a compressed prompt: n prompt slots down to the M it keeps (the reclaimed share is of n)."""
    reclaimed_pct = 100.0 * (prompt_slots - kept_slots) / max(prompt_slots, 1)
    return _COMPRESSED.format(
        rid=rid,
        prompt_slots=prompt_slots,
        kept_slots=kept_slots,
        reclaimed_pct=reclaimed_pct,
        waste_cells=waste_cells,
        layout=layout,
    )


def format_skipped(rid: str, prompt_slots: int, reason: str, detail: str) -> str:
    """The line of a prompt the skip rule kept whole: ``reason`` (``short prompt``, ``small saving``) and
    ``detail``, the numbers that made it so."""
    return _SKIPPED.format(rid=rid, prompt_slots=prompt_slots, reason=reason, detail=detail)


def format_cut(rid: str, seen: int, held: int, dropped: int) -> str:
    """The line of a cut between prefill chunks (``--kv-prefill-evict chunk``): after ``seen`` prompt tokens the
    request holds ``held`` slots, ``dropped`` fewer than before the cut."""
    return _CUT.format(rid=rid, seen=seen, held=held, dropped=dropped)


def format_batch(
    reclaimed: int, since_start: int, available: int, capacity: int, state_rows: int, state_bytes: int
) -> str:
    """The line of a batch that returned slots: the pool after the return (``available``: free slots plus the
    radix tree's evictable ones, SGLang's own measure of room), and what the backend holds."""
    return _BATCH.format(
        reclaimed=reclaimed,
        since_start=since_start,
        available=available,
        capacity=capacity,
        state_rows=state_rows,
        state_bytes=state_bytes,
    )


@dataclass(frozen=True)
class RequestLine:
    """One request's line, compressed or kept whole; a prompt kept whole reads as keeping all n slots, with
    nothing reclaimed and no waste, as its ``meta_info`` says.

    Attributes:
        rid: the request id.
        prompt_slots: n, the slots of the uncompressed prompt.
        kept_slots: M, the slots it holds after eviction (n when kept whole).
        reclaimed_pct: the logged share of n given back, in percent with one decimal.
        waste_cells: empty (layer, slot, head) cells inside the M slots.
        layout: the pool's layout, None when kept whole (that line does not say it).
        skip_reason: why the prompt was kept whole, None when it was compressed.
        skip_detail: the numbers behind ``skip_reason``, None when compressed.
        tp_rank: the TP rank of the scheduler that wrote it, None without a TP prefix.
    """

    rid: str
    prompt_slots: int
    kept_slots: int
    reclaimed_pct: float
    waste_cells: int
    layout: str | None
    skip_reason: str | None
    skip_detail: str | None
    tp_rank: int | None

    @property
    def compressed(self) -> bool:
        return self.skip_reason is None


@dataclass(frozen=True)
class BatchLine:
    """One batch's line. Attributes: the slots returned in the batch and since the scheduler started, the pool's
    available slots (free plus the radix tree's evictable ones) after the return of its ``capacity``, the
    backend's live rows and tensor bytes, and the TP rank (None without a TP prefix).

    With the prefix cache a batch's return is the pool's gain: a compressed prompt whose matched prefix other
    running requests still lock gives back only its own slots, and its fresh copy may need more than that, so a
    batch can return a negative count; the prefix's slots come back when the last request holding it is placed.
    """

    reclaimed: int
    since_start: int
    available: int
    capacity: int
    state_rows: int
    state_bytes: int
    tp_rank: int | None


def _rank(match: re.Match[str]) -> int | None:
    return None if match["tp_rank"] is None else int(match["tp_rank"])


def request_lines(log: str) -> list[RequestLine]:
    """Every per-request line of a log, compressed and kept whole, in log order; other lines are ignored."""
    found = []
    for line in log.splitlines():
        if match := _COMPRESSED_LINE.search(line):
            found.append(
                RequestLine(
                    rid=match["rid"],
                    prompt_slots=int(match["prompt_slots"]),
                    kept_slots=int(match["kept_slots"]),
                    reclaimed_pct=float(match["reclaimed_pct"]),
                    waste_cells=int(match["waste_cells"]),
                    layout=match["layout"],
                    skip_reason=None,
                    skip_detail=None,
                    tp_rank=_rank(match),
                )
            )
        elif match := _SKIPPED_LINE.search(line):
            prompt_slots = int(match["prompt_slots"])
            found.append(
                RequestLine(
                    rid=match["rid"],
                    prompt_slots=prompt_slots,
                    kept_slots=prompt_slots,
                    reclaimed_pct=0.0,
                    waste_cells=0,
                    layout=None,
                    skip_reason=match["reason"],
                    skip_detail=match["detail"],
                    tp_rank=_rank(match),
                )
            )
    return found


def batch_lines(log: str) -> list[BatchLine]:
    """Every per-batch line of a log, in log order; other lines are ignored."""
    found = []
    for line in log.splitlines():
        if match := _BATCH_LINE.search(line):
            found.append(
                BatchLine(
                    reclaimed=int(match["reclaimed"]),
                    since_start=int(match["since_start"]),
                    available=int(match["available"]),
                    capacity=int(match["capacity"]),
                    state_rows=int(match["state_rows"]),
                    state_bytes=int(match["state_bytes"]),
                    tp_rank=_rank(match),
                )
            )
    return found


@dataclass(frozen=True)
class CutLine:
    """One cut's line: the request, the prompt tokens prefilled so far, the slots it holds after the cut, the
    slots the cut dropped, and the TP rank (None without a TP prefix)."""

    rid: str
    seen: int
    held: int
    dropped: int
    tp_rank: int | None


def cut_lines(log: str) -> list[CutLine]:
    """Every cut line of a log, in log order; other lines are ignored."""
    found = []
    for line in log.splitlines():
        if match := _CUT_LINE.search(line):
            found.append(
                CutLine(
                    rid=match["rid"],
                    seen=int(match["seen"]),
                    held=int(match["held"]),
                    dropped=int(match["dropped"]),
                    tp_rank=_rank(match),
                )
            )
    return found
