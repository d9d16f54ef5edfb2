"""Serving throughput and concurrency on a fixed KV pool: ``full`` against compressing policies, measured by
SGLang's own load generator (``python -m sglang.benchmark.serving``).

    python -m benchmarks.serving --policies full madakv:0.1 madakv:0.2 snapkv:0.1 --input-lens 64 256 \\
        --num-prompts 16 --image-count 2 --max-total-tokens 1500 --out benchmarks/results/serving.json

Each configuration (policy x budget x prompt length) gets its own server, started one after another with the
same ``--max-total-tokens`` (so the same pool) and ``--decode-log-interval 1``. Against it SGLang's client sends
``--num-prompts`` requests at once (``--request-rate inf``): ``--dataset-name image`` builds chat prompts with
the model's processor, ``--image-count`` random images of ``--image-resolution`` and ``--random-input-len``
random text tokens each (``random-ids`` for text only), then ``--random-output-len`` tokens with ``ignore_eos``.
The same ``--seed`` gives every configuration the same prompts and images.

Per configuration it reports what SGLang's ``--output-file`` JSON gives (request throughput, output tok/s,
TTFT, TPOT, ITL and E2E latency means and medians) and what the server log shows: the most requests running at
once (``#running-req`` of decode batches; running + new in a prefill batch), the peak KV slots in use (decode
``#token``, prefill ``token usage`` x pool, and madakv's slots before it returned a batch's evicted ones) and
the peak held by running requests (decode ``#token``), retractions, and the slots madakv reclaimed. Every number
is also given as a ratio against ``full`` at the same prompt length, measured in the same run.

``--repeats N`` measures every configuration N times, in rounds whose order alternates (A B C, C B A, ...). Each
ratio is taken within its round, and the table gives the medians with the lowest and highest ratio, so a reader
sees how far the shared machine moved them. A request the server failed (SGLang's client counts a streamed error
as completed) stops the benchmark with the server's message instead of reporting numbers for less work.

Output: ``--out`` (JSON) and a markdown table with the command line, ready for ``benchmarks/RESULTS.md``; the
server and client logs stay in ``--log-dir``. The JSON also keeps SGLang's whole result line per configuration,
the exact client command, and the host's load average around each run: on a shared CPU machine the timings
move with other people's work, the slot and concurrency numbers do not.

On CPU (the default) it serves the tiny random Qwen2-VL of :mod:`madakv_sglang.checkpoints` (224x224 image =
64 visual tokens) through :class:`madakv_sglang.server_process.Server`; the numbers show the mechanism (a compressed
prompt leaves room for more requests), not GPU speed. ``--print-gpu-commands`` prints the same benchmark for a
GPU server with a real model (Qwen2.5-VL-7B, 200 prompts of 4 x 720p images, 64k-slot pool) as shell commands;
``--summarize DIR`` turns their logs and JSON into the same report (each log read from the client's first call).

SGLang 0.5.23's ``sglang.benchmark.serving`` imports ``datasets`` (for its MMMU loader) at start-up; the set-up
installs it (``scripts/requirements-cpu.txt``), and the ``image`` and ``random-ids`` datasets never load from the hub.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import re
import runpy
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from madakv_sglang.log_lines import batch_lines

if TYPE_CHECKING:
    from madakv_sglang.server_process import Server

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# SGLang's --output-file keys we report, each also as a ratio against full.
CLIENT_METRICS = (
    "request_throughput",
    "output_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "mean_itl_ms",
    "median_itl_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "mean_e2e_latency_ms",
    "median_e2e_latency_ms",
)
# From the server log, also as ratios.
SERVER_METRICS = ("peak_running_requests", "peak_kv_slots", "peak_held_kv_slots")
DATASETS = ("image", "random-ids")  # "random" samples ShareGPT text, which needs a download

# --print-gpu-commands (gpu_workload): 4 images of 720p (~1.2k visual tokens each in Qwen2.5-VL) + 512 text
# tokens is ~5.5k tokens a prompt, so a 64k-slot pool holds about 11 uncompressed prompts at once.
GPU_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
GPU_INPUT_LENS = (512, 2048)
GPU_POOL = 65536


# ---- what is compared ----


@dataclass(frozen=True)
class PolicySpec:
    """``full``, ``madakv:0.1``, ``snapkv:512``, ``pyramidkv:0.1:per-layer``, ``madakv:0.1:chunk``,
    ``madakv:0.1:chunk-keep4``, ``madakv:0.1:radix-off``: a ``--kv-policy``, its ``--kv-budget`` (None for full)
    and, optionally, its ``--kv-layout`` (None: the server's default, ``shared``), ``chunk`` for
    ``--kv-prefill-evict chunk`` with ``-keepK`` for ``--kv-prefill-keep K`` (None: the server's default), and
    ``radix-off`` for ``--kv-radix off`` (None: the server's default, ``auto``)."""

    policy: str
    budget: str | None = None
    layout: str | None = None
    prefill_evict: str | None = None
    prefill_keep: str | None = None
    radix: str | None = None

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        from madakv_sglang.config import LAYOUTS, ConfigError
        from madakv_sglang.engine.environment import check_servable
        from madakv_sglang.settings import parse_settings

        name, _, rest = text.partition(":")
        budget, _, tail = rest.partition(":")
        if name == "full":
            if rest:
                raise ConfigError(f"{text!r}: full keeps every token; it takes no budget, layout or chunk")
            return cls("full")
        extras = [part for part in tail.split(":") if part]
        layouts = [part for part in extras if part in LAYOUTS]
        chunks = [match for part in extras if (match := _CHUNK.fullmatch(part))]
        radix = [part for part in extras if part == _RADIX_OFF]
        unknown = [part for part in extras if part not in layouts + radix and not _CHUNK.fullmatch(part)]
        if unknown or len(layouts) > 1 or len(chunks) > 1 or len(radix) > 1:
            raise ConfigError(
                f"{text!r}: after the budget give a layout ({', '.join(LAYOUTS)}), chunk or chunk-keepK, and/or "
                f"{_RADIX_OFF}"
            )
        layout = layouts[0] if layouts else None
        keep = chunks[0].group(1) if chunks else None
        prefill = "chunk" if chunks else None
        values = {"policy": name, "budget": budget or None, "layout": layout, "prefill_evict": prefill}
        config = parse_settings(values | ({"prefill_keep": keep} if keep else {}))
        check_servable(config)
        keep_text = f"{config.prefill_keep:g}" if keep else None
        return cls(name, str(config.budget), layout, prefill, keep_text, "off" if radix else None)

    @property
    def label(self) -> str:
        if self.budget is None:
            return self.policy
        chunk = self.prefill_evict and self.prefill_evict + (f"-keep{self.prefill_keep}" if self.prefill_keep else "")
        parts = [self.policy, self.budget, self.layout, chunk, _RADIX_OFF if self.radix == "off" else None]
        return ":".join(part for part in parts if part)

    def server_args(self, window: int | None = None) -> list[str]:
        if self.budget is None:
            return ["--kv-policy", "full"]
        args = ["--kv-policy", self.policy, "--kv-budget", self.budget]
        args += ["--kv-layout", self.layout] if self.layout else []
        args += ["--kv-prefill-evict", self.prefill_evict] if self.prefill_evict else []
        args += ["--kv-prefill-keep", self.prefill_keep] if self.prefill_keep else []
        args += ["--kv-radix", self.radix] if self.radix else []
        return args + (["--kv-window", str(window)] if window is not None else [])


_CHUNK = re.compile(r"chunk(?:-keep([0-9.]+))?")
_RADIX_OFF = "radix-off"


@dataclass(frozen=True)
class Workload:
    """What SGLang's client sends, identical for every configuration of a run."""

    dataset: str
    num_prompts: int
    output_len: int
    image_count: int
    image_resolution: str
    seed: int
    backend: str = "sglang"  # SGLang's client --backend
    client_entry: str = "benchmarks.serving"  # the module whose run_sglang_client runs the client

    def client_args(self, input_len: int) -> list[str]:
        args = [
            "--dataset-name",
            self.dataset,
            "--num-prompts",
            str(self.num_prompts),
            "--random-input-len",
            str(input_len),
            "--random-output-len",
            str(self.output_len),
            "--random-range-ratio",
            "1.0",  # exact lengths: 0.0 would draw each in [1, len]
            "--request-rate",
            "inf",
            "--seed",
            str(self.seed),
        ]
        if self.dataset == "image":
            args += ["--image-count", str(self.image_count), "--image-resolution", self.image_resolution]
        return args


def gpu_workload() -> Workload:
    return Workload("image", num_prompts=200, output_len=128, image_count=4, image_resolution="720p", seed=0)


def config_name(spec: PolicySpec, input_len: int, round_index: int | None = None) -> str:
    """File stem of one configuration's logs: ``madakv_0.1-in64``, or ``madakv_0.1-in64-r2`` in round 2."""
    stem = f"{spec.label.replace(':', '_')}-in{input_len}"
    return stem if round_index is None else f"{stem}-r{round_index}"


# ---- the server log ----

_DECODE = re.compile(r"Decode batch, #running-req: (\d+), #token: (\d+)")
_PREFILL = re.compile(r"Prefill batch, #new-seq: (\d+), .*?token usage: ([\d.]+), #running-req: (\d+)")
_RETRACT = re.compile(r"#retracted_reqs: (\d+)")
_POOL = re.compile(r"max_total_num_tokens=(\d+)")
# A request that failed inside the server. Streamed, it still ends with HTTP 200, and SGLang's client counts it as
# completed with its full output length (0.5.23 reads no "error" in a stream): only the server log tells.
_ERROR = re.compile(r"\[http_server\] Error: (.*)")


@dataclass
class LogStats:
    """What one server log says about a benchmark run (slots are KV-pool token slots).

    Attributes:
        pool_slots: ``max_total_num_tokens`` SGLang sized the pool to.
        peak_running_requests: most requests running at once (decode ``#running-req``; in a prefill batch the
            running ones plus the new ones).
        peak_kv_slots: most slots in use at any logged point, a prompt's full prefill footprint included
            (madakv: the pool before the batch's evicted slots were returned).
        peak_held_kv_slots: most slots held during a decode batch (decode ``#token``): what running requests keep.
        reclaimed_slots: slots madakv returned to the pool.
        retracted_requests: requests SGLang retracted because the pool was full.
        failed_requests: requests the server answered with an error (``[http_server] Error:`` lines).
        first_error: the first such error's message, or None.
    """

    pool_slots: int
    peak_running_requests: int
    peak_kv_slots: int
    peak_held_kv_slots: int
    reclaimed_slots: int
    retracted_requests: int
    failed_requests: int = 0
    first_error: str | None = None


def parse_server_log(text: str, pool_slots: int | None = None) -> LogStats:
    """Peaks over ``text`` (a slice of an SGLang log written with ``--decode-log-interval 1``).

    ``pool_slots`` defaults to the log's ``max_total_num_tokens``; it scales the prefill lines' ``token usage``.
    """
    if pool_slots is None:
        pools = _POOL.findall(text)
        if not pools:
            raise ValueError("no max_total_num_tokens in the log; pass pool_slots")
        pool_slots = int(pools[-1])
    running, used, held = [0], [0], [0]
    for match in _DECODE.finditer(text):
        running.append(int(match[1]))
        held.append(int(match[2]))
    for match in _PREFILL.finditer(text):
        running.append(int(match[1]) + int(match[3]))
        used.append(round(float(match[2]) * pool_slots))  # two decimals: +-0.5% of the pool
    reclaimed = 0
    for batch in batch_lines(text):
        reclaimed += batch.reclaimed
        used.append(batch.capacity - batch.available + batch.reclaimed)
    errors = _ERROR.findall(text)
    return LogStats(
        pool_slots=pool_slots,
        peak_running_requests=max(running),
        peak_kv_slots=max(used + held),
        peak_held_kv_slots=max(held),
        reclaimed_slots=reclaimed,
        retracted_requests=sum(int(n) for n in _RETRACT.findall(text)),
        failed_requests=len(errors),
        first_error=errors[0].strip() if errors else None,
    )


def check_all_served(name: str, client: dict[str, Any], stats: LogStats, num_prompts: int) -> None:
    """Refuse a measurement in which any request failed: its throughput and slot peaks would describe less work."""
    completed = client.get("completed")
    if stats.failed_requests or completed != num_prompts:
        raise RuntimeError(
            f"{name}: {stats.failed_requests} of {num_prompts} requests failed in the server (first: "
            f"{stats.first_error!r}); SGLang's client reports {completed} completed. No numbers are reported."
        )


# ---- SGLang's client ----


def run_sglang_client(wait: bool = False) -> None:
    """``python -m sglang.benchmark.serving`` with ``sys.argv``.

    ``wait``: import SGLang's client first (seconds of CPU), then start only when a line arrives on stdin, so
    the import overlaps the server's start-up instead of adding to it.
    """
    if wait:
        importlib.import_module("sglang.benchmark.serving")
        if not sys.stdin.readline():
            return  # the benchmark gave up (its server failed to start)
    runpy.run_module("sglang.benchmark.serving", run_name="__main__", alter_sys=True)


def client_command(model: str, port: int, workload: Workload, input_len: int, output_file: Path) -> list[str]:
    """SGLang's client against ``workload.backend`` (``sglang``: ``/generate``, image data URLs, streamed)."""
    return [
        "--backend",
        workload.backend,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        model,
        "--tokenizer",
        model,
        *workload.client_args(input_len),
        "--output-file",
        str(output_file),
        "--disable-tqdm",
    ]


def read_client_result(path: Path) -> dict[str, Any]:
    """The last line SGLang appended to ``--output-file``, without its bulky ``server_info``."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"{path}: SGLang's client wrote no result")
    result = json.loads(lines[-1])
    result.pop("server_info", None)
    return dict(result)


# ---- one run, many configurations ----


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """Give every run ``ratios[metric] = value / full's value`` at the same prompt length in the same round
    (None if undefined)."""
    full = {(run["round"], run["input_len"]): run for run in runs if run["policy"] == "full"}
    for run in runs:
        base = full.get((run["round"], run["input_len"]))
        if base is None:
            raise ValueError(
                f"no full run at input length {run['input_len']} in round {run['round']} "
                f"to compare {run['config']} with"
            )
        ratios: dict[str, float | None] = {}
        for key in (*CLIENT_METRICS, *SERVER_METRICS):
            value, reference = run["metrics"].get(key), base["metrics"].get(key)
            ok = isinstance(value, (int, float)) and isinstance(reference, (int, float)) and reference != 0
            ratios[key] = round(value / reference, 4) if ok and math.isfinite(value / reference) else None
        run["ratios"] = ratios


def summarize_rounds(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration and prompt length, in first-seen order: the median over rounds of every metric
    and of every ratio (each ratio taken within its round), and the lowest and highest ratio."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["config"], run["input_len"]), []).append(run)
    rows = []
    for (config, input_len), group in groups.items():
        first = group[0]
        row: dict[str, Any] = {
            "config": config,
            "policy": first["policy"],
            "budget": first["budget"],
            "input_len": input_len,
            "rounds": len(group),
            "metrics": {},
            "ratios": {},
            "ratio_range": {},
            "server": {"retracted_requests": sum(run["server"]["retracted_requests"] for run in group)},
        }
        for key in first["metrics"]:
            row["metrics"][key] = _median([run["metrics"].get(key) for run in group])
            ratios = [run["ratios"].get(key) for run in group]
            row["ratios"][key] = _median(ratios)
            known = [ratio for ratio in ratios if ratio is not None]
            row["ratio_range"][key] = [min(known), max(known)] if len(known) == len(group) else None
        rows.append(row)
    return rows


def _median(values: list[Any]) -> float | int | None:
    """Median of numbers; None when any is missing (a metric one round lacks has no honest median)."""
    if not values or any(not isinstance(value, (int, float)) for value in values):
        return None
    return statistics.median(values)


def make_run(
    spec: PolicySpec,
    input_len: int,
    client: dict[str, Any],
    stats: LogStats,
    server_args: list[str],
    client_args: list[str],
    round_index: int = 0,
) -> dict[str, Any]:
    client = dict(client)
    load = client.pop("host_load_1m", None)
    metrics = {key: client.get(key) for key in CLIENT_METRICS}
    metrics.update({key: getattr(stats, key) for key in SERVER_METRICS})
    return {
        "config": spec.label,
        "policy": spec.policy,
        "budget": spec.budget,
        "input_len": input_len,
        "round": round_index,
        "completed": client.get("completed"),
        "duration_s": client.get("duration"),
        "total_input_tokens": client.get("total_input_tokens"),
        "total_input_vision_tokens": client.get("total_input_vision_tokens"),
        "total_output_tokens": client.get("total_output_tokens"),
        "host_load_1m": load,
        "metrics": metrics,
        "server": asdict(stats),
        "sglang": client,
        "server_args": server_args,
        "client_command": "python -m sglang.benchmark.serving " + shlex.join(client_args),
    }


def _measure(
    server: Server, client: subprocess.Popen[str], output: Path, timeout: float
) -> tuple[dict[str, Any], LogStats]:
    """Let the waiting client go against ``server``; SGLang's result and the stats of the log it caused."""
    start = len(server.log())  # the client's run only: not the server's own warm-up request
    load_before = os.getloadavg()[0]
    assert client.stdin is not None
    if client.poll() is None:  # else it died importing: report its log below
        client.stdin.write("go\n")
        client.stdin.close()
    try:
        returncode = client.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        client.kill()
        raise
    if returncode != 0:
        tail = output.with_suffix(".client.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{output.stem}: sglang.benchmark.serving exited with {returncode}:\n{tail}")
    time.sleep(0.5)  # the log is written line by line; let the last lines reach the file
    result = read_client_result(output)
    # On a shared machine other work slows a run down: the 1-minute load average says how busy it was.
    result["host_load_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result, parse_server_log(server.log()[start:], pool_slots=server_pool(server))


def server_pool(server: Server) -> int | None:
    pools = _POOL.findall(server.log())
    return int(pools[-1]) if pools else None


def measurement_order(
    specs: list[PolicySpec], input_lens: list[int], repeats: int
) -> list[tuple[int, int, PolicySpec]]:
    """(round, input length, configuration) in the order they are measured.

    Every round measures every configuration; odd rounds go backwards (A B C, C B A, ...), so a drift in the
    machine's load over the run favours no configuration, and each round's ratios compare neighbours in time.
    """
    one_round = [(input_len, spec) for input_len in input_lens for spec in specs]
    order = []
    for round_index in range(repeats):
        for input_len, spec in one_round if round_index % 2 == 0 else one_round[::-1]:
            order.append((round_index, input_len, spec))
    return order


def run_cpu(
    model: Path,
    specs: list[PolicySpec],
    input_lens: list[int],
    workload: Workload,
    pool: int,
    window: int | None,
    extra_server_args: list[str],
    log_dir: Path,
    client_timeout: float,
    repeats: int = 1,
) -> list[dict[str, Any]]:
    """One server after another, each measured alone, ``repeats`` rounds (see :func:`measurement_order`). Two
    overlaps save time without touching a measurement: the client imports while its server starts, and a
    measured server stops while the next one starts (the next measurement waits for it to be gone)."""
    from madakv_sglang.server_process import CPU_ENV, Server, free_port

    runs = []
    stopping: threading.Thread | None = None
    try:
        for round_index, input_len, spec in measurement_order(specs, input_lens, repeats):
            name = config_name(spec, input_len, round_index if repeats > 1 else None)
            server_args = [
                "--max-total-tokens",
                str(pool),
                "--decode-log-interval",
                "1",
                *extra_server_args,
                *spec.server_args(window),
            ]
            if spec.policy == "full":
                # madakv prefills through torch_native on CPU (MADAKV_BASE_BACKEND); full runs the same kernels.
                server_args += ["--attention-backend", "torch_native"]
            port = free_port()
            output = log_dir / f"{name}.jsonl"
            output.unlink(missing_ok=True)
            args = client_command(str(model), port, workload, input_len, output)
            print(f"[serving] {name}: starting the server ({' '.join(server_args)})", file=sys.stderr, flush=True)
            with open(output.with_suffix(".client.log"), "w") as client_log:
                client = subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        f"from {workload.client_entry} import run_sglang_client as r; r(wait=True)",
                        *args,
                    ],
                    cwd=ROOT,
                    env={**os.environ, **CPU_ENV, **OFFLINE_ENV},
                    stdin=subprocess.PIPE,
                    stdout=client_log,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            try:
                server = Server(model, server_args, log_dir / f"{name}.log", port=port)
                try:
                    if stopping is not None:
                        stopping.join()
                    result, stats = _measure(server, client, output, client_timeout)
                finally:
                    stopping = threading.Thread(target=server.stop)
                    stopping.start()
            finally:
                if client.poll() is None:
                    client.kill()
                client.wait()
            if stats.pool_slots != pool:
                raise RuntimeError(f"{name}: SGLang sized the pool to {stats.pool_slots} slots, not {pool}")
            check_all_served(name, result, stats, workload.num_prompts)
            runs.append(make_run(spec, input_len, result, stats, server_args, args, round_index))
            print(
                f"[serving] {name}: {result.get('request_throughput', 0):.2f} req/s, "
                f"peak {stats.peak_running_requests} running, peak {stats.peak_kv_slots} slots",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if stopping is not None:
            stopping.join()
    add_ratios(runs)
    return runs


def summarize_dir(
    directory: Path, specs: list[PolicySpec], input_lens: list[int], num_prompts: int
) -> list[dict[str, Any]]:
    """The report of a ``--print-gpu-commands`` run: ``<config>.log`` and ``<config>.jsonl`` in ``directory``,
    each configuration having sent ``num_prompts`` requests."""
    runs = []
    for input_len in input_lens:
        for spec in specs:
            name = config_name(spec, input_len)
            client = read_client_result(directory / f"{name}.jsonl")
            log = (directory / f"{name}.log").read_text(errors="replace")
            pools = _POOL.findall(log)
            # From the client's first call (its ready check), as the CPU path does: not the server's own warm-up.
            start = max(log.find('"GET /v1/models'), 0)
            stats = parse_server_log(log[start:], pool_slots=int(pools[-1]) if pools else None)
            check_all_served(name, client, stats, num_prompts)
            runs.append(make_run(spec, input_len, client, stats, [], []))
    add_ratios(runs)
    return runs


# ---- report ----


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or (digits == 0 and float(value).is_integer()):
        return str(round(value))
    if digits == 0 and abs(value) < 100:
        digits = 1  # a median of two counts (4.5 requests) keeps its half
    return f"{value:.2g}" if abs(value) < 1 else f"{value:.{digits}f}"  # SGLang's median ITL can be ~0.01 ms


def _cell(row: dict[str, Any], key: str, digits: int = 1) -> str:
    """``value (ratio x)``, and the ratio's range over the rounds when there were several."""
    value = _fmt(row["metrics"].get(key), digits)
    ratio = row["ratios"].get(key)
    if row["policy"] == "full" or ratio is None:
        return value
    spread = row["ratio_range"][key]
    if row["rounds"] > 1 and spread is not None:
        return f"{value} ({ratio:.2f}x, {spread[0]:.2f}-{spread[1]:.2f})"
    return f"{value} ({ratio:.2f}x)"


def _load_note(runs: list[dict[str, Any]]) -> str:
    loads = [value for run in runs for value in run.get("host_load_1m") or []]
    return f" 1-min load average {min(loads):.1f} to {max(loads):.1f} during the runs." if loads else ""


TABLE_COLUMNS = (
    ("req/s", "request_throughput", 2),
    ("out tok/s", "output_throughput", 1),
    ("TTFT mean / median (ms)", ("mean_ttft_ms", "median_ttft_ms"), 0),
    ("ITL mean / median (ms)", ("mean_itl_ms", "median_itl_ms"), 1),
    ("peak running req", "peak_running_requests", 0),
    ("peak KV slots", "peak_kv_slots", 0),
    ("peak held KV slots", "peak_held_kv_slots", 0),
)


def markdown_table(report: dict[str, Any]) -> str:
    """The command line, the setting, and one row per configuration; ratios against full in parentheses.

    With several rounds a cell is the median over the rounds, then the median ratio and its lowest-highest.
    """
    setting = report["setting"]
    prompts = setting["dataset"]
    if prompts == "image":
        prompts += f", {setting['image_count']} x {setting['image_resolution']} images"
    repeats = setting.get("repeats", 1)
    rounds = (
        ""
        if repeats == 1
        else (
            f" Medians over {repeats} rounds (odd rounds in reverse order); each ratio is taken within its round, then"
            " its median and lowest-highest are given."
        )
    )
    lines = [
        "```bash",
        report["command"],
        "```",
        f"{setting['hardware']}; model {setting['model_name']}; pool {setting['max_total_tokens']} KV slots; "
        f"{setting['num_prompts']} prompts at once ({prompts}), {setting['output_len']} output tokens; "
        f"SGLang {setting['sglang']}. Ratios against `full`." + rounds + _load_note(report["runs"]),
        "",
        "| config | input len | " + " | ".join(title for title, _, _ in TABLE_COLUMNS) + " | retracted (all rounds) |",
        "|---|---:|" + "---:|" * len(TABLE_COLUMNS) + "---:|",
    ]
    for row in report["summary"]:
        cells = [row["config"], str(row["input_len"])]
        for _, keys, digits in TABLE_COLUMNS:
            if isinstance(keys, tuple):
                cells.append(" / ".join(_cell(row, key, digits) for key in keys))
            else:
                cells.append(_cell(row, keys, digits))
        cells.append(str(row["server"]["retracted_requests"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gpu_commands(specs: list[PolicySpec], model: str = GPU_MODEL, out_dir: str = "serving-gpu") -> str:
    """Shell commands: for each configuration, a server on one GPU with a fixed pool, SGLang's client, stop."""
    workload, pool = gpu_workload(), GPU_POOL
    lines = [
        f"# One H100/H200, {model}: each configuration on its own server with the same {pool}-slot pool.",
        f"mkdir -p {out_dir}",
    ]
    for input_len in GPU_INPUT_LENS:
        for spec in specs:
            name = config_name(spec, input_len)
            server = [
                "python",
                "-m",
                "sglang.launch_server",
                "--model-path",
                model,
                "--port",
                "30000",
                "--max-total-tokens",
                str(pool),
                "--decode-log-interval",
                "1",
                *spec.server_args(),
            ]
            client = [
                "python",
                "-m",
                "sglang.benchmark.serving",
                "--backend",
                "sglang",
                "--host",
                "127.0.0.1",
                "--port",
                "30000",
                "--model",
                model,
                *workload.client_args(input_len),
                "--output-file",
                f"{out_dir}/{name}.jsonl",
            ]
            lines += [
                f"{shlex.join(server)} > {out_dir}/{name}.log 2>&1 & SERVER=$!",
                "until curl -sf localhost:30000/health > /dev/null; do kill -0 $SERVER || exit 1; sleep 5; done",
                shlex.join(client),
                "kill $SERVER; wait $SERVER",
            ]
    lens = " ".join(str(n) for n in GPU_INPUT_LENS)
    lines.append(
        f"python -m benchmarks.serving --summarize {out_dir} --policies {' '.join(s.label for s in specs)} "
        f"--input-lens {lens} --out {out_dir}/serving.json"
    )
    return "\n".join(lines)


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {platform.machine()}), fp32"


def _policy_specs(texts: Sequence[str]) -> list[PolicySpec]:
    from madakv_sglang.config import ConfigError

    try:
        specs = [PolicySpec.parse(text) for text in texts]
    except ConfigError as error:
        raise SystemExit(f"--policies: {error}") from None
    if not any(spec.policy == "full" for spec in specs):
        raise SystemExit("--policies: include full (every ratio is against it)")
    # full first: its rows come first in the table
    return sorted(dict.fromkeys(specs), key=lambda spec: spec.policy != "full")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--policies",
        nargs="+",
        default=["full", "madakv:0.1", "madakv:0.2", "snapkv:0.1"],
        help="POLICY[:BUDGET[:LAYOUT][:chunk]] each (LAYOUT: shared, the default, or per-layer; chunk: "
        "--kv-prefill-evict chunk); must include full",
    )
    parser.add_argument("--input-lens", nargs="+", type=int, default=[64, 256], help="random text tokens a prompt")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="requests per configuration (default 16; with --summarize, the GPU commands' 200)",
    )
    parser.add_argument("--dataset-name", choices=DATASETS, default="image")
    parser.add_argument("--image-count", type=int, default=2)
    parser.add_argument("--image-resolution", default="224x224", help="HxW or 360p/720p/1080p/4k")
    parser.add_argument("--max-total-tokens", type=int, default=1500, help="KV pool slots, the same for every server")
    parser.add_argument("--kv-window", type=int, default=None, help="--kv-window of the compressing servers")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for every server (repeat; e.g. --server-arg=--chunked-prefill-size=512)",
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="checkpoint dir (default: the tiny random Qwen2-VL, written once)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serving.json"))
    parser.add_argument("--log-dir", type=Path, default=None, help="server and client logs (default: a temp dir)")
    parser.add_argument("--client-timeout", type=float, default=1800.0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of every configuration (odd rounds in reverse order); the table gives medians",
    )
    parser.add_argument(
        "--print-gpu-commands",
        action="store_true",
        help=f"print the benchmark as shell commands for one GPU and {GPU_MODEL}, and exit",
    )
    parser.add_argument(
        "--summarize",
        type=Path,
        default=None,
        metavar="DIR",
        help="report from the logs and JSON that the GPU commands wrote to DIR",
    )
    args = parser.parse_args(argv)
    from madakv_sglang.server_process import exit_on_sigterm

    exit_on_sigterm()
    specs = _policy_specs(args.policies)
    if args.repeats < 1:
        raise SystemExit("--repeats: at least 1")
    if args.repeats != 1 and (args.print_gpu_commands or args.summarize is not None):
        raise SystemExit("--repeats: the GPU commands and --summarize cover one round")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise SystemExit("--num-prompts: at least 1")
    if args.print_gpu_commands:
        print(gpu_commands(specs))
        return 0

    num_prompts = 16 if args.num_prompts is None else args.num_prompts
    workload = Workload(
        args.dataset_name, num_prompts, args.output_len, args.image_count, args.image_resolution, args.seed
    )
    command = "python -m benchmarks.serving " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.summarize is not None:
        workload = gpu_workload()
        workload = replace(workload, num_prompts=workload.num_prompts if args.num_prompts is None else num_prompts)
        runs = summarize_dir(args.summarize, specs, args.input_lens, workload.num_prompts)
        args.max_total_tokens = runs[0]["server"]["pool_slots"]
        model_name, hardware = GPU_MODEL, "GPU (see the logs)"
    else:
        if args.model is None:
            from madakv_sglang import checkpoints
            from madakv_sglang.demo import TINY_MODEL_DIR_NAME, default_work_dir

            args.model = checkpoints.write_checkpoint("qwen2_vl", default_work_dir() / TINY_MODEL_DIR_NAME, seed=0)
        log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="madakv-serving-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        print(f"[serving] logs in {log_dir}", file=sys.stderr, flush=True)
        runs = run_cpu(
            args.model.resolve(),
            specs,
            args.input_lens,
            workload,
            args.max_total_tokens,
            args.kv_window,
            args.server_arg,
            log_dir,
            args.client_timeout,
            args.repeats,
        )
        model_name, hardware = args.model.name, _hardware()

    import sglang

    report = {
        "command": command,
        "setting": {
            "hardware": hardware,
            "model": str(args.model or args.summarize),
            "model_name": model_name,
            "max_total_tokens": args.max_total_tokens,
            "sglang": sglang.__version__,
            "kv_window": args.kv_window,
            "server_args": args.server_arg,
            "repeats": args.repeats,
            **asdict(workload),
        },
        "runs": runs,
        "summary": summarize_rounds(runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    print(f"\n[serving] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
