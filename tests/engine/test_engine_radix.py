"""SGLang's prefix cache with a compressing policy (``--kv-radix``, ``engine.radix``) inside real SGLang servers on
CPU (tiny Qwen2, fp32, strict memory checks and NaN poisoning on): a prompt that shares a prefix with an earlier
one prefills only its new tokens and still compresses its whole prompt as a server without the tree does; the
tree holds only dense KV (a ``full`` request reading it answers as stock); both layouts; the fallbacks when no
fresh slot can be had; a tight pool where the tree gives up cached prompts to keep requests running; aborts and
retractions with shared prefixes; requests that cut between chunks bypass the tree."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.sglang_server import Server
from tests.text_requests import finite_logprobs, generate, random_prompts, write_tiny_qwen2

WINDOW = 8
BUDGET = 0.1
CHUNK = 48
MAX_NEW = 6
BASE_ARGS = ["--skip-tokenizer-init", "--max-total-tokens", "4096", "--chunked-prefill-size", str(CHUNK)]
MADAKV_ARGS = ["--kv-policy", "madakv", "--kv-budget", str(BUDGET), "--kv-window", str(WINDOW)]
# A matched prefix's K/V were computed in an earlier forward whose matmuls had other shapes than the forward that
# computes the whole prompt on a server without the tree; fp32 reassociation moves logprobs by ~1e-6 on this
# 3-layer model. 1e-4 nats leaves room for other BLAS builds and catches any real difference (wrong cells read).
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


def _serve(checkpoint: Path, root: Path, name: str, extra: list[str], env: dict[str, str] | None = None) -> Server:
    dump = root / f"dump_{name}"
    dump.mkdir()
    env = {"MADAKV_DEBUG_DUMP_DIR": str(dump), **(env or {})}
    return Server(checkpoint, [*BASE_ARGS, *MADAKV_ARGS, *extra], root / f"{name}.log", env=env)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("radix")


@pytest.fixture(scope="module")
def radix(checkpoint: Path, root: Path) -> Any:
    """The default ``--kv-radix auto``: the tree is on."""
    with _serve(checkpoint, root, "radix", []) as server:
        yield server


@pytest.fixture(scope="module")
def no_radix(checkpoint: Path, root: Path) -> Any:
    with _serve(checkpoint, root, "no_radix", ["--kv-radix", "off"]) as server:
        yield server


def _meta(output: dict[str, Any]) -> dict[str, Any]:
    return dict(output["meta_info"]["madakv"][0])


def _cached(output: dict[str, Any]) -> int:
    return int(output["meta_info"]["cached_tokens"])


def _assert_same_answer(output: dict[str, Any], reference: dict[str, Any], exact: bool = False) -> None:
    assert output["output_ids"] == reference["output_ids"]
    gaps = [
        abs(a - b)
        for (a, *_), (b, *_) in zip(
            output["meta_info"]["output_token_logprobs"], reference["meta_info"]["output_token_logprobs"], strict=True
        )
    ]
    assert max(gaps) <= (0.0 if exact else LOGPROB_TOLERANCE), gaps


def _keep(root: Path, server: str, rid: str) -> torch.Tensor:
    return torch.load(root / f"dump_{server}" / f"{rid}.pt")["keep"]


def _prompt_pair(seed: int, shared: int, first: int = 300, added: int = 80) -> tuple[list[int], list[int]]:
    base, extra = random_prompts((first, added), seed=seed)
    return base, base[:shared] + extra


def test_a_shared_prefix_is_prefilled_once_and_the_whole_prompt_compressed(
    radix: Server, no_radix: Server, root: Path
) -> None:
    first, second = _prompt_pair(seed=21, shared=250)
    answers = {}
    for name, server in (("radix", radix), ("no_radix", no_radix)):
        generate(server, first, MAX_NEW, rid="share-first")
        answers[name] = generate(server, second, MAX_NEW, rid="share-second")
    on, off = answers["radix"], answers["no_radix"]
    assert _cached(on) == 250 and _cached(off) == 0
    n = len(second)
    budget = int(BUDGET * n)
    assert _meta(on) | {"compress_ms": 0} == _meta(off) | {"compress_ms": 0, "prompt_cached": True}
    assert _meta(on)["prompt_slots"] == n and _meta(on)["kept_slots"] == budget
    _assert_same_answer(on, off)
    assert torch.equal(_keep(root, "radix", "share-second"), _keep(root, "no_radix", "share-second"))


def test_a_repeated_prompt_recomputes_only_its_observation_window(radix: Server) -> None:
    (prompt,) = random_prompts((200,), seed=23)
    first = generate(radix, prompt, MAX_NEW, rid="repeat-1")
    again = generate(radix, prompt, MAX_NEW, rid="repeat-2")
    assert _cached(first) == 0
    assert _cached(again) == len(prompt) - WINDOW  # SGLang alone would match all but the last token
    _assert_same_answer(again, first)
    assert _meta(again)["prompt_cached"] and _meta(again)["kept_slots"] == _meta(first)["kept_slots"]


def test_the_tree_holds_only_dense_kv(radix: Server, no_radix: Server) -> None:
    """A ``full`` request that extends a compressed one's prompt and answer matches the dense prompt (the packed
    row is never inserted) and answers exactly as on a server without the tree; a compressing request that
    extends the ``full`` one's prompt and answer matches both, as SGLang inserted them dense."""
    (prompt, tail) = random_prompts((260, 30), seed=24)
    compressed = generate(radix, prompt, MAX_NEW, rid="dense-source")
    extended = prompt + compressed["output_ids"] + tail
    full = {"kv_policy": "full"}
    on = generate(radix, extended, MAX_NEW, custom=full, rid="dense-full")
    off = generate(no_radix, extended, MAX_NEW, custom=full, rid="dense-full")
    assert _cached(on) == len(prompt)
    _assert_same_answer(on, off)
    again = extended + on["output_ids"] + tail
    on = generate(radix, again, MAX_NEW, rid="dense-after-full")
    off = generate(no_radix, again, MAX_NEW, rid="dense-after-full")
    assert _cached(on) == len(extended) + MAX_NEW - 1  # SGLang inserts a finished request's KV but its last token
    _assert_same_answer(on, off)


