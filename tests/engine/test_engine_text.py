"""The madakv backend inside a real SGLang server on CPU (tiny Qwen2, fp32, strict memory checks and NaN
poisoning on): equivalence with stock attention, agreement with the HF path, slot accounting, waves with
chunked prefill, aborts and retractions, and the concurrency gain on a fixed pool."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from madakv_sglang.config import PolicyConfig
from madakv_sglang.log_lines import batch_lines
from tests.mm_inputs import reclaim_lines
from tests.sglang_server import Server
from tests.text_requests import finite_logprobs, generate, random_prompts, write_tiny_qwen2

WINDOW = 8
CHUNK = 48  # prefill chunk: prompts longer than this are prefilled in several forwards
LENGTHS = (100, 57, 197, 31, 9)  # 197 = 4 chunks + 5 tokens: the last chunk is shorter than the window
MAX_NEW = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


def _prompts(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    return random_prompts(lengths, seed)


def _generate(
    server: Server, ids: list[int], max_new: int = MAX_NEW, custom: dict[str, Any] | None = None, rid: str | None = None
) -> dict[str, Any]:
    return generate(server, ids, max_new, custom, rid)


def _finite_logprobs(output: dict[str, Any]) -> bool:
    return finite_logprobs(output)


BASE_ARGS = ["--skip-tokenizer-init", "--max-total-tokens", "4096", "--chunked-prefill-size", str(CHUNK)]
MADAKV_ARGS = ["--kv-policy", "madakv", "--kv-budget", "0.2", "--kv-window", str(WINDOW)]


@pytest.fixture(scope="module")
def stock(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    log = tmp_path_factory.mktemp("logs") / "stock.log"
    with Server(checkpoint, [*BASE_ARGS, "--attention-backend", "torch_native"], log) as server:
        yield server


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("decisions")


@pytest.fixture(scope="module")
def madakv(checkpoint: Path, dump_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    log = tmp_path_factory.mktemp("logs") / "madakv.log"
    with Server(checkpoint, [*BASE_ARGS, *MADAKV_ARGS], log, env={"MADAKV_DEBUG_DUMP_DIR": str(dump_dir)}) as server:
        yield server


def test_budget_covering_the_prompt_gives_stock_tokens(stock: Server, madakv: Server) -> None:
    for ids in _prompts(LENGTHS, seed=1):
        want = _generate(stock, ids)["output_ids"]
        got = _generate(madakv, ids, custom={"kv_budget": "1.0"})
        assert got["output_ids"] == want
        assert _finite_logprobs(got)


@pytest.mark.parametrize("layout", ["shared", "per-layer"])
def test_triton_kernels_in_the_engine_decode_like_the_torch_reference(
    checkpoint: Path, madakv: Server, tmp_path: Path, layout: str
) -> None:
    """The Triton kernels inside a real server, as a CUDA device would choose them (``MADAKV_DECODE_KERNEL`` and
    ``MADAKV_LAYOUT_KERNEL=triton``), run by the Triton interpreter on CPU: Triton index tables, the Triton
    per-layer pack (``per-layer``; ``shared`` packs in torch) and the Triton decode together give the torch
    server's tokens and logprobs (its layout is ``shared``; both layouts keep the same cells)."""
    env = {"MADAKV_DECODE_KERNEL": "triton", "MADAKV_LAYOUT_KERNEL": "triton", "TRITON_INTERPRET": "1"}
    args = [*BASE_ARGS, *MADAKV_ARGS, "--kv-layout", layout]
    with Server(checkpoint, args, tmp_path / "triton.log", env=env) as triton:
        assert f"layout {layout}," in triton.log() and "decode kernel triton, layout kernel triton" in triton.log()
        for ids in _prompts(LENGTHS[:3], seed=4):  # 197 tokens: chunked prefill, then packed decode
            want, got = _generate(madakv, ids), _generate(triton, ids)
            assert got["output_ids"] == want["output_ids"]
            pairs = zip(
                want["meta_info"]["output_token_logprobs"], got["meta_info"]["output_token_logprobs"], strict=True
            )
            assert max(abs(a[0] - b[0]) for a, b in pairs) <= 1e-5  # float32 reordering across the KV splits


