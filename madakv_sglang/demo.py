"""``python -m madakv_sglang.demo``: MadaKV inside a real SGLang server on CPU, answering questions about images.

The model is smol-vl: SmolLM2-135M-Instruct (real pretrained weights, from ``make setup-smollm2``) as the language
model of a Qwen2-VL checkpoint, with the vision side this project trained (``benchmarks/models/smol-vl-vision``),
assembled once by ``benchmarks.build_smol_vl``. The demo starts ``python -m sglang.launch_server`` twice on CPU,
first with ``--kv-policy full`` (stock SGLang), then with ``--kv-policy madakv --kv-budget 0.2``, and sends both
the same requests, as a user would: OpenAI ``/v1/chat/completions`` requests with several images each (data
URLs), a text-only one, a streamed one, and an SGLang frontend program (``sgl.function`` with ``sgl.image`` and
``sgl.gen``). Every question has a known answer: which colour the one shape among several images has (the task
of ``benchmarks.needles.smol`` smol-vl answers, on prompts never trained on), a fact from a story, a fact SmolLM2
knows. It prints each answer with full and with madakv side by side, marked right or wrong, and the KV slots each
prompt would hold uncompressed (n), keeps after eviction (M), and gives back.

The numbers come from the response's ``meta_info["madakv"]`` where SGLang returns one (``/generate``, which the
frontend uses), else from the server's per-request log line (``madakv: request <rid> prompt slots n -> M``).

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

MODEL_DIR_NAME = "smol-qwen2-vl"  # the frontend's chat-template lookup matches "qwen2-vl" in the path too
TINY_MODEL_DIR_NAME = "tiny-qwen2-vl"  # the random tiny Qwen2-VL of the fast benchmarks
IMAGES_DIR_NAME = "demo-images"
IMAGE_SIZE = (224, 224)  # 16x16 patches merged 2x2: 64 image tokens each
NUM_IMAGES = 4
MAX_TOKENS = 12
FRONTEND_CHAT_TEMPLATE = "qwen2-vl"  # sglang.lang's template with Qwen2-VL's image placeholder
MAX_TOTAL_TOKENS = 8192
SEED = 7  # the questions' seed: held out (training seeds start at 1,000,000)
# The text-only chat: a story long enough to be compressed (over --kv-min-prompt), one fact asked about. (The
# suite's key among repeated filler sentences is what SmolLM2-135M fails even with the full cache.)
STORY = (
    "The lighthouse on Gull Point was built in 1874 from grey granite carried over the hills by ox cart, and for "
    "most of its life it was painted in broad red and white bands so that ships could tell it from the church tower "
    "in the village below. Its first keeper was a retired sailor who lasted only one winter. The second, Ada Moss, "
    "came from the fishing town of Penhallow with her two brothers and a dog called Biscuit, and she lit the lamp "
    "every evening for thirty years. She kept a log of every storm, every wreck and every ship that passed, and the "
    "log, twelve leather volumes in all, now sits in the museum at Penhallow. In the great storm of 1891 she rowed "
    "out twice to a schooner on the rocks and brought back five men, for which the town gave her a silver medal. "
    "When the lamp was electrified in 1920 the keepers were sent away, and the house beside the tower was let to "
    "summer visitors, who still write in a guest book that asks them what they saw from the gallery at dusk."
)
# (SmolLM2-135M answers "Who lit the lamp every evening for thirty years?" by retelling the first sentence.)
STORY_QUESTION = "What was the dog called?"
STORY_ANSWER = "Biscuit"
FRONTEND_QUESTION = "What color is the shape in the image?"
FRONTEND_FOLLOW_UP = "Now another question: what is the capital of France?"  # SmolLM2's own knowledge
FRONTEND_FOLLOW_UP_ANSWER = "Paris"


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
    expected: str = ""
    correct: bool = False
    policy: str = ""
    skipped: str | None = None  # why the prompt was kept whole ("short prompt", "small saving"), if it was


# ---- set-up ----


@dataclass(frozen=True)
class Question:
    """One chat request: its OpenAI content parts (text and image data URLs) and the answer it should get."""

    name: str
    content: list[dict[str, Any]]
    images: int
    expected: str
    stream: bool = False


@dataclass(frozen=True)
class Frontend:
    """The frontend program's image, and the answers to its question and follow-up."""

    image: Path
    expected: tuple[str, str]


