"""The prefix cache with a compressing policy (``--kv-radix``) on a tight pool: multi-turn image chats and many
questions over one multimodal document, driven through SGLang's load generator (``sglang.benchmark.serving``).

    python -m benchmarks.prefix_cache --workload chat --policies full madakv:0.1 madakv:0.1:radix-off \\
        --max-total-tokens 2500 --repeats 2 --out benchmarks/results/prefix-cache/chat.json

Workloads (the same trace, from ``--seed``, for every configuration):

- ``chat``: ``--conversations`` chats run at once, ``--turns`` turns each. Turn 1 holds ``--images`` random 224x224
  images (64 visual tokens each on the tiny Qwen2-VL) and ``--first-words`` words; every later turn adds a
  question of ``--question-words`` words to the whole conversation so far, the model's own answers included
  (SGLang's multi-turn replay). Cold: the turn-1 requests; warm: the later turns, whose prompt extends the
  previous turn's.
- ``document``: ``--documents`` documents of ``--images`` images and ``--first-words`` words, ``--questions``
  questions each, sent at once in question-major order (every document's first question, then every second...).
  Cold: each document's first question; warm: the others.

All requests are sent at once (a chat's next turn as soon as its previous one is answered), so TTFT includes the
wait in the queue; ``--max-concurrency 1`` sends one request at a time, so TTFT is the prefill alone.

Per configuration: SGLang's request throughput and TTFT (mean over the cold and over the warm requests, from the
per-request TTFTs of ``--output-details``), its cache hit rate (``--cache-report``: cached prompt tokens over all
prompt tokens, as the server reports them with ``--enable-cache-report``), and from the server log the most
requests running at once, the peak slots held by running requests and the retractions. Ratios against ``full``
come from the same round; ``--repeats N`` alternates the order of the configurations and reports medians with
their range, as ``benchmarks.serving`` does, whose runner this reuses.

The trace is a JSONL file of conversations that the client loads in place of its ``openai`` dataset (SGLang's
loader computes a prompt length with the tokenizer's chat template, which cannot take a list of rounds).
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import shlex
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import serving
from benchmarks.serving import PolicySpec, Workload

SERVER_ARGS = ["--enable-cache-report"]  # the OpenAI usage block then carries each request's cached tokens
_DETAIL_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors", "cached_tokens")


@dataclass(frozen=True)
class TraceWorkload(Workload):
    """A trace file for SGLang's client: ``rows`` conversations, ``num_prompts`` requests in all, and for each
    request in the client's order whether it is the first to see its context (``cold``)."""

    trace_path: str = ""
    rows: int = 0
    cold: tuple[bool, ...] = ()
    max_concurrency: int | None = None

    def client_args(self, input_len: int) -> list[str]:
        limit = [] if self.max_concurrency is None else ["--max-concurrency", str(self.max_concurrency)]
        return limit + [
            "--dataset-name",
            "openai",
            "--dataset-path",
            self.trace_path,
            "--num-prompts",
            str(self.rows),
            "--request-rate",
            "inf",
            "--seed",
            str(self.seed),
            "--warmup-requests",
            "0",  # a warm-up conversation would fill the tree before the measurement
            "--cache-report",
            "--output-details",
        ]


def _image_part(path: Path) -> dict[str, Any]:
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def _words(rng: random.Random, count: int) -> str:
    from benchmarks.strict_cost import WORDS

    return " ".join(rng.choice(WORDS) for _ in range(count)).capitalize() + "."


def _images(directory: Path, count: int, seed: int) -> list[Path]:
    from madakv_sglang.checkpoints import write_test_image

    return [
        write_test_image(directory / f"image-{seed}-{i}.png", (224, 224), seed=seed * 1000 + i) for i in range(count)
    ]


def chat_trace(args: argparse.Namespace, directory: Path) -> tuple[list[dict[str, Any]], list[bool]]:
    """Rows of ``--turns`` rounds (the first with the images) and, per request in order, whether it is cold."""
    rng = random.Random(args.seed)
    rows, cold = [], []
    for chat in range(args.conversations):
        images = _images(directory, args.images, args.seed * 100 + chat)
        first = [*map(_image_part, images), {"type": "text", "text": _words(rng, args.first_words)}]
        later = [_words(rng, args.question_words) for _ in range(args.turns - 1)]
        rows.append({"rounds": [[{"role": "user", "content": first}], *later], "output_len": args.output_len})
        cold += [True] + [False] * (args.turns - 1)
    return rows, cold


