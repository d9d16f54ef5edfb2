"""Edges a user hits (issue 20), on a real ``--kv-policy madakv`` server (tiny Qwen2-VL, strict checks on):

1. a bad ``custom_params`` on a streamed request is an HTTP 400 before the stream opens (``/generate`` and the
   OpenAI chat and completions routes), as it is without streaming;
2. a token budget above the model's context length is refused at start-up (exit 2) and per request (400);
3. an empty prompt is a 400 and the server lives (SGLang's own prefill of it kills a Qwen2-VL server);
4. ``python -m sglang.benchmark.serving`` runs as SGLang documents it (the set-up installs ``datasets``);
5. start-up errors name the program that was run;
6. the README says what the debugging settings cost.

One server for the whole module; the start-up refusals are short subprocesses that run while it starts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests

from madakv_sglang import checkpoints
from madakv_sglang.config import ConfigError, PolicyConfig
from madakv_sglang.engine.plugin import _after_validate_one_request
from madakv_sglang.engine.requests import EMPTY_PROMPT, check_generate_input
from madakv_sglang.server_process import CPU_ARGS, CPU_ENV, STRICT_ENV
from tests.sglang_server import Server

ROOT = Path(__file__).resolve().parents[2]
CONTEXT_LEN = checkpoints.MAX_POSITIONS  # the tiny Qwen2-VL checkpoint's max_position_embeddings
MADAKV_ARGS = ["--kv-policy", "madakv", "--kv-budget", "0.2", "--kv-window", "8", "--max-total-tokens", "8192"]
PROMPT = "Tell me a story about a robot who paints flowers in the garden of an old castle by the sea."
GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
EMPTY = "the prompt is empty (0 tokens)"
ABOVE = f"1500000000 tokens is above the model's context length ({CONTEXT_LEN} tokens)"
# An HTTP call that SGLang answers from its tokenizer (no model forward) or with a few CPU decode steps.
HTTP_TIMEOUT = 120


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The dir name contains "qwen2_vl": SGLang picks its qwen2-vl chat template by path.
    return checkpoints.write_checkpoint("qwen2_vl", tmp_path_factory.mktemp("tiny-qwen2_vl"))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MADAKV_KV_")}
    return {**env, **CPU_ENV, **STRICT_ENV}


@pytest.fixture(scope="module")
def startups(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, SimpleNamespace]]:
    """Launches that must be refused before anything is spawned; started together (2-core CI: they overlap
    their imports). Each gets no port, since none of them may get as far as serving."""
    cwd = tmp_path_factory.mktemp("startups")
    launch = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), *CPU_ARGS]
    commands = {
        "budget_above_model": [*launch, "--kv-policy", "madakv", "--kv-budget", "1.5e9"],
        "budget_above_flag": [*launch, "--context-length", "512", "--kv-policy", "snapkv", "--kv-budget", "1024"],
        "bad_flag_launch_server": [*launch, "--kv-policy", "madakv", "--kv-budget", "0"],
    }
    procs = {}
    for name, command in commands.items():
        with (cwd / f"{name}.out").open("w") as out, (cwd / f"{name}.err").open("w") as err:
            procs[name] = subprocess.Popen(command, cwd=cwd, env=_env(), stdout=out, stderr=err, text=True)
    results = {}
    for name, proc in procs.items():
        try:
            proc.wait(timeout=300)  # an SGLang import takes 15-40 s on a loaded 2-core machine; a refusal no more
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        results[name] = SimpleNamespace(rc=proc.returncode, stderr=(cwd / f"{name}.err").read_text())
    yield results


@pytest.fixture(scope="module")
def madakv(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(model, MADAKV_ARGS, tmp_path_factory.mktemp("logs") / "madakv.log") as server:
        yield server


def _post(server: Server, path: str, payload: dict[str, Any]) -> requests.Response:
    return requests.post(server.url + path, json=payload, timeout=HTTP_TIMEOUT, stream=bool(payload.get("stream")))


def _refused(response: requests.Response, *phrases: str) -> None:
    """A 400 with a JSON body (not an event stream) that says each phrase."""
    assert response.status_code == 400, (response.status_code, response.text[:2000])
    assert "text/event-stream" not in response.headers.get("content-type", ""), response.headers
    for phrase in phrases:
        assert phrase in response.text, response.text


def _payloads(custom: dict[str, Any] | None = None, text: str = PROMPT, stream: bool = False) -> dict[str, Any]:
    """The same request on the three routes; ``custom`` as custom_params."""
    sampling: dict[str, Any] = {**GREEDY, **({"custom_params": custom} if custom else {})}
    extra = {"custom_params": custom} if custom else {}
    return {
        "/generate": {"text": text, "sampling_params": sampling, "stream": stream},
        "/v1/completions": {"model": "tiny", "prompt": text, "max_tokens": 4, "stream": stream, **extra},
        "/v1/chat/completions": {
            "model": "tiny",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 4,
            "stream": stream,
            **extra,
        },
    }


def _served(server: Server) -> None:
    """The server still answers a plain request with tokens."""
    out = server.post("/generate", {"text": PROMPT, "sampling_params": GREEDY})
    assert len(out["output_ids"]) == GREEDY["max_new_tokens"], out


# ---- 1. streamed requests with bad overrides ----


@pytest.mark.parametrize("stream", [True, False])
def test_a_bad_override_is_a_400_with_and_without_streaming(madakv: Server, stream: bool) -> None:
    for path, payload in _payloads({"kv_budget": 0}, stream=stream).items():
        _refused(_post(madakv, path, payload), "custom_params.kv_budget: ")
    for path, payload in _payloads({"kv_policy": "h2o"}, stream=stream).items():
        _refused(_post(madakv, path, payload), "custom_params.kv_policy: 'h2o'")


def test_good_streamed_requests_still_stream(madakv: Server) -> None:
    for path, payload in _payloads({"kv_budget": 16}, stream=True).items():
        events = list(madakv.stream(path, payload, timeout=HTTP_TIMEOUT))
        assert events and not any("error" in event for event in events), (path, events)


# ---- 2. token budgets above the context length ----


def test_start_up_refuses_a_budget_above_the_context_length(startups: dict[str, SimpleNamespace]) -> None:
    run = startups["budget_above_model"]
    assert run.rc == 2, run.stderr[-3000:]
    assert f"error: madakv: --kv-budget: {ABOVE}" in run.stderr
    assert "Traceback" not in run.stderr
    flag = startups["budget_above_flag"]  # --context-length is the limit when given
    assert flag.rc == 2, flag.stderr[-3000:]
    assert "--kv-budget: 1024 tokens is above the model's context length (512 tokens)" in flag.stderr


@pytest.mark.parametrize("stream", [True, False])
def test_a_request_budget_above_the_context_length_is_a_400(madakv: Server, stream: bool) -> None:
    # JSON 1.5e9 is a float; Budget.parse reads a whole number above 1 as a token count.
    for path, payload in _payloads({"kv_budget": 1.5e9}, stream=stream).items():
        _refused(_post(madakv, path, payload), f"custom_params.kv_budget: {ABOVE}")
    at_limit = _payloads({"kv_budget": CONTEXT_LEN})["/generate"]
    assert len(madakv.post("/generate", at_limit)["output_ids"]) == GREEDY["max_new_tokens"]


# ---- 3. empty prompts ----


def test_empty_prompts_are_a_400_and_the_server_lives(madakv: Server) -> None:
    cases = {
        "text": {"text": "", "sampling_params": GREEDY},
        "input_ids": {"input_ids": [], "sampling_params": GREEDY},
        "streamed": {"text": "", "sampling_params": GREEDY, "stream": True},
        "batch item": {"text": [PROMPT, ""], "sampling_params": GREEDY},
    }
    for payload in cases.values():
        _refused(_post(madakv, "/generate", payload), EMPTY)
        _served(madakv)
    for stream in (False, True):  # SGLang's own check of the OpenAI request comes first here
        _refused(
            _post(madakv, "/v1/completions", {"model": "tiny", "prompt": "", "max_tokens": 4, "stream": stream}),
            "Prompt cannot be empty",
        )
    _served(madakv)
    assert "Scheduler hit an exception" not in madakv.log()


def test_the_tokenizer_hook_refuses_what_tokenized_to_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chat (or an image request) whose tokens only the tokenizer knows: its AFTER hook has the last word."""
    for key in [k for k in os.environ if k.startswith("MADAKV_")]:
        monkeypatch.delenv(key)
    manager = SimpleNamespace(context_len=CONTEXT_LEN)

    def request(**fields: Any) -> SimpleNamespace:
        return SimpleNamespace(
            **{"session_id": None, "session_params": None, "input_embeds": None, "sampling_params": {}, **fields}
        )

    _after_validate_one_request(None, manager, request(), [])  # a full server runs stock SGLang
    monkeypatch.setenv("MADAKV_KV_POLICY", "madakv")
    with pytest.raises(ValueError, match=re.escape(EMPTY)):
        _after_validate_one_request(None, manager, request(), [])
    _after_validate_one_request(None, manager, request(input_embeds=[[0.0]]), [])  # embeddings carry no ids
    with pytest.raises(ConfigError, match=f"above the model's context length \\({CONTEXT_LEN} tokens\\)"):
        _after_validate_one_request(
            None, manager, request(sampling_params={"custom_params": {"kv_budget": CONTEXT_LEN + 1}}), [1, 2]
        )
    _after_validate_one_request(
        None, manager, request(sampling_params={"custom_params": {"kv_budget": CONTEXT_LEN}}), [1]
    )


