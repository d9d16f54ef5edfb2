"""``python -m madakv_sglang.demo``: MadaKV inside a real SGLang server on CPU, serving a tiny Qwen2-VL.

Writes (once) a random-weight Qwen2-VL checkpoint and a few test images, starts
``python -m sglang.launch_server --kv-policy madakv --kv-budget 0.2`` on CPU, and sends what a user would:
OpenAI ``/v1/chat/completions`` requests with several images each (data URLs), a text-only one, a streamed
one, and an SGLang frontend program (``sgl.function`` with ``sgl.image`` and ``sgl.gen``). For each request it
shows the KV slots the prompt would hold uncompressed (n), the slots it keeps after eviction (M) and the
reclaimed share; then it stops the server (also on Ctrl-C, SIGTERM or an error).

The numbers come from the response's ``meta_info["madakv"]`` where SGLang returns one (``/generate``, which the
frontend uses), else from the server's per-request log line (``madakv: request <rid> prompt slots n -> M``).
The model's weights are random: its answers are gibberish by construction.

The transformers-path demo (every policy, no server) is ``python -m madakv_sglang.demo_hf``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from madakv_sglang.config import ConfigError, PolicyConfig
from madakv_sglang.log_lines import request_lines
from madakv_sglang.server_process import Server

MODEL_KIND = "qwen2_vl"
MODEL_DIR_NAME = "tiny-qwen2-vl"  # the frontend's chat-template lookup matches "qwen2-vl" in the path too
IMAGES_DIR_NAME = "demo-images"
IMAGE_SIZE = (224, 224)  # 16x16 patches merged 2x2: 64 image tokens each
NUM_IMAGES = 4
MAX_TOKENS = 16
FRONTEND_CHAT_TEMPLATE = "qwen2-vl"  # sglang.lang's template with Qwen2-VL's image placeholder
MAX_TOTAL_TOKENS = 8192

QUESTION_4 = "Compare these four pictures. Which colours come back in every one of them, and where?"
QUESTION_2 = "Here are two more pictures. Describe the first one, then say how the second one differs."
QUESTION_STREAM = "Look at these three pictures and tell me a short story that connects them."
TEXT_ONLY = (
    "Tell me a story about a robot who wants to learn how to paint flowers in the garden of an old castle. "
    "Once upon a time, there was a little girl who lived in a village by the sea with her grandmother. Every "
    "morning she walked to the market to buy bread, milk, eggs and fresh fruit for breakfast. One day she met the "
    "robot at the gate of the castle, holding a brush and a pot of red paint. What did they say to each other, "
    "and what did they paint together before the sun went down?"
)
FRONTEND_QUESTION = "What is in this picture? Answer in one sentence."
FRONTEND_FOLLOW_UP = "Now describe the colours in the top left corner of the same picture."


def default_work_dir() -> Path:
    """Where the checkpoint and images go: ``$MADAKV_CACHE``, else ``<repo>/.models`` in a source checkout
    (git-ignored, shared with ``make setup-smollm2``), else ``~/.cache/madakv-sglang``."""
    if os.environ.get("MADAKV_CACHE"):
        return Path(os.environ["MADAKV_CACHE"])
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / ".models"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "madakv-sglang"


@dataclass
class RequestResult:
    """One request's numbers. ``kv_slots_full`` is n (the prompt's slots without eviction), ``kv_slots_kept`` M."""

    name: str
    api: str
    rid: str
    images: int
    prompt_tokens: int
    image_tokens: int
    kv_slots_full: int
    kv_slots_kept: int
    reclaimed_slots: int
    reclaimed_fraction: float
    packing_waste_cells: int
    source: str  # "meta_info", "server log", or "uncompressed" (policy full: nothing is evicted)
    seconds: float
    answer: str
    skipped: str | None = None  # why the prompt was kept whole ("short prompt", "small saving"), if it was


# ---- set-up ----


def prepare(work_dir: Path) -> tuple[Path, list[Path]]:
    """Write the tiny Qwen2-VL checkpoint and the test images (both idempotent); returns their paths."""
    from madakv_sglang import checkpoints

    model = checkpoints.write_checkpoint(MODEL_KIND, work_dir / MODEL_DIR_NAME, seed=0)
    images = []
    for index in range(NUM_IMAGES):
        path = work_dir / IMAGES_DIR_NAME / f"image-{index}-{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}.png"
        if not path.is_file():
            # Write beside and rename, so an interrupted run never leaves a truncated PNG behind.
            partial = checkpoints.write_test_image(path.with_suffix(".partial"), size=IMAGE_SIZE, seed=index)
            partial.replace(path)
        images.append(path)
    return model, images


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


# ---- where the slot numbers come from ----


def reported_summary(response: Any) -> dict[str, Any] | None:
    """``meta_info["madakv"][0]`` (or a top-level ``madakv``) when the response carries one."""
    if not isinstance(response, dict):
        return None
    meta = response.get("meta_info")
    entries = meta.get("madakv") if isinstance(meta, dict) else None
    entries = entries if entries is not None else response.get("madakv")
    if isinstance(entries, list) and entries and isinstance(entries[0], dict):
        return entries[0]
    return entries if isinstance(entries, dict) else None


def logged_summaries(log_text: str) -> dict[str, dict[str, Any]]:
    """Every ``madakv: request ...`` line of a server log, by request id (a reused id: its last line)."""
    return {
        line.rid: {
            "prompt_slots": line.prompt_slots,
            "kept_slots": line.kept_slots,
            "reclaimed_slots": line.prompt_slots - line.kept_slots,
            "packing_waste_cells": line.waste_cells,
            "skipped": line.skip_reason,
        }
        for line in request_lines(log_text)
    }


class SlotAccounts:
    """Turns a finished request into its (n, M) numbers: meta_info first, the server log second."""

    def __init__(self, server: Server, compressing: bool, log_wait: float = 5.0) -> None:
        self.server = server
        self.compressing = compressing
        self.log_wait = log_wait

    def numbers(self, rid: str, prompt_tokens: int, response: Any = None) -> tuple[dict[str, Any], str]:
        summary = reported_summary(response)
        if summary is not None:
            counts: dict[str, Any] = {
                key: int(summary[key])
                for key in ("prompt_slots", "kept_slots", "reclaimed_slots", "packing_waste_cells")
            }
            return {**counts, "skipped": summary.get("skipped")}, "meta_info"
        if self.compressing:
            # The line is logged when the prefill's result is processed, before the response; the wait only
            # covers the log file catching up.
            deadline = time.monotonic() + self.log_wait
            while True:
                logged = logged_summaries(self.server.log()).get(rid)
                if logged is not None:
                    return logged, "server log"
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            say(f"warning: no madakv line for request {rid} in the server log; counting it as uncompressed")
        full = {
            "prompt_slots": prompt_tokens,
            "kept_slots": prompt_tokens,
            "reclaimed_slots": 0,
            "packing_waste_cells": 0,
            "skipped": None,
        }
        return full, "uncompressed"


def _result(
    accounts: SlotAccounts,
    name: str,
    api: str,
    rid: str,
    images: int,
    prompt_tokens: int,
    image_tokens: int,
    seconds: float,
    answer: str,
    response: Any = None,
) -> RequestResult:
    slots, source = accounts.numbers(rid, prompt_tokens, response)
    n, m = slots["prompt_slots"], slots["kept_slots"]
    return RequestResult(
        name=name,
        api=api,
        rid=rid,
        images=images,
        prompt_tokens=prompt_tokens,
        image_tokens=image_tokens,
        kv_slots_full=n,
        kv_slots_kept=m,
        reclaimed_slots=slots["reclaimed_slots"],
        reclaimed_fraction=round(1 - m / n, 4) if n else 0.0,
        packing_waste_cells=slots["packing_waste_cells"],
        source=source,
        seconds=round(seconds, 3),
        answer=answer,
        skipped=slots["skipped"],
    )


# ---- the requests ----


def _chat_messages(question: str, images: list[Path]) -> list[dict[str, Any]]:
    if not images:
        return [{"role": "user", "content": question}]
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in images]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def chat(server: Server, accounts: SlotAccounts, name: str, question: str, images: list[Path]) -> RequestResult:
    """One ``/v1/chat/completions`` request; its response id is SGLang's request id."""
    payload = {
        "model": "tiny",
        "messages": _chat_messages(question, images),
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }
    start = time.monotonic()
    response = server.post("/v1/chat/completions", payload)
    seconds = time.monotonic() - start
    usage = response["usage"]
    image_tokens = int((usage.get("prompt_tokens_details") or {}).get("image_tokens") or 0)
    return _result(
        accounts,
        name,
        "/v1/chat/completions",
        response["id"],
        len(images),
        int(usage["prompt_tokens"]),
        image_tokens,
        seconds,
        response["choices"][0]["message"]["content"] or "",
        response,
    )


