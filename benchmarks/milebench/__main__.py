"""``python -m benchmarks.milebench --data-dir DIR --server URL [--tasks TN,IEdit,...] [--limit N] [--out F]``.

Prints one line per task (score, count, Few/Medium/Many) and writes the full results, per-sample predictions
included, as JSON to ``--out``. Exits 1 when any request failed (the results are written all the same).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.milebench.data import TASKS
from benchmarks.milebench.prompt import Truncation
from benchmarks.milebench.run import Client, run


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object, e.g. \'{"custom_params": {"kv_budget": 0.1}}\'')
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.milebench", description="MileBench on a running SGLang server (OpenAI chat API)."
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="MileBench root: {Dataset}/{Dataset}.json")
    parser.add_argument("--server", required=True, help="base URL, e.g. http://127.0.0.1:30000")
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma-separated paper abbreviations ({', '.join(f'{k}={v}' for k, v in TASKS.items())})"
        " or MileBench directory names; default: the nine above",
    )
    parser.add_argument("--limit", type=int, help="first N samples of each task")
    parser.add_argument("--adv", action="store_true", help="read {Dataset}-adv.json")
    parser.add_argument("--out", type=Path, default=Path("milebench.json"), help="results JSON (default: %(default)s)")
    parser.add_argument("--model", default="default", help="the request's model field (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=512, help="per answer (MileBench: 512)")
    parser.add_argument(
        "--extra-body",
        type=_json_object,
        default={},
        help='JSON merged into every request, e.g. \'{"custom_params": {"kv_budget": 0.1}}\'',
    )
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: %(default)s)")
    parser.add_argument(
        "--image-transport",
        choices=("data", "file"),
        default="data",
        help="data: base64 data URLs; file: file:// URLs the server opens (same machine)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument(
        "--max-context-tokens",
        type=int,
        help="MileBench's middle truncation to this many prompt tokens (off by default); needs "
        "--tokenizer and --tokens-per-image",
    )
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer (path or cached id) for --max-context-tokens")
    parser.add_argument("--tokens-per-image", type=int, help="tokens one image counts for in truncation")
    args = parser.parse_args(argv)
    if args.max_context_tokens is not None and (args.tokenizer is None or args.tokens_per_image is None):
        parser.error("--max-context-tokens needs --tokenizer and --tokens-per-image")
    if args.concurrency < 1 or (args.limit is not None and args.limit < 1) or args.max_tokens < 1:
        parser.error("--concurrency, --limit and --max-tokens must be >= 1")
    return args


def _truncation(args: argparse.Namespace) -> Truncation | None:
    if args.max_context_tokens is None:
        return None
    from transformers import AutoTokenizer  # only truncation needs it, and it is slow to import

    tokenizer: Any = AutoTokenizer.from_pretrained(args.tokenizer)  # transformers' signatures are wider
    return Truncation(tokenizer, args.max_context_tokens, args.tokens_per_image)


def _fmt(score: float | None) -> str:
    return "-" if score is None else f"{100 * score:.1f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = Client(args.server, args.model, args.max_tokens, args.extra_body, args.image_transport, args.timeout)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    results = run(
        args.data_dir,
        tasks,
        client,
        adv=args.adv,
        limit=args.limit,
        truncation=_truncation(args),
        concurrency=args.concurrency,
        progress=sys.stderr,
    )
    args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(f"{'task':<8} {'dataset':<22} {'metric':<10} {'score':>6} {'n':>5}  Few / Medium / Many")
    for task, result in results["tasks"].items():
        levels = " / ".join(f"{_fmt(v['score'])} ({v['count']})" for v in result["levels"].values())
        print(
            f"{task:<8} {result['dataset']:<22} {result['metric']:<10} {_fmt(result['score']):>6} "
            f"{result['count']:>5}  {levels}"
        )
    print(f"average {_fmt(results['average'])}; results in {args.out}")
    errors = sum(result["errors"] for result in results["tasks"].values())
    if errors:
        print(f"{errors} requests failed; see 'error' in {args.out}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