def test_check_generate_input_leaves_images_to_the_tokenizer() -> None:
    madakv, full = PolicyConfig(policy="madakv"), PolicyConfig(policy="full")
    check_generate_input(SimpleNamespace(text="", image_data=["a.png"]), madakv, CONTEXT_LEN)
    check_generate_input(SimpleNamespace(text=""), full, CONTEXT_LEN)  # stock SGLang decides there
    check_generate_input(SimpleNamespace(input_ids=[[1], [2, 3]], sampling_params=[{}, {}]), madakv, CONTEXT_LEN)
    with pytest.raises(ValueError, match=re.escape(EMPTY_PROMPT)):
        check_generate_input(SimpleNamespace(input_ids=[[1], []]), madakv, CONTEXT_LEN)
    with pytest.raises(ConfigError, match="custom_params.kv_budget: "):  # the second item's own parameters
        check_generate_input(
            SimpleNamespace(text=["a", "b"], sampling_params=[{}, {"custom_params": {"kv_budget": 0}}]),
            madakv,
            CONTEXT_LEN,
        )


# ---- 4. SGLang's load generator ----


def test_sglang_benchmark_serving_runs_as_documented(madakv: Server, model: Path, tmp_path: Path) -> None:
    result = tmp_path / "result.jsonl"
    env = {**_env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sglang.benchmark.serving",
            "--backend",
            "sglang",
            "--host",
            "127.0.0.1",
            "--port",
            str(madakv.port),
            "--model",
            str(model),
            "--tokenizer",
            str(model),
            "--dataset-name",
            "random-ids",
            "--num-prompts",
            "2",
            "--random-input-len",
            "32",
            "--random-output-len",
            "4",
            "--random-range-ratio",
            "1.0",
            "--request-rate",
            "inf",
            "--seed",
            "1",
            "--output-file",
            str(result),
            "--disable-tqdm",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # the client's imports (~20 s) plus 2 tiny requests, on a loaded 2-core machine
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads(result.read_text().splitlines()[-1])["completed"] == 2


# ---- 5. refusals name the program ----


def test_refusals_name_the_program_that_was_run(startups: dict[str, SimpleNamespace]) -> None:
    run = startups["bad_flag_launch_server"]
    assert run.rc == 2, run.stderr[-3000:]
    assert "python -m sglang.launch_server: error: argument --kv-budget: " in run.stderr
    assert "sglang serve: error" not in run.stderr


# ---- 6. the debugging settings are documented with their cost ----


def test_readme_says_what_the_debugging_settings_cost() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Debugging settings", 1)[1].split("\n#", 1)[0]
    for name in [*STRICT_ENV, "MADAKV_DEBUG_DUMP_DIR"]:
        assert f"`{name}" in section, name
    assert re.search(r"\d+(\.\d+)?x", section), "the measured slow-down"
    assert "python -m benchmarks.strict_cost" in section, "the command that measured it"
