"""madakv's server log lines (madakv_sglang/log_lines.py): what the formatters write parses back to the same
numbers, behind any SGLang prefix; a line written differently parses to nothing; and the lines the scheduler hooks
in engine/reclaim.py actually log are the ones the parsers read."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from madakv_sglang.config import PolicyConfig
from madakv_sglang.engine import metrics, reclaim
from madakv_sglang.engine import state as scheduler_state
from madakv_sglang.log_lines import (
    BatchLine,
    RequestLine,
    batch_lines,
    format_batch,
    format_compressed,
    format_skipped,
    request_lines,
)
from madakv_sglang.packing import PackedRow

# SGLang's prefixes: one process, a TP rank, and a TP rank among other parallel ranks.
PREFIXES = [
    ("[2025-01-01 12:00:00] ", None),
    ("[2025-01-01 12:00:00 TP1] ", 1),
    ("[2025-01-01 12:00:00.123 DP0 TP3 EP3] ", 3),
    ("", None),
]
RID = "chat-4-images-7f3a"


def test_importing_it_loads_neither_torch_nor_sglang() -> None:
    """Any reader of a log (the demo, a benchmark, a test) imports it cheaply: a fresh interpreter."""
    code = (
        "import sys; import madakv_sglang.log_lines; "
        "print(sorted(m for m in sys.modules if m in ('torch', 'sglang') or m.startswith('madakv_sglang.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MADAKV_DISABLE_CPU_SHIMS": "1"},
    ).stdout.strip()
    assert out == "['madakv_sglang.log_lines']", out


@pytest.mark.parametrize(("prefix", "rank"), PREFIXES)
def test_compressed_line_round_trips(prefix: str, rank: int | None) -> None:
    line = prefix + format_compressed(RID, prompt_slots=400, kept_slots=41, waste_cells=12, layout="per-layer")
    assert line.endswith(f"{RID} prompt slots 400 -> 41 (89.8% reclaimed, waste 12 cells, layout per-layer)")
    assert request_lines(line) == [
        RequestLine(
            rid=RID,
            prompt_slots=400,
            kept_slots=41,
            reclaimed_pct=89.8,
            waste_cells=12,
            layout="per-layer",
            skip_reason=None,
            skip_detail=None,
            tp_rank=rank,
        )
    ]
    assert request_lines(line)[0].compressed and batch_lines(line) == []


@pytest.mark.parametrize(("prefix", "rank"), PREFIXES)
def test_skipped_line_round_trips_as_kept_whole(prefix: str, rank: int | None) -> None:
    line = prefix + format_skipped(RID, prompt_slots=40, reason="short prompt", detail="40 < --kv-min-prompt 256")
    (parsed,) = request_lines(line)
    assert parsed == RequestLine(
        rid=RID,
        prompt_slots=40,
        kept_slots=40,
        reclaimed_pct=0.0,
        waste_cells=0,
        layout=None,
        skip_reason="short prompt",
        skip_detail="40 < --kv-min-prompt 256",
        tp_rank=rank,
    )
    assert not parsed.compressed and batch_lines(line) == []


@pytest.mark.parametrize(("prefix", "rank"), PREFIXES)
def test_batch_line_round_trips(prefix: str, rank: int | None) -> None:
    line = prefix + format_batch(
        reclaimed=360, since_start=1080, available=660, capacity=1000, state_rows=2, state_bytes=4096
    )
    assert batch_lines(line) == [BatchLine(360, 1080, 660, 1000, 2, 4096, rank)]
    assert request_lines(line) == []


def test_a_batch_that_cost_room_parses_with_its_sign() -> None:
    """A compressed copy larger than the prompt's own slots, its matched prefix still locked by another request."""
    line = format_batch(reclaimed=-68, since_start=900, available=400, capacity=1000, state_rows=3, state_bytes=64)
    assert batch_lines(line) == [BatchLine(-68, 900, 400, 1000, 3, 64, None)]


def test_only_our_lines_are_read_in_log_order() -> None:
    log = "\n".join(
        [
            "[t] max_total_num_tokens=1000, chunked_prefill_size=4096",
            "[t TP0] madakv: backend ready (base torch_native, policy madakv, budget 0.2, window 32, layout shared)",
            "[t TP0] Prefill batch, #new-seq: 2, #new-token: 440, token usage: 0.44, #running-req: 0",
            "[t TP0] madakv: request bad-override: custom_params.kv_budget: must be > 0; using the server's settings",
            "[t TP0] " + format_compressed("req-a", 400, 40, 0, "shared"),
            "[t TP0] " + format_skipped("req-b", 40, "short prompt", "40 < --kv-min-prompt 256"),
            "[t TP0] " + format_batch(360, 360, 660, 1000, 1, 512),
            "[t TP0] Decode batch, #running-req: 2, #token: 80, token usage: 0.08",
            "[t TP0] " + format_compressed("req-c", 300, 30, 5, "shared"),
            "[t TP0] " + format_batch(270, 630, 930, 1000, 2, 1024),
            "[t] [http_server] Error: No data iterator found for token",
        ]
    )
    assert [(r.rid, r.prompt_slots, r.kept_slots) for r in request_lines(log)] == [
        ("req-a", 400, 40),
        ("req-b", 40, 40),
        ("req-c", 300, 30),
    ]
    assert [(b.reclaimed, b.since_start) for b in batch_lines(log)] == [(360, 360), (270, 630)]