def document_trace(args: argparse.Namespace, directory: Path) -> tuple[list[dict[str, Any]], list[bool]]:
    """One single-round row per question, question-major, and whether each is its document's first."""
    rng = random.Random(args.seed)
    documents = [
        ([*map(_image_part, _images(directory, args.images, args.seed * 100 + d))], _words(rng, args.first_words))
        for d in range(args.documents)
    ]
    rows, cold = [], []
    for question in range(args.questions):
        for images, text in documents:
            content = [*images, {"type": "text", "text": f"{text}\n\nQuestion: {_words(rng, args.question_words)}"}]
            rows.append({"rounds": [[{"role": "user", "content": content}]], "output_len": args.output_len})
            cold.append(question == 0)
    return rows, cold


def _trace_dataset() -> type:
    from sglang.benchmark.datasets.common import BaseDataset, DatasetRow

    @dataclass
    class TraceDataset(BaseDataset):  # type: ignore[misc]
        """Our trace as SGLang's client rows: a list of rounds is its multi-turn form (one round: one request)."""

        dataset_path: str
        num_requests: int

        @classmethod
        def from_args(cls, args: Any) -> TraceDataset:
            return cls(dataset_path=args.dataset_path, num_requests=args.num_prompts)

        def load(self, tokenizer: Any, model_id: Any = None) -> list[Any]:
            lines = Path(self.dataset_path).read_text().splitlines()
            rows = [json.loads(line) for line in lines if line.strip()][: self.num_requests]
            # prompt_len is a placeholder: the client takes each request's length from the server's usage block.
            return [DatasetRow(prompt=row["rounds"], prompt_len=1, output_len=row["output_len"]) for row in rows]

    return TraceDataset


def run_sglang_client(wait: bool = False) -> None:
    """SGLang's client with the trace in place of its ``openai`` dataset (``TraceWorkload.client_entry``)."""
    from sglang.benchmark import datasets

    datasets.DATASET_MAPPING["openai"] = _trace_dataset()
    serving.run_sglang_client(wait)


def turn_metrics(run: dict[str, Any], cold: list[bool]) -> dict[str, Any]:
    """Cold and warm TTFT means, the cache hit rates and the retractions of one run; its bulky per-request lists
    dropped."""
    client = run["sglang"]
    ttfts = client.get("ttfts") or []
    if len(ttfts) != len(cold):
        raise RuntimeError(f"{run['config']}: {len(ttfts)} TTFTs for {len(cold)} requests")

    def mean_ms(values: list[float]) -> float | None:
        return round(statistics.fmean(values) * 1e3, 1) if values else None

    cached = client.get("cached_tokens") or [0] * len(cold)
    prompts = client.get("input_lens") or [0] * len(cold)
    metrics = {
        "cold_ttft_ms": mean_ms([t for t, c in zip(ttfts, cold, strict=True) if c]),
        "warm_ttft_ms": mean_ms([t for t, c in zip(ttfts, cold, strict=True) if not c]),
        "cache_hit_pct": (client.get("cache_report") or {}).get("cache_hit_rate_pct"),
        "warm_hit_pct": round(
            100
            * sum(h for h, c in zip(cached, cold, strict=True) if not c)
            / max(1, sum(p for p, c in zip(prompts, cold, strict=True) if not c)),
            2,
        ),
        "retracted_requests": run["server"]["retracted_requests"],
    }
    for key in _DETAIL_KEYS + ("cached_tokens_details",):
        client.pop(key, None)
    return metrics


