"""The SGLang plugin: flags, refusals, forced settings, stock behaviour under ``--kv-policy full``, per-request
overrides and metrics (madakv_sglang/engine/{plugin,environment,requests,metrics}.py).

Everything that needs SGLang runs in subprocesses of .venv's python (SGLang loads plugins once per process). The
quick ones (CLI runs, the resolution pipeline called in-process on a tiny config) start together in one
module fixture; the two servers (stock, then the plugin with ``--kv-policy full``) run one after the other.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from madakv_sglang.config import Budget, ConfigError, PolicyConfig
from madakv_sglang.engine import environment, metrics
from madakv_sglang.engine.plugin import _after_validate_one_request, _after_verify, config_from_kv_argv, split_kv_argv
from madakv_sglang.engine.requests import request_config
from madakv_sglang.policies.baselines import ADAKV_ALPHA

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
SETUP_HINT = "run scripts/setup.sh (or `make setup`) to create .venv with SGLang and the CPU shims"
PORTS = range(32000, 32100)  # the range this project's tests may bind

TINY_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "torch_dtype": "float32",
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1", "HF_HUB_OFFLINE": "1"}


def sglang_env(plugins: str = "madakv", **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MADAKV_", "PROMETHEUS_")) and k != "PYTHONPATH"}
    env.update(CPU_ENV, SGLANG_PLUGINS=plugins, **extra)
    return env


def spawn(args: list[str], cwd: Path, env: dict[str, str], name: str) -> subprocess.Popen[str]:
    """Output goes to files (``name.out``/``name.err`` in ``cwd``): a full pipe would block a child we only poll."""
    with (cwd / f"{name}.out").open("w") as out, (cwd / f"{name}.err").open("w") as err:
        return subprocess.Popen([str(VENV_PYTHON), *args], cwd=cwd, env=env, text=True, stdout=out, stderr=err)


# ---- the resolution pipeline, in-process in one SGLang subprocess ----

PROBE = textwrap.dedent("""
    import contextlib, io, json, os, sys
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.arg_groups.overrides import resolving_view

    FIELDS = ["attention_backend", "page_size", "disable_radix_cache", "disable_overlap_schedule", "tp_size"]
    cases = json.loads(sys.argv[1])
    out = {}

    def set_env(extra):
        for key in [k for k in os.environ if k.startswith("MADAKV_")]:
            del os.environ[key]
        os.environ.update(extra)

    for name, case in cases.items():
        set_env(case.get("env", {}))
        err, result = io.StringIO(), {}
        try:
            with contextlib.redirect_stderr(err):
                server_args = prepare_server_args(case["argv"])
                server_args.resolve_once()
            cfg = resolving_view(server_args)
            result["outcome"] = "ok"
            result["resolved"] = {f: getattr(cfg, f) for f in FIELDS}
            result["graphs"] = [cfg.cuda_graph_config.decode.backend, cfg.cuda_graph_config.prefill.backend]
            result["resolved_dict"] = repr(server_args.resolved_dict())
            result["declarations"] = repr(server_args._resolved_overrides)
        except SystemExit as e:
            result["outcome"] = f"exit {e.code}"
        except Exception as e:
            result["outcome"] = type(e).__name__
            result["message"] = str(e)
        result["stderr"] = err.getvalue()
        result["env"] = {k: v for k, v in os.environ.items() if k.startswith("MADAKV_")}
        out[name] = result

    if "--with-hooks" in sys.argv:
        import sglang
        from sglang.srt.sampling.sampling_params import SamplingParams
        from madakv_sglang.config import ConfigError
        set_env({"MADAKV_KV_POLICY": "madakv"})
        try:
            sglang.Engine(model_path=cases["stock"]["argv"][1], device="cpu", max_total_tokens=4096,
                          load_format="dummy", skip_tokenizer_init=True, enable_mixed_chunk=True)
            out["engine"] = "started"
        except ConfigError as e:
            out["engine"] = "ConfigError: " + str(e)
        verify = {}
        for policy, custom in [("madakv", {"kv_budget": 0.1, "thinking_budget": 3}), ("madakv", {"kv_budget": 1.5}),
                               ("full", {"kv_policy": "snapkv"}), ("full", {"other": 1})]:
            set_env({"MADAKV_KV_POLICY": policy})
            try:
                SamplingParams(max_new_tokens=4, custom_params=custom).verify(512)
                verify[f"{policy} {custom}"] = "ok"
            except ValueError as e:
                verify[f"{policy} {custom}"] = str(e)
        out["verify"] = verify
    print("JSON:" + json.dumps(out))