def test_both_layouts_share_the_prefix_alike(checkpoint: Path, root: Path, radix: Server) -> None:
    """Bit-identical across layouts (docs/design.md §6), with the prefix taken from the tree on both."""
    first, second = _prompt_pair(seed=25, shared=200)
    with _serve(checkpoint, root, "per_layer", ["--kv-layout", "per-layer"]) as per_layer:
        answers = {}
        for name, server in (("radix", radix), ("per_layer", per_layer)):
            generate(server, first, MAX_NEW, rid="layout-first")
            answers[name] = generate(server, second, MAX_NEW, rid="layout-second")
    assert _cached(answers["radix"]) == _cached(answers["per_layer"]) == 200
    _assert_same_answer(answers["per_layer"], answers["radix"], exact=True)
    assert torch.equal(_keep(root, "per_layer", "layout-second"), _keep(root, "radix", "layout-second"))
    assert _meta(answers["per_layer"])["layout"] == "per-layer" and _meta(answers["per_layer"])["prompt_cached"]


def test_without_fresh_slots_the_prompt_is_packed_in_place_or_served_dense(
    checkpoint: Path, root: Path, no_radix: Server
) -> None:
    """``MADAKV_DEBUG_NO_FRESH_SLOTS`` makes every packed copy find the pool full: a new prompt packs into its own
    slots and is not cached; a prompt whose prefix the tree holds (from a ``full`` request) has only its last W
    tokens of its own, fewer than it keeps, and is served dense."""
    (prompt,) = random_prompts((300,), seed=26)
    env = {"MADAKV_DEBUG_NO_FRESH_SLOTS": "1"}
    with _serve(checkpoint, root, "no_fresh", [], env=env) as server:
        packed = generate(server, prompt, MAX_NEW, rid="in-place")
        again = generate(server, prompt, MAX_NEW, rid="in-place-again")
        full = generate(server, prompt, MAX_NEW, custom={"kv_policy": "full"}, rid="full-first")
        dense = generate(server, prompt, MAX_NEW, rid="dense")
        time.sleep(2)  # idle: SGLang's strict idle check raises on a leak
        assert server.process.poll() is None, server.log()[-3000:]
        log = server.log()
    reference = generate(no_radix, prompt, MAX_NEW, rid="in-place")
    assert _cached(packed) == _cached(again) == 0  # packed in place: nothing went to the tree
    assert not _meta(packed)["prompt_cached"] and _meta(packed)["kept_slots"] == int(BUDGET * len(prompt))
    _assert_same_answer(packed, reference, exact=True)
    assert _cached(dense) == len(prompt) - WINDOW
    assert _meta(dense)["skipped"] == "no room" and _meta(dense)["kept_slots"] == len(prompt)
    _assert_same_answer(dense, full)  # uncompressed: the full cache's answer
    assert "kept whole (no room: no free slots for its kept cells" in log


