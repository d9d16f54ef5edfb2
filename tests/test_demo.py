"""The two demos as a user runs them.

``python -m madakv_sglang.demo --json``: smol-vl served by real SGLang servers on CPU, stock (full) and with madakv
at budget 0.2, the same chat requests with images, a text-only and a streamed one, and a frontend program sent to
both. Its JSON must be self-consistent, agree with the server's own log lines, score every answer against the
expected one, and no server process may outlive it.

``python -m madakv_sglang.demo_hf --json``: every policy on the transformers path, no server.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from benchmarks.build_smol_vl import SMOLLM2_DIR
from benchmarks.needles import is_correct
from madakv_sglang.demo_hf import POLICIES
from madakv_sglang.demo_hf import main as demo_hf_main
from madakv_sglang.log_lines import request_lines

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 0.2
MIN_PROMPT = 256  # the server's default --kv-min-prompt: shorter prompts are kept whole
IMAGE_TOKENS_224 = 64
MARKER_ENV = "MADAKV_TEST_DEMO_RUN"
TOTAL_KEYS = ("prompt_tokens", "kv_slots_full", "kv_slots_kept", "reclaimed_fraction", "policy", "budget", "requests")
REQUEST_KEYS = (
    "name",
    "policy",
    "expected",
    "correct",
    "api",
    "rid",
    "images",
    "prompt_tokens",
    "image_tokens",
    "kv_slots_full",
    "kv_slots_kept",
    "reclaimed_slots",
    "reclaimed_fraction",
    "source",
    "answer",
    "skipped",
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not (SMOLLM2_DIR / "model.safetensors").exists():
        pytest.skip(f"SmolLM2 weights not converted at {SMOLLM2_DIR}: run `make setup-smollm2`")
    work = tmp_path_factory.mktemp("demo")
    log = work / "server.log"
    command = [
        sys.executable,
        "-m",
        "madakv_sglang.demo",
        "--json",
        "--work-dir",
        str(work / "models"),
        "--keep-server-log",
        str(log),
    ]
    # Every process the demo starts inherits this variable, so the test can find any that outlive it.
    marker = f"{MARKER_ENV}={uuid.uuid4().hex}"
    env = {**os.environ, MARKER_ENV: marker.partition("=")[2]}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    logs = {policy: (work / f"{policy}-server.log").read_text(errors="replace") for policy in ("full", "madakv")}
    return {"stdout": result.stdout, "stderr": result.stderr, "logs": logs, "marker": marker}


@pytest.fixture(scope="module")
def report(demo_run: dict[str, Any]) -> dict[str, Any]:
    lines = demo_run["stdout"].strip().splitlines()
    assert len(lines) == 1, f"--json must print exactly one line on stdout, got {len(lines)}"
    parsed: dict[str, Any] = json.loads(lines[0])
    return parsed


def test_json_has_the_totals_and_every_request(report: dict[str, Any]) -> None:
    assert all(key in report for key in TOTAL_KEYS), sorted(report)
    assert (report["policy"], report["budget"]) == ("madakv", str(BUDGET))
    requests = report["requests"]
    assert all(key in r for r in requests for key in REQUEST_KEYS)
    apis = {r["api"] for r in requests}
    assert {"/v1/chat/completions", "/v1/chat/completions (stream)", "sgl.function -> /generate"} <= apis
    assert any(r["images"] == 0 for r in requests), "a text-only request"
    assert max(r["images"] for r in requests) >= 3, "a request with several images"
    assert all(isinstance(r["answer"], str) and r["answer"] for r in requests)


def test_both_servers_answer_the_same_questions_and_are_scored(report: dict[str, Any]) -> None:
    full, compressed = report["full_requests"], report["requests"]
    assert [r["name"] for r in full] == [r["name"] for r in compressed]
    assert {r["policy"] for r in full} == {"full"} and {r["policy"] for r in compressed} == {"madakv"}
    for side in (full, compressed):
        for r in side:
            assert r["expected"] and r["correct"] == is_correct(r["answer"], r["expected"]), r
    for key, side in (("full", full), ("madakv", compressed)):
        assert report["accuracy"][key] == round(sum(r["correct"] for r in side) / len(side), 4)
    for r in full:
        assert (r["kv_slots_kept"], r["source"]) == (r["kv_slots_full"], "uncompressed")
    # The full cache answers the demo's questions: they are drawn from the suite its vision side was trained on,
    # on held-out seeds (the model card reports >= 0.9 on every task). One miss is allowed, not more.
    assert sum(r["correct"] for r in full) >= len(full) - 1, [(r["name"], r["answer"]) for r in full]


def test_totals_add_up(report: dict[str, Any]) -> None:
    requests = report["requests"]
    for key in ("prompt_tokens", "kv_slots_full", "kv_slots_kept"):
        assert report[key] == sum(r[key] for r in requests), key
    assert report["kv_slots_kept"] < report["kv_slots_full"]


def test_each_request_is_compressed_within_its_budget(report: dict[str, Any]) -> None:
    for r in report["requests"]:
        n, m = r["kv_slots_full"], r["kv_slots_kept"]
        assert r["prompt_tokens"] == n, r["name"]  # one slot per prompt token before eviction
        assert r["image_tokens"] == IMAGE_TOKENS_224 * r["images"], r["name"]
        if n < MIN_PROMPT:
            assert (m, r["skipped"]) == (n, "short prompt"), r["name"]
            continue
        assert r["skipped"] is None, r["name"]
        # HCC spends exactly L*H*B cells (its caps are above H*B), and under the shared layout (the default) a
        # request holds ceil(sum of cells / (L*H)) slots: exactly B.
        assert m == math.ceil(BUDGET * n), r["name"]
        assert r["reclaimed_slots"] == n - m
        assert r["source"] in ("meta_info", "server log")


def test_numbers_agree_with_the_server_log(report: dict[str, Any], demo_run: dict[str, Any]) -> None:
    """The report reads meta_info; the server's log line is written by other code, so it is the oracle."""
    assert not request_lines(demo_run["logs"]["full"]), "the full server evicts nothing and logs no reclaim line"
    lines = request_lines(demo_run["logs"]["madakv"])
    logged = {line.rid: (line.prompt_slots, line.kept_slots) for line in lines}
    percent = {line.rid: line.reclaimed_pct for line in lines}
    for r in report["requests"]:
        assert logged.get(r["rid"]) == (r["kv_slots_full"], r["kv_slots_kept"]), r["name"]
        # The log prints one decimal of a percent, the report four decimals of a fraction.
        expected = percent.get(r["rid"], 0.0) / 100
        assert r["reclaimed_fraction"] == pytest.approx(expected, abs=5e-4 + 1e-9), r["name"]
    full = sum(logged[r["rid"]][0] for r in report["requests"])
    kept = sum(logged[r["rid"]][1] for r in report["requests"])
    assert report["reclaimed_fraction"] == pytest.approx(1 - kept / full, abs=5e-5 + 1e-9)  # 4 decimals


def test_server_is_gone(demo_run: dict[str, Any]) -> None:
    """Every process started for the demo (launcher, scheduler, detokenizer) ended with it."""
    marker = demo_run["marker"].encode()
    survivors = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                survivors.append(environ.parent.name)
        except OSError:
            continue
    assert not survivors, f"processes left running by the demo: {survivors}"
    assert "Traceback" not in demo_run["stderr"], demo_run["stderr"][-4000:]


def test_hf_demo_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_hf_main(["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    by_policy = {row["policy"]: row for row in rows}
    assert tuple(by_policy) == POLICIES
    assert by_policy["full"]["reclaimed_fraction"] == 0.0 and by_policy["full"]["matches_full"]
    assert by_policy["madakv"]["kv_bytes_kept"] < by_policy["madakv"]["kv_bytes_full"]
    assert by_policy["madakv"]["reclaimed_fraction"] == pytest.approx(1 - BUDGET, abs=0.05)