""")

BASE_ARGV = [
    "--device",
    "cpu",
    "--max-total-tokens",
    "4096",
    "--load-format",
    "dummy",
    "--skip-tokenizer-init",
    "--random-seed",
    "7",
]
MADAKV = ["--kv-policy", "madakv"]
REFUSALS: dict[str, tuple[list[str], list[str]]] = {  # name -> (extra argv, phrases of the message)
    "mixed_chunk": (MADAKV + ["--enable-mixed-chunk"], ["--enable-mixed-chunk is not supported"]),
    "dp_attention": (MADAKV + ["--dp-size", "2", "--enable-dp-attention"], ["DP attention (--attn-dp-size 2"]),
    "attn_dp_size": (MADAKV + ["--attn-dp-size", "2"], ["DP attention"]),
    "pipeline": (MADAKV + ["--pp-size", "2"], ["pipeline parallelism (--pp-size 2)"]),
    "fp8_kv": (MADAKV + ["--kv-cache-dtype", "fp8_e4m3"], ["--kv-cache-dtype fp8_e4m3"]),
    "fp4_kv": (MADAKV + ["--kv-cache-dtype", "nvfp4"], ["--kv-cache-dtype nvfp4"]),
    "speculative": (MADAKV + ["--speculative-algorithm", "NGRAM"], ["speculative decoding (NGRAM)"]),
    "pd": (MADAKV + ["--disaggregation-mode", "decode"], ["PD disaggregation (--disaggregation-mode decode)"]),
    "hicache": (MADAKV + ["--enable-hierarchical-cache"], ["HiCache"]),
    "sessions": (MADAKV + ["--enable-streaming-session"], ["--enable-streaming-session is not supported"]),
    "tokenizer_workers": (MADAKV + ["--tokenizer-worker-num", "2"], ["--tokenizer-worker-num 2"]),
    "page_size": (MADAKV + ["--page-size", "16"], ["--page-size 16 is not supported", "one token per page"]),
    "split_backend": (MADAKV + ["--prefill-attention-backend", "torch_native"], ["--prefill-attention-backend"]),
    "backend_without_policy": (["--attention-backend", "madakv"], ["needs a compressing policy", "--kv-policy {"]),
    "chunk_without_chunking": (
        MADAKV + ["--kv-prefill-evict", "chunk", "--chunked-prefill-size", "-1"],
        ["--kv-prefill-evict chunk cuts a prompt between its prefill chunks, but chunked prefill is off"],
    ),
    "radix_on_with_chunk_eviction": (
        MADAKV + ["--kv-radix", "on", "--kv-prefill-evict", "chunk", "--chunked-prefill-size", "64"],
        ["--kv-radix on cannot run: --kv-prefill-evict chunk frees prompt slots", "use --kv-radix auto or off"],
    ),
    "radix_on_without_the_tree": (
        MADAKV + ["--kv-radix", "on", "--disable-radix-cache"],
        ["--kv-radix on cannot run: SGLang's settings turn the radix cache off"],
    ),
    "lmcache": (MADAKV + ["--enable-lmcache"], ["--enable-lmcache is not supported", "SGLang's radix tree"]),
    "radix_cache_backend": (
        MADAKV + ["--radix-cache-backend", "lmcache"],
        ["--radix-cache-backend lmcache is not supported"],
    ),
    "two_problems": (
        MADAKV + ["--enable-mixed-chunk", "--pp-size", "2"],
        ["cannot run:", "- --enable-mixed-chunk", "- pipeline parallelism"],
    ),
}
PREFIX_CACHE_ON = "madakv: prefix cache on: prompts share their dense prefix through SGLang's radix tree"
FORCED = {  # name -> (extra argv, resolved fields, log lines expected, log fragments that must not appear)
    "forced": (
        MADAKV + ["--attention-backend", "torch_native"],
        {"attention_backend": "madakv", "page_size": 1, "disable_radix_cache": False, "disable_overlap_schedule": True},
        [
            "madakv: forcing attention_backend=madakv (was torch_native): ",
            PREFIX_CACHE_ON,
            "madakv: forcing disable_overlap_schedule=True (was False): ",
        ],
        ["forcing page_size", "forcing CUDA graphs", "forcing disable_radix_cache"],
    ),  # page size was unset; graphs were off for torch_native; --kv-radix auto keeps the tree
    "radix_off": (
        MADAKV + ["--attention-backend", "torch_native", "--kv-radix", "off"],
        {"disable_radix_cache": True},
        [
            "madakv: forcing attention_backend=madakv (was torch_native): ",
            "madakv: forcing disable_radix_cache=True (was False): --kv-radix off",
            "madakv: forcing disable_overlap_schedule=True (was False): ",
        ],
        ["prefix cache on"],
    ),
    "radix_auto_with_chunk_eviction": (
        MADAKV + ["--attention-backend", "torch_native", "--kv-prefill-evict", "chunk", "--chunked-prefill-size", "64"],
        {"disable_radix_cache": True},
        [
            "madakv: forcing attention_backend=madakv (was torch_native): ",
            "madakv: forcing disable_radix_cache=True (was False): --kv-prefill-evict chunk frees prompt slots",
            "madakv: forcing disable_overlap_schedule=True (was False): ",
        ],
        ["prefix cache on"],
    ),
    "requested": (
        ["--kv-policy", "snapkv", "--attention-backend", "madakv"],
        {"attention_backend": "madakv", "page_size": 1},
        [
            "madakv: dense prefill through torch_native (the platform default)",
            PREFIX_CACHE_ON,
            "madakv: forcing disable_overlap_schedule=True (was False): ",
            "madakv: forcing CUDA graphs off (was decode=full, prefill=disabled): ",
        ],
        ["forcing attention_backend"],
    ),
    "tensor_parallel": (
        MADAKV + ["--tp", "2"],
        {"attention_backend": "madakv", "tp_size": 2},
        [
            "madakv: forcing attention_backend=madakv (was torch_native)",
            PREFIX_CACHE_ON,
            "madakv: forcing disable_overlap_schedule=True (was False): ",
            "madakv: forcing CUDA graphs off (was decode=full, prefill=disabled): ",
        ],
        ["is not supported", "cannot run"],
    ),
    "nothing_to_force": (
        MADAKV
        + [
            "--attention-backend",
            "torch_native",
            "--disable-radix-cache",
            "--disable-overlap-schedule",
            "--page-size",
            "1",
        ],
        {"attention_backend": "madakv", "page_size": 1},
        ["madakv: forcing attention_backend=madakv"],
        ["forcing disable_radix_cache", "forcing disable_overlap_schedule", "forcing page_size", "prefix cache on"],
    ),  # --disable-radix-cache: --kv-radix auto gives way to it
}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_qwen2_config")
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture(scope="module")
def quick_runs(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Start every short SGLang subprocess at once (2-core CI: they overlap their imports), then collect."""
    if not VENV_PYTHON.exists():
        pytest.fail(f"{VENV_PYTHON} does not exist: {SETUP_HINT}", pytrace=False)
    cwd = tmp_path_factory.mktemp("runs")
    base = ["--model-path", str(tiny_config), *BASE_ARGV]
    cases: dict[str, dict[str, Any]] = {"stock": {"argv": base}, "full": {"argv": base + ["--kv-policy", "full"]}}
    cases.update({name: {"argv": base + extra} for name, (extra, *_) in {**REFUSALS, **FORCED}.items()})
    cases["bad_env"] = {"argv": base, "env": {"MADAKV_KV_POLICY": "madakv", "MADAKV_KV_WINDOW": "0"}}
    cases["env_policy"] = {"argv": base, "env": {"MADAKV_KV_POLICY": "streamingllm"}}
    commands = {
        "probe": (["-c", PROBE, json.dumps(cases), "--with-hooks"], sglang_env()),
        "probe_stock": (["-c", PROBE, json.dumps({"stock": cases["stock"]})], sglang_env("none")),
        "help": (["-m", "sglang.launch_server", "--help"], sglang_env()),
        # A model path that does not exist: the refusal must come before SGLang looks at it.
        "cli_refusal": (
            [
                "-m",
                "sglang.launch_server",
                "--model-path",
                str(cwd / "no-such-model"),
                "--kv-policy",
                "snapkv",
                "--enable-mixed-chunk",
                "--port",
                "32099",
            ],
            sglang_env(),
        ),
        "serve_bad_flag": (
            [
                str(VENV_PYTHON.parent / "sglang"),
                "serve",
                str(cwd / "no-such-model"),
                "--kv-policy",
                "madakv",
                "--kv-budget",
                "1.5",
            ],
            sglang_env(),
        ),
    }
    procs = {name: spawn(args, cwd, env, name) for name, (args, env) in commands.items()}
    import psutil

    children: dict[str, set[str]] = {name: set() for name in procs}
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is None:
                try:
                    family = psutil.Process(proc.pid).children(recursive=True)
                    commands = {" ".join(child.cmdline()) or child.name() for child in family}
                    # Library imports run short probes (ldconfig -p, uname); a launch would start Python processes.
                    children[name] |= {command for command in commands if "python" in command}
                except psutil.Error:
                    pass
        time.sleep(0.05)
    results: dict[str, Any] = {}
    for name, proc in procs.items():
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        stdout, stderr = (cwd / f"{name}.out").read_text(), (cwd / f"{name}.err").read_text()
        results[name] = SimpleNamespace(rc=proc.returncode, stdout=stdout, stderr=stderr, children=children[name])
    for name in ("probe", "probe_stock"):
        run = results[name]
        assert run.rc == 0 and "JSON:" in run.stdout, f"{name} failed ({run.rc}):\n{run.stderr[-4000:]}"
        results[name] = json.loads(run.stdout.split("JSON:", 1)[1])
    return results