def _concurrent(server: Server, prompts: list[list[int]], max_new: int, tag: str) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}

    def run(index: int, ids: list[int]) -> None:
        try:
            results[f"{tag}{index}"] = generate(server, ids, max_new, rid=f"{tag}{index}")
        except Exception as err:  # an aborted request may end with an HTTP error
            results[f"{tag}{index}"] = {"error": str(err)}

    threads = [threading.Thread(target=run, args=(i, ids)) for i, ids in enumerate(prompts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return results


MAX_NEW_TIGHT = 32


def _peak_running(log: str) -> int:
    return max((int(v) for v in re.findall(r"#running-req: (\d+)", log)), default=0)


def test_a_tight_pool_gives_up_cached_prompts_and_keeps_its_concurrency(
    checkpoint: Path, root: Path, no_radix: Server
) -> None:
    """Two waves of 10 requests (a shared 200-token document, 100 tokens of question each) on a 1,500-slot pool
    with retractions forced: each prompt holds 30 kept slots plus 32 generated, its dense prompt becomes tree
    cache that the next allocations evict. More requests run at once than whole prompts would fit (1500 / 332 =
    4), answers match a roomy pool's, and aborts and retractions leave the pool balanced."""
    document, *questions = random_prompts((200,) + (100,) * 10, seed=27)
    prompts = [document + q for q in questions]
    env = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "20"}
    tight_args = ["--max-total-tokens", "1500"]
    with _serve(checkpoint, root, "tight", tight_args, env=env) as tight:
        waves = [_concurrent(tight, prompts, MAX_NEW_TIGHT, f"w{wave}-") for wave in range(2)]
        abort = threading.Timer(0.5, lambda: tight.post("/abort_request", {"rid": "w2-3"}))
        abort.start()
        _concurrent(tight, prompts, MAX_NEW_TIGHT, "w2-")
        abort.join()
        time.sleep(3)  # idle: SGLang's strict idle check raises on a leak
        log = tight.log()
        assert tight.process.poll() is None, log[-3000:]
        assert tight.get("/health_generate", timeout=60) is not None
    assert "Leak" not in log and "double free" not in log
    assert sum(int(n) for n in re.findall(r"#retracted_reqs: (\d+)", log)) >= 1, "no request was retracted"
    assert _peak_running(log) >= 6
    for index, ids in enumerate(prompts):
        roomy = generate(no_radix, ids, MAX_NEW_TIGHT, rid=f"roomy-{index}")
        for wave_index, wave in enumerate(waves):
            output = wave[f"w{wave_index}-{index}"]
            assert "error" not in output and finite_logprobs(output), output
            _assert_same_answer(output, roomy)
    hits = [_cached(waves[1][f"w1-{index}"]) for index in range(len(prompts))]
    assert max(hits) >= 200, hits  # the document was still cached for some of the second wave


def test_a_request_that_cuts_between_chunks_bypasses_the_tree(radix: Server) -> None:
    (prompt,) = random_prompts((300,), seed=28)
    chunked = {"kv_prefill_evict": "chunk"}
    first = generate(radix, prompt, MAX_NEW, custom=chunked, rid="bypass-1")
    again = generate(radix, prompt, MAX_NEW, custom=chunked, rid="bypass-2")
    plain = generate(radix, prompt, MAX_NEW, rid="bypass-plain")
    assert _cached(first) == _cached(again) == _cached(plain) == 0  # neither matched nor inserted
    assert not _meta(first)["prompt_cached"] and _meta(plain)["prompt_cached"]
    _assert_same_answer(again, first, exact=True)