METRICS = (
    ("request_throughput", "req/s", 2),
    ("cold_ttft_ms", "cold TTFT ms", 0),
    ("warm_ttft_ms", "warm TTFT ms", 0),
    ("cache_hit_pct", "cache hit %", 1),
    ("warm_hit_pct", "warm hit %", 1),
    ("peak_running_requests", "peak running", 0),
    ("peak_held_kv_slots", "peak held slots", 0),
    ("retracted_requests", "retractions", 0),
)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: the median of every metric over the rounds, and of its ratio against full's in the same
    round, with the lowest and highest ratio."""
    rows = []
    for config in dict.fromkeys(run["config"] for run in runs):
        mine = [run for run in runs if run["config"] == config]
        row: dict[str, Any] = {"config": config, "rounds": len(mine)}
        for key, _, _ in METRICS:
            values = [run["metrics"][key] for run in mine if run["metrics"].get(key) is not None]
            row[key] = statistics.median(values) if values else None
            fulls = {r["round"]: r["metrics"].get(key) for r in runs if r["config"] == "full"}
            ratios = [
                run["metrics"][key] / fulls[run["round"]]
                for run in mine
                if run["metrics"].get(key) is not None and fulls.get(run["round"])
            ]
            row[f"{key}_ratio"] = (statistics.median(ratios), min(ratios), max(ratios)) if ratios else None
        rows.append(row)
    return rows


def markdown_table(report: dict[str, Any]) -> str:
    lines = [f"`{report['command']}`", "", "| config | " + " | ".join(label for _, label, _ in METRICS) + " |"]
    lines.append("|---" * (len(METRICS) + 1) + "|")
    for row in report["summary"]:
        cells = [row["config"]]
        for key, _, digits in METRICS:
            value, ratio = row[key], row[f"{key}_ratio"]
            text = "n/a" if value is None else f"{value:.{digits}f}"
            if ratio is not None and row["config"] != "full":
                median, low, high = ratio
                text += f" ({median:.2f}x" + (f", {low:.2f}-{high:.2f}" if low != high else "") + ")"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prefix_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("chat", "document"), default="chat")
    parser.add_argument("--policies", nargs="+", default=["full", "madakv:0.1", "madakv:0.1:radix-off"])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--documents", type=int, default=2)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--first-words", type=int, default=150)
    parser.add_argument("--question-words", type=int, default=20)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-total-tokens", type=int, default=2500)
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="SGLang's client sends at most this many requests at once (1: TTFT without queueing)",
    )
    parser.add_argument("--kv-window", type=int, default=None)
    parser.add_argument("--server-arg", action="append", default=[], help="an extra server flag (repeatable)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client-timeout", type=float, default=1800.0)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: the tiny Qwen2-VL)")
    parser.add_argument("--log-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prefix-cache.json"))
    args = parser.parse_args(argv)
    specs = [PolicySpec.parse(text) for text in args.policies]
    if "full" not in [spec.label for spec in specs]:
        parser.error("--policies must include full: every ratio is against it")
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="madakv-prefix-cache-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    rows, cold = (chat_trace if args.workload == "chat" else document_trace)(args, log_dir)
    trace = log_dir / f"{args.workload}-trace.jsonl"
    trace.write_text("".join(json.dumps(row) + "\n" for row in rows))
    workload = TraceWorkload(
        dataset="openai",
        num_prompts=len(cold),
        output_len=args.output_len,
        image_count=args.images,
        image_resolution="224x224",
        seed=args.seed,
        backend="sglang-oai-chat",
        client_entry="benchmarks.prefix_cache",
        trace_path=str(trace),
        rows=len(rows),
        cold=tuple(cold),
        max_concurrency=args.max_concurrency,
    )
    if args.model is None:
        from madakv_sglang import checkpoints
        from madakv_sglang.demo import TINY_MODEL_DIR_NAME, default_work_dir

        args.model = checkpoints.write_checkpoint("qwen2_vl", default_work_dir() / TINY_MODEL_DIR_NAME, seed=0)
    print(f"[prefix-cache] {len(rows)} conversations, {len(cold)} requests; logs in {log_dir}", file=sys.stderr)
    runs = serving.run_cpu(
        args.model.resolve(),
        specs,
        [args.first_words],
        workload,
        args.max_total_tokens,
        args.kv_window,
        SERVER_ARGS + args.server_arg,
        log_dir,
        args.client_timeout,
        args.repeats,
    )
    for run in runs:
        run["metrics"].update(turn_metrics(run, cold))
    import sglang

    setting = asdict(workload) | {"cold": None, "max_total_tokens": args.max_total_tokens, "sglang": sglang.__version__}
    report = {
        "command": "python -m benchmarks.prefix_cache " + shlex.join(sys.argv[1:] if argv is None else argv),
        "setting": setting
        | {
            key: getattr(args, key)
            for key in ("workload", "conversations", "turns", "documents", "questions", "first_words", "question_words")
        },
        "hardware": serving._hardware(),
        "runs": runs,
        "summary": summarize(runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(markdown_table(report))
    print(f"\n[prefix-cache] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