def test_flags_in_launch_server_help(quick_runs: dict[str, Any]) -> None:
    run = quick_runs["help"]
    assert run.rc == 0, run.stderr[-2000:]
    assert "KV-cache eviction (madakv-sglang plugin):" in run.stdout
    assert "--kv-policy {full,madakv," in run.stdout and "h2o" not in run.stdout.split("KV-cache eviction")[1]
    for flag in ("--kv-budget", "--kv-window", "--kv-head-split", "--kv-adakv-alpha"):
        assert flag in run.stdout
    assert "intel_xpu,madakv}" in run.stdout  # --attention-backend choices


def test_cli_refusal_exits_2_before_the_model_is_read(quick_runs: dict[str, Any]) -> None:
    run = quick_runs["cli_refusal"]
    assert run.rc == 2, run.stderr[-3000:]
    assert "error: madakv: --enable-mixed-chunk is not supported with --kv-policy snapkv" in run.stderr
    assert "Traceback" not in run.stderr and "no-such-model" not in run.stderr  # SGLang never looked for it
    assert not run.children, f"a refused launch started processes: {run.children}"


def test_sglang_serve_takes_the_flags_and_rejects_a_bad_value(quick_runs: dict[str, Any]) -> None:
    run = quick_runs["serve_bad_flag"]
    assert run.rc == 2, run.stderr[-3000:]
    assert "sglang serve: error: argument --kv-budget: " in run.stderr
    assert not run.children


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_unsupported_settings_are_refused(quick_runs: dict[str, Any], name: str) -> None:
    case = quick_runs["probe"][name]
    assert case["outcome"] == "exit 2", case
    for phrase in ["error: madakv: ", *REFUSALS[name][1]]:
        assert phrase in case["stderr"], case["stderr"]