@pytest.mark.parametrize(
    "line",
    [
        "madakv: request r-1 prompt slots 400 -> 40 (90.0% reclaimed, waste 0 cells)",  # a field dropped
        "madakv: request r-1 prompt slots 400 -> 40 (90.0% reclaimed, waste 0 cells, layout shared, policy x)",
        "madakv: request r-1 prompt slots 400 -> 40 (90.00% reclaimed, waste 0 cells, layout shared)",
        "madakv: request r-1 prompt slots 400 => 40 (90.0% reclaimed, waste 0 cells, layout shared)",
        "madakv: request r-1 prompt slots 40 kept whole",
        "madakv: request r-1 prompt tokens 40 kept whole (short prompt: 40 < --kv-min-prompt 256)",
    ],
)
def test_a_request_line_written_differently_parses_to_nothing(line: str) -> None:
    assert request_lines(line) == []


@pytest.mark.parametrize(
    "line",
    [
        "madakv: reclaimed 150 slots in this batch (150 since start); pool available 700 of 1000; backend state 1 rows",
        "madakv: reclaimed 150 slots in this batch; pool available 700 of 1000; backend state 1 rows, 64 bytes",
        "madakv: freed 150 slots in this batch (150 since start); pool available 700 of 1000; backend state 1 rows, "
        "64 bytes",
    ],
)
def test_a_batch_line_written_differently_parses_to_nothing(line: str) -> None:
    assert batch_lines(line) == []


class _Allocator:
    """SGLang's token allocator as ``reclaim`` sees it: frees, and says what is available."""

    size = 1000

    def __init__(self, available: int) -> None:
        self.available = available

    def free(self, slots: torch.Tensor) -> None:
        self.available += int(slots.numel())

    def available_size(self) -> int:
        return self.available


def _req(rid: str, row: int, prompt_len: int) -> SimpleNamespace:
    return SimpleNamespace(
        rid=rid, kv=SimpleNamespace(req_pool_idx=row), origin_input_ids=[0] * prompt_len, customized_info=None
    )


def test_the_lines_reclaim_logs_parse_back(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The scheduler hook that frees a batch's evicted slots, on a compressed and a skipped request."""
    config = PolicyConfig(policy="madakv", layout="per-layer", min_prompt=256)
    shared = scheduler_state.SchedulerState()
    monkeypatch.setattr(scheduler_state, "_STATE", shared)
    monkeypatch.setattr(reclaim, "server_config", lambda: config)
    monkeypatch.setattr(metrics, "_metrics", None)  # recording off, as without --enable-metrics
    shared.open(row=1, generation=0).packed = PackedRow(
        prompt_len=400,
        slots=40,
        cells=[torch.arange(80)],
        indptr=torch.tensor([[0, 40, 80]]),
        pending_free=torch.arange(100, 460),
        waste_cells=3,
        compress_seconds=0.01,
    )
    shared.open(row=2, generation=0).skipped = "short prompt"
    tree = SimpleNamespace(evictable_size=lambda: 50)  # prefixes the radix tree would give up
    scheduler = SimpleNamespace(
        token_to_kv_pool_allocator=_Allocator(300), running_batch=SimpleNamespace(), tree_cache=tree
    )
    batch = SimpleNamespace(reqs=[_req("long-one", row=1, prompt_len=400), _req("short-one", row=2, prompt_len=40)])
    caplog.set_level(logging.INFO, logger=reclaim.logger.name)

    reclaim._free_evicted(scheduler, batch)

    log = "\n".join(f"[2025-01-01 12:00:00 TP1] {record.getMessage()}" for record in caplog.records)
    assert request_lines(log) == [
        RequestLine("long-one", 400, 40, 90.0, 3, "per-layer", None, None, 1),
        RequestLine("short-one", 40, 40, 0.0, 0, None, "short prompt", "40 < --kv-min-prompt 256", 1),
    ]
    rows, held = shared.footprint()
    assert batch_lines(log) == [BatchLine(360, 360, 710, 1000, rows, held, 1)]  # 300 + 360 freed + 50 evictable