def chat_stream(
    server: Server,
    accounts: SlotAccounts,
    name: str,
    question: str,
    images: list[Path],
    on_text: Callable[[str], None] | None = None,
) -> RequestResult:
    """A streamed ``/v1/chat/completions`` request; the last event carries the usage."""
    payload = {
        "model": "tiny",
        "messages": _chat_messages(question, images),
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.monotonic()
    rid, pieces, usage = "", [], None
    for event in server.stream("/v1/chat/completions", payload):
        rid = event.get("id") or rid
        usage = event.get("usage") or usage
        for choice in event.get("choices", []):
            text = (choice.get("delta") or {}).get("content")
            if text:
                pieces.append(text)
                if on_text is not None:
                    on_text(text)
    seconds = time.monotonic() - start
    if usage is None:
        raise RuntimeError("the streamed chat ended without a usage event")
    image_tokens = int((usage.get("prompt_tokens_details") or {}).get("image_tokens") or 0)
    return _result(
        accounts,
        name,
        "/v1/chat/completions (stream)",
        rid,
        len(images),
        int(usage["prompt_tokens"]),
        image_tokens,
        seconds,
        "".join(pieces),
    )


def frontend(server: Server, accounts: SlotAccounts, image: Path) -> list[RequestResult]:
    """An SGLang frontend program: one image, a question and a follow-up, i.e. two ``sgl.gen`` calls.

    Each ``gen`` is one ``/generate`` request carrying the whole conversation so far (the radix cache, which
    would share the first turn's prefix, is off under eviction). SGLang's ``RuntimeEndpoint`` sends at most
    one image per request, so the program has one.
    """
    import sglang as sgl

    @sgl.function
    def look_and_follow_up(s: Any, image_path: str, question: str, follow_up: str) -> None:
        s += sgl.system("You are a helpful assistant.")
        s += sgl.user_begin()
        s += sgl.image(image_path)
        s += question
        s += sgl.user_end()
        s += sgl.assistant(sgl.gen("answer", max_tokens=MAX_TOKENS, temperature=0))
        s += sgl.user(follow_up)
        s += sgl.assistant(sgl.gen("follow_up", max_tokens=MAX_TOKENS, temperature=0))

    sgl.set_default_backend(sgl.RuntimeEndpoint(server.url, chat_template_name=FRONTEND_CHAT_TEMPLATE))
    start = time.monotonic()
    state = look_and_follow_up.run(image_path=str(image), question=FRONTEND_QUESTION, follow_up=FRONTEND_FOLLOW_UP)
    error = state.error()
    if error is not None:
        raise RuntimeError(f"the frontend program failed: {error}")
    seconds = (time.monotonic() - start) / 2  # the program's two requests, if the server reports no latency
    results = []
    for var, name in (("answer", "sgl program: question"), ("follow_up", "sgl program: follow-up")):
        meta = state.get_meta_info(var)
        results.append(
            _result(
                accounts,
                name,
                "sgl.function -> /generate",
                str(meta["id"]),
                1,
                int(meta["prompt_tokens"]),
                int(meta.get("image_tokens") or 0),
                float(meta.get("e2e_latency") or seconds),
                str(state[var]),
                {"meta_info": meta},
            )
        )
    return results


def run_requests(
    server: Server, accounts: SlotAccounts, images: list[Path], on_text: Callable[[str], None] | None = None
) -> list[RequestResult]:
    """The demo's requests, one after another (so each reclaim line belongs to one request)."""
    steps: list[tuple[str, Callable[[], list[RequestResult]]]] = [
        ("chat with 4 images", lambda: [chat(server, accounts, "chat: 4 images", QUESTION_4, images[:4])]),
        ("chat with 2 images", lambda: [chat(server, accounts, "chat: 2 images", QUESTION_2, images[2:4])]),
        ("text-only chat", lambda: [chat(server, accounts, "chat: text only", TEXT_ONLY, [])]),
        (
            "streamed chat with 3 images",
            lambda: [chat_stream(server, accounts, "chat (stream): 3 images", QUESTION_STREAM, images[:3], on_text)],
        ),
        ("frontend program", lambda: frontend(server, accounts, images[0])),
    ]
    results: list[RequestResult] = []
    for label, step in steps:
        say(f"sending: {label}")
        results.extend(step())
    return results


# ---- output ----


def say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def totals(results: list[RequestResult]) -> dict[str, Any]:
    full = sum(r.kv_slots_full for r in results)
    kept = sum(r.kv_slots_kept for r in results)
    return {
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "kv_slots_full": full,
        "kv_slots_kept": kept,
        "reclaimed_slots": full - kept,
        "reclaimed_fraction": round(1 - kept / full, 4) if full else 0.0,
    }


def print_report(config: PolicyConfig, results: list[RequestResult], timings: dict[str, float]) -> None:
    print("Tiny Qwen2-VL with RANDOM weights: the answers are gibberish by construction; the KV numbers are the point.")
    print(
        f"SGLang {_sglang_version()} on CPU, --kv-policy {config.policy} --kv-budget {config.budget} "
        f"(window {config.window}), {MAX_TOKENS} greedy tokens per request.\n"
    )
    for r in results:
        print(f"  {r.name:<25} {r.answer!r}")
    header = (
        f"\n{'request':<25}{'images':>7}{'prompt tokens':>15}{'KV slots full (n)':>19}{'kept (M)':>10}"
        f"{'reclaimed':>11}  numbers from"
    )
    print(header)
    print("-" * (len(header) + 4))
    for r in results:
        note = f" (kept whole: {r.skipped})" if r.skipped else ""
        print(
            f"{r.name:<25}{r.images:>7}{r.prompt_tokens:>15}{r.kv_slots_full:>19}{r.kv_slots_kept:>10}"
            f"{100 * r.reclaimed_fraction:>10.1f}%  {r.source}{note}"
        )
    total = totals(results)
    print(
        f"{'total':<25}{sum(r.images for r in results):>7}{total['prompt_tokens']:>15}{total['kv_slots_full']:>19}"
        f"{total['kv_slots_kept']:>10}{100 * total['reclaimed_fraction']:>10.1f}%"
    )
    if config.policy == "full":
        print("\nn: the KV-pool slots a prompt holds (one per token). Policy full evicts nothing: M = n.")
    else:
        print(
            "\nn: the KV-pool slots a prompt holds without eviction (one per token). M: the slots it keeps once "
            f"{config.policy}'s cells, chosen per layer and head, are packed. The n - M others go back to "
            "SGLang's allocator right after prefill. A prompt shorter than --kv-min-prompt "
            f"({config.min_prompt} tokens) is kept whole, as stock SGLang would serve it."
        )
    print(
        f"Time: set-up {timings['setup_s']:.1f} s, server start {timings['server_start_s']:.1f} s, requests "
        f"{timings['requests_s']:.1f} s, shutdown {timings['shutdown_s']:.1f} s; total {timings['total_s']:.1f} s."
    )


def _sglang_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return "(not installed)"


# ---- main ----


class Terminated(Exception):
    """SIGTERM arrived."""


@contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C does, so the server's context manager stops it."""

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _log_file(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.parent.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="madakv-demo-") as tmp:
        yield Path(tmp) / "server.log"


def parse_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> PolicyConfig:
    from madakv_sglang.engine import environment
    from madakv_sglang.settings import parse_settings

    try:
        config = parse_settings({"policy": args.policy, "budget": args.budget, "window": args.window})
        environment.check_servable(config)
    except ConfigError as err:
        parser.error(str(err))
    return config


def main(argv: list[str] | None = None) -> int:
    from madakv_sglang.engine import environment

    parser = argparse.ArgumentParser(prog="python -m madakv_sglang.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--policy",
        default="madakv",
        choices=environment.servable_policy_names(),
        help="--kv-policy of the server (default: madakv; 'full' runs stock SGLang)",
    )
    parser.add_argument("--budget", default="0.2", help="--kv-budget: a ratio of the prompt or tokens (default: 0.2)")
    parser.add_argument("--window", type=int, default=None, help="--kv-window (default: the server's, 32)")
    parser.add_argument("--keep-server-log", type=Path, metavar="PATH", help="write the server's log here and keep it")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help=f"where the checkpoint and images are written once (default: {default_work_dir()})",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="server port (default: a free one; MADAKV_PORT_RANGE=LOW-HIGH limits the choice)",
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the server")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress on stderr)")
    args = parser.parse_args(argv)
    config = parse_config(parser, args)
    work_dir = args.work_dir or default_work_dir()

    started = time.monotonic()
    try:
        with _sigterm_as_exception():
            say(f"writing the tiny Qwen2-VL checkpoint and {NUM_IMAGES} images under {work_dir} (once)")
            model, images = prepare(work_dir)
            setup_s = time.monotonic() - started
            server_args = [
                "--max-total-tokens",
                str(MAX_TOTAL_TOKENS),
                "--kv-policy",
                config.policy,
                "--kv-budget",
                str(config.budget),
            ]
            if args.window is not None:
                server_args += ["--kv-window", str(args.window)]
            with _log_file(args.keep_server_log) as log_path:
                say(
                    f"starting python -m sglang.launch_server on CPU ({' '.join(server_args)}); log: "
                    f"{log_path if args.keep_server_log else 'temporary (--keep-server-log PATH keeps it)'}"
                )
                t0 = time.monotonic()
                with Server(
                    model, server_args, log_path, startup_timeout=args.startup_timeout, port=args.port
                ) as server:
                    server_start_s = time.monotonic() - t0
                    say(f"server ready at {server.url} after {server_start_s:.1f} s")
                    accounts = SlotAccounts(server, compressing=environment.is_compressing(config))
                    t1 = time.monotonic()
                    results = run_requests(server, accounts, images)
                    requests_s = time.monotonic() - t1
                    say("stopping the server")
                    t2 = time.monotonic()
                shutdown_s = time.monotonic() - t2
    except KeyboardInterrupt:
        say("interrupted; the server was stopped")
        return 128 + signal.SIGINT
    except Terminated:
        say("terminated; the server was stopped")
        return 128 + signal.SIGTERM
    timings = {
        "setup_s": setup_s,
        "server_start_s": server_start_s,
        "requests_s": requests_s,
        "shutdown_s": shutdown_s,
        "total_s": time.monotonic() - started,
    }
    timings = {key: round(value, 2) for key, value in timings.items()}
    if args.json:
        report = {
            "model": "tiny Qwen2-VL (random weights)",
            "model_path": str(model),
            "policy": config.policy,
            "budget": str(config.budget),
            "window": config.window,
            "max_tokens": MAX_TOKENS,
            **totals(results),
            "requests": [asdict(r) for r in results],
            "timings": timings,
        }
        print(json.dumps(report))
    else:
        print_report(config, results, timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