def test_bad_environment_is_refused(quick_runs: dict[str, Any]) -> None:
    case = quick_runs["probe"]["bad_env"]
    assert case["outcome"] == "exit 2" and "window: must be an integer >= 1" in case["stderr"], case


def test_environment_alone_configures_the_policy(quick_runs: dict[str, Any]) -> None:
    case = quick_runs["probe"]["env_policy"]
    assert case["outcome"] == "ok" and case["resolved"]["attention_backend"] == "madakv", case


@pytest.mark.parametrize("name", sorted(FORCED))
def test_forced_settings_and_their_log_lines(quick_runs: dict[str, Any], name: str) -> None:
    _, fields, logged, absent = FORCED[name]
    case = quick_runs["probe"][name]
    assert case["outcome"] == "ok", case
    assert {k: case["resolved"][k] for k in fields} == fields
    assert case["graphs"] == ["disabled", "disabled"]
    assert case["env"]["MADAKV_BASE_BACKEND"] == "torch_native"
    lines = [line for line in case["stderr"].splitlines() if "madakv: " in line]
    for expected in logged:
        assert sum(expected in line for line in lines) == 1, (expected, lines)
    assert len(lines) == len(logged), lines  # one line per forced setting, nothing else
    for fragment in absent:
        assert not any(fragment in line for line in lines), (fragment, lines)


def test_full_policy_resolves_exactly_like_stock(quick_runs: dict[str, Any]) -> None:
    stock = quick_runs["probe_stock"]["stock"]
    for name in ("full", "stock"):  # --kv-policy full, and the plugin loaded without any flag
        case = quick_runs["probe"][name]
        assert case["outcome"] == stock["outcome"] == "ok"
        assert case["resolved_dict"] == stock["resolved_dict"]
        assert case["declarations"] == stock["declarations"]
        assert "madakv" not in case["stderr"].replace("Skipping plugin madakv", "")
        assert "MADAKV_BASE_BACKEND" not in case["env"]
    assert quick_runs["probe"]["full"]["env"]["MADAKV_KV_POLICY"] == "full"


def test_engine_refusal_raises_config_error(quick_runs: dict[str, Any]) -> None:
    assert quick_runs["probe"]["engine"].startswith(
        "ConfigError: madakv: --enable-mixed-chunk is not supported with --kv-policy madakv"
    )


def test_sampling_params_verify_is_hooked(quick_runs: dict[str, Any]) -> None:
    verify = quick_runs["probe"]["verify"]
    assert verify["madakv {'kv_budget': 0.1, 'thinking_budget': 3}"] == "ok"
    assert verify["madakv {'kv_budget': 1.5}"].startswith("custom_params.kv_budget: ")
    assert "start the server with --kv-policy" in verify["full {'kv_policy': 'snapkv'}"].lower()
    assert verify["full {'other': 1}"] == "ok"


# ---- --kv-* flags without SGLang ----


def test_split_kv_argv_keeps_order_and_spellings() -> None:
    argv = ["--model-path", "m", "--kv-policy", "snapkv", "--tp", "2", "--kv-budget=0.1", "--kv_window", "8", "--x"]
    ours, rest = split_kv_argv(argv)
    assert ours == ["--kv-policy", "snapkv", "--kv-budget=0.1", "--kv-window", "8"]
    assert rest == ["--model-path", "m", "--tp", "2", "--x"]
    assert split_kv_argv(["--kv-policy", "--tp", "2"]) == (["--kv-policy"], ["--tp", "2"])


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in [k for k in os.environ if k.startswith("MADAKV_")]:
        monkeypatch.delenv(key)
    return monkeypatch