def prepare(work_dir: Path) -> tuple[Path, list[Question], Frontend]:
    """Assemble smol-vl (once: its stamp is checked) and draw the questions; returns the checkpoint's path.

    Needs a source checkout: the builder and the trained vision weights live under ``benchmarks/``, SmolLM2's
    converted weights under ``.models`` (``make setup-smollm2``).
    """
    try:
        from benchmarks import build_smol_vl
        from benchmarks.needles.smol import SmolConfig, make_smol_sample
    except ImportError as err:
        raise SystemExit(f"the demo runs from a source checkout (it builds smol-vl from benchmarks/): {err}") from None
    if not (build_smol_vl.SMOLLM2_DIR / "model.safetensors").exists():
        raise SystemExit(f"SmolLM2 is not converted at {build_smol_vl.SMOLLM2_DIR}: run `make setup-smollm2`")
    model = build_smol_vl.assemble(work_dir / MODEL_DIR_NAME, vision_path=build_smol_vl.TRAINED_VISION)

    def smol(task: str, images: int, sentences: int, depth: float, haystack: str = "filler") -> Any:
        return make_smol_sample(SmolConfig(task, sentences, images, depth, haystack), SEED)

    # The task smol-vl answers with the full cache (its model card: colour 1.00 held out, and among 8 images in
    # 1.2k tokens of prose; the others it was trained on are far below and would show its limits, not eviction's).
    drawn = [
        ("chat: colour, 1 of 8, prose", smol("colour", 8, 40, 0.3, "prose"), False),
        ("chat: colour, 1 of 4 images", smol("colour", 4, 50, 0.9), False),
        ("chat: text only", None, False),
        ("chat (stream): colour, 1 of 6", smol("colour", 6, 30, 0.6), True),
    ]
    questions = [
        Question(name, s.openai_content(), len(s.images), s.answer, stream)
        if s is not None
        else Question(name, [{"type": "text", "text": STORY + "\n" + STORY_QUESTION}], 0, STORY_ANSWER)
        for name, s, stream in drawn
    ]
    shape = smol("colour", 1, 0, 0.0)
    path = work_dir / IMAGES_DIR_NAME / f"colour-{SEED}.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")  # write beside and rename: never a truncated PNG
        shape.images[0].save(partial, format="PNG")
        partial.replace(path)
    return model, questions, Frontend(path, (shape.answer, FRONTEND_FOLLOW_UP_ANSWER))


def prepare_tiny(work_dir: Path) -> tuple[Path, list[Path]]:
    """The random tiny Qwen2-VL checkpoint and four test images (both idempotent), for the fast benchmarks."""
    from madakv_sglang import checkpoints

    model = checkpoints.write_checkpoint("qwen2_vl", work_dir / TINY_MODEL_DIR_NAME, seed=0)
    images = []
    for index in range(NUM_IMAGES):
        path = work_dir / IMAGES_DIR_NAME / f"image-{index}-{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}.png"
        if not path.is_file():
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

    def __init__(self, server: Server, policy: str, compressing: bool, log_wait: float = 5.0) -> None:
        self.server = server
        self.policy = policy
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
    expected: str,
    response: Any = None,
) -> RequestResult:
    from benchmarks.needles import is_correct

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
        expected=expected,
        correct=is_correct(answer, expected),
        policy=accounts.policy,
        skipped=slots["skipped"],
    )


# ---- the requests ----