def test_engine_keeps_what_the_hf_path_decides_and_decodes_the_same(
    checkpoint: Path, madakv: Server, dump_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from madakv_sglang import hf

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    config = PolicyConfig.from_strings({"policy": "madakv", "budget": "0.2", "window": str(WINDOW), "min_prompt": "0"})
    log_before = set(reclaim_lines(madakv.log()))
    for index, ids in enumerate(_prompts(LENGTHS, seed=2)):
        rid = f"hf-agree-{index}"
        got = _generate(madakv, ids, rid=rid)
        want = hf.generate(model, {"input_ids": torch.tensor([ids])}, config, MAX_NEW)
        record = torch.load(dump_dir / f"{rid}.pt")
        assert torch.equal(record["keep"], want.selection.keep[0, :, :, : len(ids)]), (
            f"kept sets differ for n={len(ids)}"
        )
        assert got["output_ids"] == want.tokens
        assert _finite_logprobs(got)
    assert log_before != set(reclaim_lines(madakv.log()))


def test_request_holds_exactly_the_slots_plan_reports(madakv: Server, dump_dir: Path, tmp_path: Path) -> None:
    ids = _prompts((160,), seed=3)[0]
    output = _generate(madakv, ids, rid="plan-check")
    record = torch.load(dump_dir / "plan-check.pt")
    scores = tmp_path / "scores.pt"
    torch.save({"scores": record["scores"], "visual": record["visual"]}, scores)
    plan = subprocess.run(
        [
            sys.executable,
            "-m",
            "madakv_sglang.plan",
            "--scores",
            str(scores),
            "--policy",
            "madakv",
            "--budget",
            "0.2",
            "--window",
            str(WINDOW),
            "--min-prompt",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(plan.stdout)
    prompt_slots, kept_slots = reclaim_lines(madakv.log())["plan-check"]
    assert prompt_slots == 160
    assert kept_slots == report["slots_kept"]
    layers, heads, _ = record["keep"].shape  # shared layout: the kept cells of all layers, L * H per slot
    assert kept_slots == math.ceil(int(record["keep"].sum()) / (layers * heads))
    (summary,) = output["meta_info"]["madakv"]  # the same numbers reach the client
    assert (summary["prompt_slots"], summary["kept_slots"]) == (160, report["slots_kept"])
    assert summary["reclaimed_slots"] == 160 - report["slots_kept"]


@pytest.fixture(scope="module")
def per_layer_dumps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("decisions-per-layer")


@pytest.fixture(scope="module")
def per_layer(checkpoint: Path, per_layer_dumps: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    log = tmp_path_factory.mktemp("logs") / "per-layer.log"
    args = [*BASE_ARGS, *MADAKV_ARGS, "--kv-layout", "per-layer"]
    with Server(checkpoint, args, log, env={"MADAKV_DEBUG_DUMP_DIR": str(per_layer_dumps)}) as server:
        yield server


def test_layouts_move_cells_but_never_change_the_choice_or_the_output(
    madakv: Server, dump_dir: Path, per_layer: Server, per_layer_dumps: Path
) -> None:
    """The same prompts on a ``shared`` and a ``per-layer`` server: the same kept sets, bit-identical logprobs (the
    decode gathers the same values in the same order, only from other cells), and each holds the slots its own
    formula gives for those kept sets: the mean over layers, or the fullest layer. Also with eviction during
    chunked prefill, which packs into the slots its cuts left."""
    lengths = (197, 100, 260, 57)
    cases = [(None, index, ids) for index, ids in enumerate(_prompts(lengths, seed=6))]
    cut = {"kv_prefill_evict": "chunk", "kv_prefill_keep": 1}  # cuts of B: the most cuts these prompts allow
    cases += [(cut, index, ids) for index, ids in enumerate(_prompts(lengths, seed=7))]
    for custom, index, ids in cases:
        rid = f"layouts-{'chunk-' if custom else ''}{index}"
        shared = _generate(madakv, ids, custom=custom, rid=rid)
        separate = _generate(per_layer, ids, custom=custom, rid=rid)
        assert separate["output_ids"] == shared["output_ids"]
        assert separate["meta_info"]["output_token_logprobs"] == shared["meta_info"]["output_token_logprobs"]
        keep = torch.load(dump_dir / f"{rid}.pt")["keep"]
        assert torch.equal(torch.load(per_layer_dumps / f"{rid}.pt")["keep"], keep)
        layers, heads, _ = keep.shape
        counts = keep.sum(dim=-1)
        want = {
            "shared": math.ceil(int(counts.sum()) / (layers * heads)),
            "per-layer": math.ceil(int(counts.sum(dim=-1).max()) / heads),
        }
        for layout, output in (("shared", shared), ("per-layer", separate)):
            (summary,) = output["meta_info"]["madakv"]
            assert summary["layout"] == layout
            assert summary["kept_slots"] == want[layout], f"{rid} n={len(ids)} under {layout}"
            assert summary["packing_waste_cells"] == want[layout] * layers * heads - int(counts.sum())
        assert want["shared"] <= want["per-layer"]
    assert "layout per-layer)" in per_layer.log() and "layout shared)" in madakv.log()


# ---- waves on a small pool: chunked prefill, aborts, retractions, re-use of freed slots ----

WAVE_LENGTHS = (40, 180, 75, 260, 120, 33, 210, 95)
WAVE_OUT = (24, 48, 16, 64, 32, 40, 24, 56)


def _wave(server: Server, wave: int, aborts: dict[str, float]) -> dict[str, dict[str, Any]]:
    """24 requests at once; the rids in ``aborts`` are aborted after the given delay (s)."""
    prompts = _prompts(WAVE_LENGTHS * 3, seed=100 + wave)
    results: dict[str, dict[str, Any]] = {}

    def run(index: int, ids: list[int]) -> None:
        rid = f"w{wave}-{index}"
        try:
            results[rid] = _generate(server, ids, max_new=WAVE_OUT[index % len(WAVE_OUT)], rid=rid)
        except Exception as err:  # an aborted request may end with an HTTP error; record it
            results[rid] = {"error": repr(err)}

    threads = [threading.Thread(target=run, args=(i, ids)) for i, ids in enumerate(prompts)]
    for thread in threads:
        thread.start()
    for rid, delay in aborts.items():
        time.sleep(delay)
        server.post("/abort_request", {"rid": rid})
    for thread in threads:
        thread.join(timeout=600)
    return results


@pytest.fixture(scope="module")
def crowded(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The same policy on a small pool, admitting optimistically, with SGLang's own test switch that retracts
    decoding requests every few forwards on top of the retractions the pool forces."""
    log = tmp_path_factory.mktemp("logs") / "crowded.log"
    args = [
        "--skip-tokenizer-init",
        "--max-total-tokens",
        "900",
        "--chunked-prefill-size",
        str(CHUNK),
        "--schedule-conservativeness",
        "0.05",
        *MADAKV_ARGS,
    ]
    env = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "20"}
    with Server(checkpoint, args, log, env=env) as server:
        yield server


def test_waves_with_aborts_and_retractions_balance_and_do_not_change_outputs(crowded: Server, madakv: Server) -> None:
    reclaimed_before = _reclaimed_total(crowded.log())
    for wave in range(3):
        # One request alone between waves: the backend state it reports must be its own row only (no private
        # KV copy or per-request state survives a finished request).
        _generate(crowded, _prompts((120,), seed=wave)[0], max_new=2, rid=f"probe-{wave}")
        rows, held = _backend_state(crowded.log())
        assert rows == 1 and held < 120 * 8 * 16, (rows, held)
        aborts = {f"w{wave}-3": 0.05, f"w{wave}-13": 1.0}  # one early (likely mid-prefill), one later
        results = _wave(crowded, wave, aborts)
        prompts = _prompts(WAVE_LENGTHS * 3, seed=100 + wave)
        for index, ids in enumerate(prompts):
            rid = f"w{wave}-{index}"
            if rid in aborts:
                continue
            output = results[rid]
            assert "error" not in output, output
            assert len(output["output_ids"]) == WAVE_OUT[index % len(WAVE_OUT)]
            assert _finite_logprobs(output)
            roomy = _generate(madakv, ids, max_new=WAVE_OUT[index % len(WAVE_OUT)])
            assert output["output_ids"] == roomy["output_ids"], f"{rid}: output depends on memory pressure"
    log = crowded.log()
    retracted = sum(int(n) for n in re.findall(r"#retracted_reqs: (\d+)", log))
    assert retracted >= 3, "no request was retracted"
    assert _reclaimed_total(log) - reclaimed_before > 900, "freed slots were not re-used across waves"
    time.sleep(3)  # let the scheduler go idle: SGLang's strict idle check raises on a leak
    assert crowded.process.poll() is None, crowded.log()[-3000:]
    assert "Leak" not in crowded.log() and "double free" not in crowded.log()
    assert crowded.get("/health_generate", timeout=60) is not None


def test_abort_mid_prefill_and_mid_decode_leaves_the_pool_balanced(crowded: Server) -> None:
    """A 700-token prompt is prefilled in 15 chunks of 48: abort it once its first chunk ran. A long decode is
    aborted once tokens stream. SGLang's strict checks run after every batch; the server must stay healthy."""
    (long_prompt,) = _prompts((700,), seed=11)
    result: dict[str, Any] = {}
    chunks_before = crowded.log().count("Prefill batch")
    thread = threading.Thread(
        target=lambda: result.update(_generate(crowded, long_prompt, max_new=4, rid="abort-prefill"))
    )
    thread.start()
    deadline = time.monotonic() + 60
    while crowded.log().count("Prefill batch") == chunks_before and time.monotonic() < deadline:
        time.sleep(0.01)
    crowded.post("/abort_request", {"rid": "abort-prefill"})
    thread.join(timeout=120)
    assert result["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(result["output_ids"]) == 0, "the prompt finished before the abort: the test lost its race"

    (prompt,) = _prompts((150,), seed=12)
    result.clear()
    thread = threading.Thread(target=lambda: result.update(_generate(crowded, prompt, max_new=400, rid="abort-decode")))
    thread.start()
    deadline = time.monotonic() + 60
    while "madakv: request abort-decode" not in crowded.log() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    crowded.post("/abort_request", {"rid": "abort-decode"})
    thread.join(timeout=120)
    assert result["meta_info"]["finish_reason"]["type"] == "abort"
    # The first token comes with the prefill batch, so an abort after the compression line is mid-decode.
    assert 0 < result["meta_info"]["completion_tokens"] < 400, "the abort did not land mid-decode"
    time.sleep(2)
    assert crowded.process.poll() is None, crowded.log()[-3000:]
    assert "Leak" not in crowded.log()


def _backend_state(log: str) -> tuple[int, int]:
    last = batch_lines(log)[-1]
    return last.state_rows, last.state_bytes


def _reclaimed_total(log: str) -> int:
    batches = batch_lines(log)
    return batches[-1].since_start if batches else 0


# ---- concurrency on a fixed pool ----

LONG_PROMPT, LONG_OUT, POOL = 400, 16, 3000


def _peak_running(log: str) -> int:
    return max((int(v) for v in re.findall(r"#running-req: (\d+)", log)), default=0)


def test_compression_admits_more_concurrent_requests(checkpoint: Path, tmp_path: Path) -> None:
    """With hcc=off at r = 0.1 a request holds M = 40 slots after prefill instead of 400, so the same pool runs
    several times more requests at once; the bound 0.8 (n + out) / (M + out) leaves 20% for the transient
    prefill footprint (a prompt needs all n slots until its forward ends) and the decode reservation."""
    prompts = _prompts((LONG_PROMPT,) * 48, seed=7)
    args = [
        "--skip-tokenizer-init",
        "--max-total-tokens",
        str(POOL),
        "--decode-log-interval",
        "1",
        "--max-running-requests",
        "256",
    ]
    peaks = {}
    for name, extra in {
        "full": ["--attention-backend", "torch_native"],
        "madakv": ["--kv-policy", "madakv", "--kv-budget", "0.1", "--kv-hcc", "off", "--kv-window", str(WINDOW)],
    }.items():
        with Server(checkpoint, [*args, *extra], tmp_path / f"{name}.log") as server:
            threads = [threading.Thread(target=_generate, args=(server, ids, LONG_OUT)) for ids in prompts]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=600)
            peaks[name] = _peak_running(server.log())
    kept = LONG_PROMPT // 10
    bound = 0.8 * (LONG_PROMPT + LONG_OUT) / (kept + LONG_OUT)
    assert peaks["full"] > 0
    assert peaks["madakv"] / peaks["full"] >= bound, peaks