def test_flags_make_a_config_and_override_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("MADAKV_KV_POLICY", "snapkv")
    clean_env.setenv("MADAKV_KV_WINDOW", "8")
    config = config_from_kv_argv(["--kv-policy", "madakv", "--kv-budget", "64"])
    assert config == PolicyConfig(policy="madakv", budget=64, window=8)
    assert config_from_kv_argv([]) is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kv-policy", "h2o"], "argument --kv-policy: 'h2o' needs the attention of every prompt query"),
        (["--kv-policy", "nope"], "argument --kv-policy: invalid choice: 'nope'"),
        (["--kv-policy", "madakv", "--kv-budget", "0"], "argument --kv-budget: "),
        (["--kv-policy", "madakv", "--kv-budget", "-0.5"], "argument --kv-budget: "),
        (["--kv-policy", "madakv", "--kv-min-reclaim", "1.5"], "argument --kv-min-reclaim: must be in [0, 1), got 1.5"),
        (["--kv-policy", "madakv", "--kv-min-prompt", "-1"], "argument --kv-min-prompt: must be an integer >= 0"),
        (["--kv-policy", "madakv", "--kv-window", "0"], "argument --kv-window: must be an integer >= 1"),
        (["--kv-policy", "madakv", "--kv-hcc", "sideways"], "argument --kv-hcc: invalid choice"),
        (["--kv-policy"], "argument --kv-policy: expected one argument"),
        (["--kv-budget", "0.1"], "--kv-budget set the compressing policies' knobs, but no --kv-policy is given"),
        (
            ["--kv-policy", "streamingllm", "--kv-prefill-evict", "chunk"],
            "argument --kv-prefill-evict: chunk cuts the prompt by the observation window's attention, which policy "
            "'streamingllm' does not use",
        ),
        (["--kv-policy", "madakv", "--kv-prefill-keep", "0.5"], "argument --kv-prefill-keep: must be in [1, 64]"),
        (["--kv-policy", "madakv", "--kv-prefill-split", "half"], "argument --kv-prefill-split: invalid choice"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        config_from_kv_argv(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ---- per-request overrides ----

SERVER = PolicyConfig(policy="madakv", budget="0.2", window=8)


@pytest.mark.parametrize(
    "custom, expected",
    [
        (None, SERVER),
        ({}, SERVER),
        ({"thinking_budget": 5, "other": "x"}, SERVER),
        ({"kv_budget": 0.1}, SERVER.replace(budget="0.1")),
        ({"kv_budget": "0.1"}, SERVER.replace(budget="0.1")),
        ({"kv_budget": 64, "kv_policy": "snapkv"}, SERVER.replace(budget=64, policy="snapkv")),
        ({"kv_policy": "full"}, SERVER.replace(policy="full")),
        ({"kv_mpa": False, "kv_window": 4, "kv_hcc": "paper"}, SERVER.replace(mpa=False, window=4, hcc="paper")),
        ({"kv_budget": None}, SERVER),
        ({"kv_layout": "shared"}, SERVER),  # the server's own layout: not a change
        ({"kv_cap": "none"}, SERVER.replace(cap=None)),
        ({"kv_prefill_evict": "chunk", "kv_prefill_keep": 2}, SERVER.replace(prefill_evict="chunk", prefill_keep=2.0)),
    ],
)
def test_request_config_applies_overrides(custom: dict[str, Any] | None, expected: PolicyConfig) -> None:
    assert request_config(custom, SERVER) == expected
    if not custom or not any(k.startswith("kv_") and v is not None for k, v in custom.items()):
        assert request_config(custom, SERVER) is SERVER


@pytest.mark.parametrize(
    "custom, message",
    [
        ({"kv_budget": 0}, "custom_params.kv_budget: "),
        ({"kv_budget": 1.5}, "custom_params.kv_budget: "),
        ({"kv_sink": -1}, "custom_params.kv_sink: must be an integer >= 0, got -1"),
        ({"kv_window_share": 0}, "custom_params.kv_window_share: must be in (0, 1], got 0.0"),
        ({"kv_window": 3.7}, "custom_params.kv_window: cannot parse '3.7'"),
        ({"kv_window": True}, "custom_params.kv_window: cannot parse 'True'"),
        ({"kv_budget": [0.1]}, "custom_params.kv_budget: expected a number, a string or a boolean, got list"),
        ({"kv_policy": "h2o"}, "custom_params.kv_policy: 'h2o' needs every prompt query's attention"),
        ({"kv_policy": "nope"}, "custom_params.kv_policy: unknown 'nope'"),
        ({"kv_budgett": 0.1}, "custom_params.kv_budgett: unknown setting; known: kv_policy, kv_budget"),
        ({"kv_layout": "per-layer"}, "custom_params.kv_layout: the KV layout is a property of the server's KV pool"),
        ({"kv_layout": "paged"}, "custom_params.kv_layout: must be one of shared, per-layer, got 'paged'"),
        ({"kv_radix": "off"}, "custom_params.kv_radix: the prefix cache is a property of the server"),
        ({"kv_radix": "maybe"}, "custom_params.kv_radix: must be one of auto, on, off, got 'maybe'"),
        (
            {"kv_prefill_evict": "chunk", "kv_policy": "random"},
            "custom_params.kv_prefill_evict: chunk cuts the prompt by the observation window's attention",
        ),
    ],
)
def test_request_config_rejects_bad_overrides(custom: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        request_config(custom, SERVER)
    assert str(error.value).startswith(message), str(error.value)


def test_overrides_on_a_full_server_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"custom_params.kv_policy: .*--kv-policy full\).*Start the server with"):
        request_config({"kv_policy": "madakv"}, environment.server_default())
    assert request_config({"unrelated": 1}, environment.server_default()) == environment.server_default()


def test_request_hooks(clean_env: pytest.MonkeyPatch) -> None:
    _after_verify(None, SimpleNamespace(custom_params={"other": 1}), 512)  # stock server, no kv_* key: passes
    with pytest.raises(ValueError, match="Start the server with --kv-policy"):
        _after_verify(None, SimpleNamespace(custom_params={"kv_budget": 0.1}), 512)
    session = SimpleNamespace(session_id="s1", session_params=None)
    _after_validate_one_request(None, object(), session, [1, 2])  # sessions are fine on a full server
    clean_env.setenv("MADAKV_KV_POLICY", "madakv")
    _after_verify(None, SimpleNamespace(custom_params={"kv_budget": 0.1}), 512)
    with pytest.raises(ValueError, match="sessions are not supported with --kv-policy madakv"):
        _after_validate_one_request(None, object(), session, [1, 2])
    _after_validate_one_request(None, object(), SimpleNamespace(session_id=None, session_params=None), [1])


# ---- settings ----


def test_use_policy_sets_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    assert environment.use_policy(policy="snapkv", budget=0.1, window=16) == PolicyConfig(
        policy="snapkv", budget="0.1", window=16
    )
    assert environment.config_from_env() == PolicyConfig(policy="snapkv", budget="0.1", window=16)
    assert os.environ["MADAKV_KV_POLICY"] == "snapkv" and os.environ["MADAKV_KV_BUDGET"] == "0.1"
    assert environment.env_may_compress()
    environment.use_policy(policy="full")
    assert not environment.is_compressing(environment.config_from_env()) and not environment.env_may_compress()
    with pytest.raises(ConfigError, match="HF path only"):
        environment.use_policy(policy="h2o")
    with pytest.raises(ConfigError, match="budget"):
        environment.use_policy(policy="madakv", budget=-1)


def test_the_server_config_is_parsed_once_per_setting(clean_env: pytest.MonkeyPatch) -> None:
    """Hooks run per request and per batch; they must not parse the settings each time."""
    environment._parse.cache_clear()
    clean_env.setenv("MADAKV_KV_POLICY", "adakv")
    clean_env.setenv("MADAKV_KV_ADAKV_ALPHA", "0.4")
    first = environment.server_config()
    assert all(environment.server_config() is first for _ in range(100))
    assert environment._parse.cache_info().misses == 1
    clean_env.setenv("MADAKV_KV_BUDGET", "0.3")  # the launching process writes its flags once
    assert environment.server_config().budget == Budget.parse("0.3")
    assert environment._parse.cache_info().misses == 2
    assert ADAKV_ALPHA.of(environment.server_config()) == 0.4, "a policy option travels through the environment"


def test_servable_policies_exclude_hf_only() -> None:
    names = environment.servable_policy_names()
    assert names[:2] == ("full", "madakv") and "h2o" not in names
    assert set(names) >= {"snapkv", "adakv", "pyramidkv", "streamingllm", "lookm", "random"}


# ---- metrics ----


def test_metrics_are_a_no_op_without_enable_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    monkeypatch.setattr(metrics, "_metrics", metrics._UNDECIDED)
    metrics.record_compression(100, 30, 12, 0.01, policy="madakv", layout="shared")
    assert metrics._metrics is None


def test_metrics_series_in_a_registry() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    series = metrics.CompressionMetrics({"model_name": "m", "tp_rank": "0"}, registry=registry)
    series.record(100, 30, 12, 0.02, "madakv", "shared")
    series.record(50, 50, 0, 0.001, "madakv", "shared")
    series.record(10, 5, 0, 0.001, "madakv", "per-layer")
    series.record_skip("short prompt", "madakv", "shared")
    text = generate_latest(registry).decode()
    labels = 'layout="shared",model_name="m",policy="madakv",tp_rank="0"'
    for line in (
        f"madakv_compressed_requests_total{{{labels}}} 2.0",
        f"madakv_prompt_slots_total{{{labels}}} 150.0",
        f"madakv_reclaimed_slots_total{{{labels}}} 70.0",
        f"madakv_packing_waste_cells_total{{{labels}}} 12.0",
        f"madakv_compression_seconds_count{{{labels}}} 2.0",
        'madakv_compression_seconds_bucket{layout="shared",le="0.001",model_name="m",policy="madakv",'
        'tp_rank="0"} 1.0',  # the exposition sorts the label names
        f"madakv_compressed_requests_total{{{labels.replace('shared', 'per-layer')}}} 1.0",
        'madakv_skipped_requests_total{layout="shared",model_name="m",policy="madakv",reason="short prompt",'
        'tp_rank="0"} 1.0',
    ):
        assert line in text, text


def test_metrics_export_in_multiprocess_mode(tmp_path: Path) -> None:
    # What SGLang's /metrics does: every process writes to PROMETHEUS_MULTIPROC_DIR, the server aggregates.
    code = textwrap.dedent("""
        from madakv_sglang.engine.metrics import record_compression
        record_compression(100, 30, 12, 0.02, policy="madakv", layout="shared")
        record_compression(40, 10, 3, 0.5, policy="snapkv", layout="shared")
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        print(generate_latest(registry).decode())
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MADAKV_")}
    env.update({metrics.MULTIPROC_ENV: str(tmp_path), "MADAKV_KV_POLICY": "madakv"})
    proc = subprocess.run(
        [str(VENV_PYTHON), "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in (
        'madakv_reclaimed_slots_total{layout="shared",model_name="",policy="madakv",tp_rank="0"} 70.0',
        'madakv_reclaimed_slots_total{layout="shared",model_name="",policy="snapkv",tp_rank="0"} 30.0',
        'madakv_packing_waste_cells_total{layout="shared",model_name="",policy="madakv",tp_rank="0"} 12.0',
        'madakv_compressed_requests_total{layout="shared",model_name="",policy="snapkv",tp_rank="0"} 1.0',
        'madakv_compression_seconds_count{layout="shared",model_name="",policy="madakv",tp_rank="0"} 1.0',
    ):
        assert line in proc.stdout, proc.stdout


# ---- servers: --kv-policy full is stock SGLang ----


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 with seeded random weights (std 0.1, so greedy decoding is not a near-tie everywhere)."""
    from madakv_sglang import tiny_models

    model, _ = tiny_models.qwen2(seed=3)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(path)
    return path


def free_port() -> int:
    from madakv_sglang import server_process

    if os.environ.get(server_process.PORT_RANGE_ENV):  # a shared machine: stay in the range its user was given
        return server_process.free_port()
    for port in PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free port in 32000-32099")


class Server:
    """``python -m sglang.launch_server`` on CPU; stopped with SIGTERM to the launcher and checked gone."""

    def __init__(self, model: Path, log: Path, plugins: str, extra: list[str]) -> None:
        import psutil

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        args = [
            "-m",
            "sglang.launch_server",
            "--model-path",
            str(model),
            "--device",
            "cpu",
            "--attention-backend",
            "torch_native",
            "--disable-overlap-schedule",
            "--max-total-tokens",
            "4096",
            "--mem-fraction-static",
            "0.3",
            "--skip-tokenizer-init",
            "--skip-server-warmup",
            "--random-seed",
            "7",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *extra,
        ]
        with log.open("w") as sink:
            self.proc = subprocess.Popen(
                [str(VENV_PYTHON), *args],
                env=sglang_env(plugins),
                cwd=log.parent,
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.family: list[psutil.Process] = []

    def wait_ready(self, timeout: float = 240) -> None:
        import psutil
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    self.family = psutil.Process(self.proc.pid).children(recursive=True)
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        pytest.fail(f"server not ready in {timeout} s:\n{self.log.read_text()[-4000:]}")

    def generate(self, payload: dict[str, Any]) -> Any:
        import requests

        return requests.post(self.url + "/generate", json=payload, timeout=120)

    def stop(self) -> None:
        import psutil

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        gone, alive = psutil.wait_procs(self.family, timeout=20)
        for child in alive:  # only the processes this server started, by pid
            child.kill()
        assert not alive, f"left behind: {alive}"


@pytest.fixture
def server_factory(tmp_path: Path, tiny_model: Path) -> Iterator[Any]:
    started: list[Server] = []

    def start(name: str, plugins: str, extra: list[str]) -> Server:
        server = Server(tiny_model, tmp_path / f"{name}.log", plugins, extra)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


PROMPTS = [[(7 * i + 3) % 500 + 1 for i in range(40)], [(11 * i + 5) % 500 + 1 for i in range(23)]]
GREEDY = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}


def test_full_policy_server_matches_stock(server_factory: Any) -> None:
    override = {"input_ids": PROMPTS[0], "sampling_params": {**GREEDY, "custom_params": {"kv_budget": 0.1}}}

    stock = server_factory("stock", "none", [])
    stock_out = stock.generate({"input_ids": PROMPTS, "sampling_params": GREEDY})
    assert stock_out.status_code == 200, stock_out.text
    stock_ids = [item["output_ids"] for item in stock_out.json()]
    assert stock.generate(override).status_code == 200  # stock SGLang ignores unknown custom_params
    stock.stop()

    full = server_factory("full", "madakv", ["--kv-policy", "full"])
    full_out = full.generate({"input_ids": PROMPTS, "sampling_params": GREEDY})
    assert full_out.status_code == 200, full_out.text
    assert [item["output_ids"] for item in full_out.json()] == stock_ids
    assert all(len(ids) == GREEDY["max_new_tokens"] for ids in stock_ids)

    refused = full.generate(override)
    assert refused.status_code == 400, refused.text
    assert "custom_params.kv_budget" in refused.text and "--kv-policy" in refused.text
    import requests  # the OpenAI routes pass custom_params (extra_body={"custom_params": ...}) the same way

    completion = requests.post(
        full.url + "/v1/completions",
        timeout=60,
        json={"model": "m", "prompt": PROMPTS[0], "max_tokens": 2, "custom_params": {"kv_policy": "snapkv"}},
    )
    assert completion.status_code == 400 and "custom_params.kv_policy" in completion.text, completion.text
    full.stop()
    log = full.log.read_text()  # the 400 above shows the plugin is loaded; it must have said nothing
    assert not [line for line in log.splitlines() if "madakv: " in line], "a full server must log nothing of ours"


def test_aligned_chunks_end_on_the_stride_grid_or_at_the_prompt_end() -> None:
    from madakv_sglang.engine.admission import aligned_chunk

    assert aligned_chunk(100, 500, 48) == 96  # rounded down to the grid
    assert aligned_chunk(30, 500, 48) == 48  # never empty: a full stride
    assert aligned_chunk(30, 20, 48) == 30  # the chunk that finishes the prompt is whole
    assert aligned_chunk(48, 48, 48) == 48


def test_peak_slots_count_what_a_compressing_request_holds_at_its_peak() -> None:
    from madakv_sglang.engine.admission import peak_slots

    config = PolicyConfig(policy="madakv", budget="0.1", window=8, sink=4)
    # 1,000 prompt tokens, 64 out: the whole prompt during prefill, then B = 100 kept + 64.
    assert peak_slots(1000, 64, config, stride=256) == 1000
    # Chunk eviction with 256-token chunks: the cut size (4B = 400 by default) plus one chunk, then 100 + 64.
    assert peak_slots(1000, 64, config.replace(prefill_evict="chunk"), stride=256) == 656
    chunked = config.replace(prefill_evict="chunk", prefill_keep=1.0)  # cuts of B = 100
    assert peak_slots(1000, 64, chunked, stride=256) == 356
    assert peak_slots(1000, 400, chunked, stride=256) == 500  # a long output outgrows the prefill peak
    assert peak_slots(1000, 64, chunked.replace(prefill_keep=2.0), stride=256) == 456
    assert peak_slots(1000, 64, chunked, stride=None) == 1000  # no chunked prefill: no cut
    # per-layer holds the fullest layer, at most cap (1.25) x B.
    assert peak_slots(1000, 64, config.replace(layout="per-layer"), stride=256) == 1000
    assert peak_slots(1000, 64, chunked.replace(layout="per-layer"), stride=256) == 356
    assert peak_slots(1000, 400, chunked.replace(layout="per-layer"), stride=256) == 525
    # The skip rule keeps a short prompt whole: SGLang's own count.
    assert peak_slots(100, 64, chunked, stride=256) == 164
    # 900 of the 1,000 tokens matched in the prefix tree: 100 new slots during prefill, still B = 100 kept + 64.
    assert peak_slots(1000, 64, config, stride=256, prefix_len=900) == 164
    assert peak_slots(1000, 64, config, stride=256, prefix_len=500) == 500
    assert peak_slots(100, 64, config.replace(min_prompt=256), stride=256, prefix_len=60) == 164  # kept whole


def test_a_prefix_match_leaves_the_window_to_the_request() -> None:
    from madakv_sglang.engine.radix import prefix_limit

    config = PolicyConfig(policy="madakv", budget="0.1", window=8, min_prompt=0)
    assert prefix_limit(300, config, replay_len=None) == 292  # the last W = 8 queries score the prompt
    assert prefix_limit(5, config, replay_len=None) == 0
    assert prefix_limit(310, config, replay_len=300) == 300  # a replay re-prefills its generated positions
    assert prefix_limit(300, config.replace(prefill_evict="chunk"), replay_len=None) == 0  # bypasses the tree
    assert prefix_limit(100, config.replace(min_prompt=256), replay_len=None) is None  # served dense: any prefix


def test_a_failed_hook_installation_stops_the_scheduler_instead_of_serving_half_hooked(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """SGLang's load_plugins logs a plugin's exception and goes on; the error is kept and the backend factory
    raises it, so a compressing server never runs with some of its hooks missing."""
    from madakv_sglang.engine import plugin, reclaim

    def broken() -> None:
        raise NameError("name 'long_prompts' is not defined")  # the mistake that showed the gap

    clean_env.setenv("MADAKV_KV_POLICY", "madakv")
    clean_env.setattr(reclaim, "install_hooks", broken)
    clean_env.setattr(plugin, "_scheduler_hooks_error", None)
    plugin._install_scheduler_hooks()
    with pytest.raises(RuntimeError, match="installing the scheduler hooks failed: NameError: name 'long_prompts'"):
        plugin._create_backend(None)