def chat(server: Server, accounts: SlotAccounts, question: Question) -> RequestResult:
    """One ``/v1/chat/completions`` request (its response id is SGLang's request id)."""
    payload = {
        "model": "smol-vl",
        "messages": [{"role": "user", "content": question.content}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }
    start = time.monotonic()
    response = server.post("/v1/chat/completions", payload)
    seconds = time.monotonic() - start
    usage = response["usage"]
    return _result(
        accounts,
        question.name,
        "/v1/chat/completions",
        response["id"],
        question.images,
        int(usage["prompt_tokens"]),
        int((usage.get("prompt_tokens_details") or {}).get("image_tokens") or 0),
        seconds,
        response["choices"][0]["message"]["content"] or "",
        question.expected,
        response,
    )


def chat_stream(
    server: Server, accounts: SlotAccounts, question: Question, on_text: Callable[[str], None] | None = None
) -> RequestResult:
    """A streamed ``/v1/chat/completions`` request; the last event carries the usage."""
    payload = {
        "model": "smol-vl",
        "messages": [{"role": "user", "content": question.content}],
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
    return _result(
        accounts,
        question.name,
        "/v1/chat/completions (stream)",
        rid,
        question.images,
        int(usage["prompt_tokens"]),
        int((usage.get("prompt_tokens_details") or {}).get("image_tokens") or 0),
        seconds,
        "".join(pieces),
        question.expected,
    )


def frontend(server: Server, accounts: SlotAccounts, program: Frontend) -> list[RequestResult]:
    """An SGLang frontend program: one image, a question and a follow-up, i.e. two ``sgl.gen`` calls.

    Each ``gen`` is one ``/generate`` request carrying the whole conversation so far. SGLang's
    ``RuntimeEndpoint`` sends at most one image per request, so the program has one; its prompts are shorter
    than ``--kv-min-prompt``, so they are kept whole.
    """
    import sglang as sgl

    from benchmarks.build_smol_vl import SYSTEM_PROMPT

    @sgl.function
    def look_and_follow_up(s: Any, image_path: str, question: str, follow_up: str) -> None:
        s += sgl.system(SYSTEM_PROMPT)
        s += sgl.user_begin()
        s += sgl.image(image_path)
        s += question
        s += sgl.user_end()
        s += sgl.assistant(sgl.gen("answer", max_tokens=MAX_TOKENS, temperature=0))
        s += sgl.user(follow_up)
        s += sgl.assistant(sgl.gen("follow_up", max_tokens=MAX_TOKENS, temperature=0))

    sgl.set_default_backend(sgl.RuntimeEndpoint(server.url, chat_template_name=FRONTEND_CHAT_TEMPLATE))
    start = time.monotonic()
    state = look_and_follow_up.run(
        image_path=str(program.image), question=FRONTEND_QUESTION, follow_up=FRONTEND_FOLLOW_UP
    )
    error = state.error()
    if error is not None:
        raise RuntimeError(f"the frontend program failed: {error}")
    seconds = (time.monotonic() - start) / 2  # the program's two requests, if the server reports no latency
    results = []
    turns = (("answer", "sgl program: colour"), ("follow_up", "sgl program: follow-up"))
    for (var, name), expected in zip(turns, program.expected, strict=True):
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
                expected,
                {"meta_info": meta},
            )
        )
    return results


def run_requests(
    server: Server,
    accounts: SlotAccounts,
    questions: list[Question],
    program: Frontend,
    on_text: Callable[[str], None] | None = None,
) -> list[RequestResult]:
    """The demo's requests, one after another (so each reclaim line belongs to one request)."""
    results: list[RequestResult] = []
    for question in questions:
        say(f"{accounts.policy}: sending {question.name}")
        results.append(
            chat_stream(server, accounts, question, on_text) if question.stream else chat(server, accounts, question)
        )
    say(f"{accounts.policy}: running the frontend program")
    return results + frontend(server, accounts, program)


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


