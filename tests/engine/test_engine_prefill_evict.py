"""``--kv-prefill-evict chunk`` inside real SGLang servers on CPU (tiny Qwen2, fp32, strict memory checks and NaN
poisoning on): the cuts between prefill chunks hold a prompt to its cut size plus one chunk, the final decision
keeps only survivors, accounting stays exact, nothing changes when no cut is due, and retractions and aborts
between chunks neither leak nor change the output."""

from __future__ import annotations

import math
import re
import threading
import time
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import torch

from madakv_sglang.log_lines import cut_lines, request_lines
from tests.sglang_server import Server
from tests.text_requests import finite_logprobs, generate, random_prompts, write_tiny_qwen2

WINDOW = 8
SINK = 4
CHUNK = 48  # prompts longer than this are prefilled in several forwards, with a cut after each but the last
BUDGET = 0.1
LENGTHS = (400, 197, 121, 40)  # 40 fits one chunk: no cut
MAX_NEW = 6
BASE_ARGS = ["--skip-tokenizer-init", "--max-total-tokens", "4096", "--chunked-prefill-size", str(CHUNK)]
CHUNK_ARGS = [
    "--kv-policy",
    "madakv",
    "--kv-budget",
    str(BUDGET),
    "--kv-window",
    str(WINDOW),
    "--kv-sink",
    str(SINK),
    "--kv-prefill-evict",
    "chunk",
    "--kv-prefill-keep",
    "1",  # the tightest cuts (not the default 4): the most cuts per prompt, the smallest margins
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("decisions")


@pytest.fixture(scope="module")
def chunked(checkpoint: Path, dump_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    log = tmp_path_factory.mktemp("logs") / "chunked.log"
    env = {"MADAKV_DEBUG_DUMP_DIR": str(dump_dir)}
    with Server(checkpoint, [*BASE_ARGS, *CHUNK_ARGS], log, env=env) as server:
        yield server


def test_cuts_hold_each_prompt_to_its_cut_size_plus_one_chunk(chunked: Server, dump_dir: Path) -> None:
    for index, ids in enumerate(random_prompts(LENGTHS, seed=1)):
        rid = f"cut-{index}"
        output = generate(chunked, ids, MAX_NEW, rid=rid)
        assert len(output["output_ids"]) == MAX_NEW and finite_logprobs(output), output
        n = len(ids)
        budget = math.ceil(BUDGET * n)
        cut_size = max(budget, SINK + WINDOW)
        cuts = [line for line in cut_lines(chunked.log()) if line.rid == rid]
        if n <= CHUNK:
            assert not cuts
            continue
        # One cut after every chunk that leaves more than the cut size, at the chunk's end.
        assert cuts, f"{rid}: no cut"
        for line in cuts:
            assert line.seen % CHUNK == 0 and line.seen < n, line
            assert line.held == cut_size, line
            assert line.dropped > 0
        # Before a cut a prompt holds at most the previous cut's survivors plus one chunk.
        peak = max(min(line.seen, cut_size + CHUNK) for line in cuts)
        assert peak <= cut_size + CHUNK
        record = torch.load(dump_dir / f"{rid}.pt")
        keep = record["keep"]  # [L, H, n] over the logical prompt
        assert keep.shape[-1] == n
        survivors = keep.any(dim=(0, 1))
        # The final decision kept nothing a cut dropped: what it chose lies among the last cut's survivors and
        # the chunks after it.
        last = cuts[-1]
        assert int(survivors[: last.seen].sum()) <= cut_size
        (line,) = [r for r in request_lines(chunked.log()) if r.rid == rid]
        assert line.prompt_slots == n and line.kept_slots < cut_size + CHUNK
    assert "Leak" not in chunked.log() and "double free" not in chunked.log()


def test_no_cut_due_changes_nothing(chunked: Server, checkpoint: Path, tmp_path: Path) -> None:
    """A cut size above every prompt (``kv_prefill_keep`` 64 at budget 0.9) never cuts: the same tokens as
    ``kv_prefill_evict off`` on the same server."""
    for ids in random_prompts((197, 121), seed=2):
        off = generate(chunked, ids, MAX_NEW, {"kv_prefill_evict": "off", "kv_budget": 0.9})
        never = generate(chunked, ids, MAX_NEW, {"kv_prefill_keep": 64, "kv_budget": 0.9})
        assert never["output_ids"] == off["output_ids"]
        assert never["meta_info"]["madakv"] == off["meta_info"]["madakv"]


@pytest.fixture(scope="module")
def crowded(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Chunk eviction on a small pool, admitting optimistically, with SGLang's switch that retracts decoding
    requests every few forwards on top of the retractions the pool forces."""
    log = tmp_path_factory.mktemp("logs") / "crowded.log"
    args = [
        "--skip-tokenizer-init",
        "--max-total-tokens",
        "900",
        "--chunked-prefill-size",
        str(CHUNK),
        "--schedule-conservativeness",
        "0.05",
        *CHUNK_ARGS,
    ]
    env = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "20"}
    with Server(checkpoint, args, log, env=env) as server:
        yield server


def test_retracted_requests_replay_their_cuts_and_aborts_between_chunks_leak_nothing(
    crowded: Server, chunked: Server
) -> None:
    prompts = random_prompts((400, 197, 121, 300, 250, 160) * 2, seed=3)
    outs = [4, 24, 72]  # 72 > CHUNK: a request retracted late replays chunks that start past its prompt
    results: dict[str, dict[str, Any]] = {}

    def run(index: int, ids: list[int]) -> None:
        rid = f"r-{index}"
        try:
            results[rid] = generate(crowded, ids, outs[index % len(outs)], rid=rid)
        except Exception as err:  # an aborted request may end with an HTTP error; record it
            results[rid] = {"error": repr(err)}

    threads = [threading.Thread(target=run, args=(i, ids)) for i, ids in enumerate(prompts)]
    for thread in threads:
        thread.start()
    aborted = "r-3"  # 300 tokens = 7 chunks: aborted as soon as it has been cut once
    deadline = time.monotonic() + 120
    while not any(line.rid == aborted for line in cut_lines(crowded.log())) and time.monotonic() < deadline:
        time.sleep(0.01)
    crowded.post("/abort_request", {"rid": aborted})
    for thread in threads:
        thread.join(timeout=900)
    for index, ids in enumerate(prompts):
        rid = f"r-{index}"
        if rid == aborted:
            continue
        output = results[rid]
        assert "error" not in output, output
        assert finite_logprobs(output)
        roomy = generate(chunked, ids, outs[index % len(outs)])
        assert output["output_ids"] == roomy["output_ids"], f"{rid}: output depends on memory pressure"
    log = crowded.log()
    assert sum(int(n) for n in re.findall(r"#retracted_reqs: (\d+)", log)) >= 3, "no request was retracted"
    assert results[aborted].get("meta_info", {}).get("finish_reason", {}).get("type") in ("abort", None)
    time.sleep(3)  # let the scheduler go idle: SGLang's strict idle check raises on a leak
    assert crowded.process.poll() is None, log[-3000:]
    assert "Leak" not in crowded.log() and "double free" not in crowded.log()
    assert crowded.get("/health_generate", timeout=60) is not None


def _refusal(server: Server, ids: list[int], custom: dict[str, Any]) -> str:
    """The error text of a request the scheduler refuses (an HTTP error body, or an abort's message)."""
    try:
        output = generate(server, ids, MAX_NEW, custom)
    except urllib.error.HTTPError as err:
        return err.read().decode()
    assert output["meta_info"]["finish_reason"]["type"] == "abort", output
    return str(output["meta_info"]["finish_reason"])


def test_prompts_longer_than_the_pool_are_served_by_what_they_hold(crowded: Server, chunked: Server) -> None:
    """SGLang refuses a prompt of pool - 6 tokens or more. A chunk-evicting one holds its cut size plus one chunk
    while it is prefilled (168 slots at budget 0.1 here), so it is served on the 900-slot pool, with the tokens a
    roomy pool gives, also when SGLang retracts it; its output is clipped to what its kept slots leave."""
    pool = re.search(r"max_total_num_tokens=(\d+)", crowded.log())
    assert pool, "SGLang logs its pool size at start-up"
    capacity = int(pool.group(1))
    longer = random_prompts((1200, 1500), seed=4)
    assert all(len(ids) > capacity for ids in longer)
    start = len(crowded.log())
    outputs: dict[int, dict[str, Any]] = {}

    def run(index: int, ids: list[int]) -> None:
        outputs[index] = generate(crowded, ids, 40, rid=f"long-{index}")

    # At once, so that SGLang's test switch has two decoding requests to retract one of.
    threads = [threading.Thread(target=run, args=(i, ids)) for i, ids in enumerate(longer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    for index, ids in enumerate(longer):
        rid = f"long-{index}"
        assert finite_logprobs(outputs[index])
        roomy = generate(chunked, ids, 40)["output_ids"]
        assert outputs[index]["output_ids"] == roomy, f"{rid}: output depends on the pool"
        held = [line.held + CHUNK for line in cut_lines(crowded.log()) if line.rid == rid]
        assert held and max(held) < capacity
    retracted = sum(int(n) for n in re.findall(r"#retracted_reqs: (\d+)", crowded.log()[start:]))
    assert retracted >= 1, "SGLANG_TEST_RETRACT retracted no long request"  # so the equality above covers replays
    # Kept 720 slots (budget 0.6 of 1200), asking for 800 tokens (within the 2048-token context): it gets what the
    # pool leaves after them (long_prompts.output_limit: capacity - kept - one page - 2, page size 1 on CPU).
    clipped = generate(crowded, longer[0], 800, {"kv_budget": 0.6})
    assert len(clipped["output_ids"]) == capacity - 720 - 3
    # Refused with a reason: a cut size that does not fit, and a request that asks to hold its whole prompt.
    too_big = _refusal(crowded, longer[0], {"kv_budget": 0.9})
    assert "exceeds the KV pool's limit" in too_big and "--kv-prefill-evict chunk" in too_big, too_big
    whole = _refusal(crowded, longer[0], {"kv_prefill_evict": "off"})
    assert "exceeds the maximum allowed length" in whole, whole
    time.sleep(3)  # SGLang's strict idle check raises on a leak
    assert crowded.process.poll() is None, crowded.log()[-3000:]
    assert "Leak" not in crowded.log() and "double free" not in crowded.log()
    assert crowded.get("/health_generate", timeout=60) is not None