def print_report(config: PolicyConfig, sides: dict[str, list[RequestResult]], timings: dict[str, Any]) -> None:
    """The answers side by side (full, then the compressing policy), then the compressing side's KV slots."""
    print(
        "smol-vl: SmolLM2-135M-Instruct (real weights) with a vision side trained by this project on synthetic "
        "shapes, digits and colours."
    )
    policy = config.policy
    print(
        f"SGLang {_sglang_version()} on CPU; full: stock SGLang; {policy}: --kv-policy {policy} --kv-budget "
        f"{config.budget} (window {config.window}); {MAX_TOKENS} greedy tokens per request.\n"
    )
    names = list(sides)
    rows = list(zip(*sides.values(), strict=True))
    header = f"{'request':<30}{'expected':<10}" + "".join(f"{name:<34}" for name in names)
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = "".join(f"{('right' if r.correct else 'WRONG') + ' ' + repr(r.answer.strip())[:27]:<34}" for r in row)
        print(f"{row[0].name:<30}{row[0].expected:<10}{cells}")
    scores = "".join(f"{f'{sum(r.correct for r in side)}/{len(side)} right':<34}" for side in sides.values())
    print(f"{'':<40}{scores}")

    results = sides[names[-1]]
    header = (
        f"\n{policy + ': request':<30}{'images':>7}{'prompt tokens':>15}{'KV slots full (n)':>19}{'kept (M)':>10}"
        f"{'reclaimed':>11}  numbers from"
    )
    print(header)
    print("-" * (len(header) + 4))
    for r in results:
        note = f" (kept whole: {r.skipped})" if r.skipped else ""
        print(
            f"{r.name:<30}{r.images:>7}{r.prompt_tokens:>15}{r.kv_slots_full:>19}{r.kv_slots_kept:>10}"
            f"{100 * r.reclaimed_fraction:>10.1f}%  {r.source}{note}"
        )
    total = totals(results)
    print(
        f"{'total':<30}{sum(r.images for r in results):>7}{total['prompt_tokens']:>15}{total['kv_slots_full']:>19}"
        f"{total['kv_slots_kept']:>10}{100 * total['reclaimed_fraction']:>10.1f}%"
    )
    if policy == "full":
        print("\nn: the KV-pool slots a prompt holds (one per token). Policy full evicts nothing: M = n.")
    else:
        print(
            "\nn: the KV-pool slots a prompt holds without eviction (one per token). M: the slots it keeps once "
            f"{policy}'s cells, chosen per layer and head, are packed. The n - M others go back to "
            "SGLang's allocator right after prefill. A prompt shorter than --kv-min-prompt "
            f"({config.min_prompt} tokens) is kept whole, as stock SGLang would serve it."
        )
    per_server = "; ".join(
        f"{name}: start {t['server_start_s']:.1f} s, requests {t['requests_s']:.1f} s"
        for name, t in timings["servers"].items()
    )
    print(f"Time: set-up {timings['setup_s']:.1f} s; {per_server}; total {timings['total_s']:.1f} s.")


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
        help="the compressing server's --kv-policy, compared with a stock (full) one (default: madakv; 'full' "
        "runs the full server alone)",
    )
    parser.add_argument("--budget", default="0.2", help="--kv-budget: a ratio of the prompt or tokens (default: 0.2)")
    parser.add_argument("--window", type=int, default=None, help="--kv-window (default: the server's, 32)")
    parser.add_argument(
        "--keep-server-log",
        type=Path,
        metavar="PATH",
        help="keep the servers' logs: full-NAME and POLICY-NAME beside PATH",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help=f"where smol-vl and the frontend's image are written once (default: {default_work_dir()})",
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
    policies = ["full"] if config.policy == "full" else ["full", config.policy]
    sides: dict[str, list[RequestResult]] = {}
    servers: dict[str, dict[str, float]] = {}
    try:
        with _sigterm_as_exception():
            say(f"assembling smol-vl under {work_dir} (once) and drawing the questions")
            model, questions, program = prepare(work_dir)
            setup_s = time.monotonic() - started
            for policy in policies:
                sides[policy], servers[policy] = serve(model, policy, config, args, questions, program)
    except KeyboardInterrupt:
        say("interrupted; the server was stopped")
        return 128 + signal.SIGINT
    except Terminated:
        say("terminated; the server was stopped")
        return 128 + signal.SIGTERM
    timings = {
        "setup_s": round(setup_s, 2),
        "servers": {name: {k: round(v, 2) for k, v in t.items()} for name, t in servers.items()},
        "total_s": round(time.monotonic() - started, 2),
    }
    results = sides[policies[-1]]
    if args.json:
        report = {
            "model": "smol-vl (SmolLM2-135M-Instruct with a trained vision side)",
            "model_path": str(model),
            "policy": config.policy,
            "budget": str(config.budget),
            "window": config.window,
            "max_tokens": MAX_TOKENS,
            **totals(results),
            "accuracy": {name: round(sum(r.correct for r in side) / len(side), 4) for name, side in sides.items()},
            "requests": [asdict(r) for r in results],
            "full_requests": [asdict(r) for r in sides["full"]],
            "timings": timings,
        }
        print(json.dumps(report))
    else:
        print_report(config, sides, timings)
    return 0


def serve(
    model: Path,
    policy: str,
    config: PolicyConfig,
    args: argparse.Namespace,
    questions: list[Question],
    program: Frontend,
) -> tuple[list[RequestResult], dict[str, float]]:
    """Start one server (``policy`` full: stock SGLang; else ``config``'s), send every request, stop it."""
    from madakv_sglang.engine import environment

    server_args = ["--max-total-tokens", str(MAX_TOTAL_TOKENS), "--kv-policy", policy]
    if policy != "full":
        server_args += ["--kv-budget", str(config.budget)]
        if args.window is not None:
            server_args += ["--kv-window", str(args.window)]
    log_keep = (
        None
        if args.keep_server_log is None
        else args.keep_server_log.with_name(f"{policy}-{args.keep_server_log.name}")
    )
    with _log_file(log_keep) as log_path:
        say(
            f"starting python -m sglang.launch_server on CPU ({' '.join(server_args)}); log: "
            f"{log_path if log_keep else 'temporary (--keep-server-log PATH keeps it)'}"
        )
        t0 = time.monotonic()
        with Server(model, server_args, log_path, startup_timeout=args.startup_timeout, port=args.port) as server:
            server_start_s = time.monotonic() - t0
            say(f"server ready at {server.url} after {server_start_s:.1f} s")
            compressing = policy != "full" and environment.is_compressing(config)
            accounts = SlotAccounts(server, policy, compressing=compressing)
            t1 = time.monotonic()
            results = run_requests(server, accounts, questions, program)
            requests_s = time.monotonic() - t1
            say("stopping the server")
            t2 = time.monotonic()
        timing = {"server_start_s": server_start_s, "requests_s": requests_s, "shutdown_s": time.monotonic() - t2}
    return results, timing


if __name__ == "__main__":
    sys.exit(main())
