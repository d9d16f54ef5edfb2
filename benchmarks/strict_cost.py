"""What the engine tests' debugging settings cost: the same requests against two ``--kv-policy madakv`` servers
(the demo's tiny Qwen2-VL on CPU), one plain and one with :data:`madakv_sglang.server_process.STRICT_ENV` (SGLang's
strict memory check after every batch, its KV page invariants, madakv's NaN poisoning).

    python -m benchmarks.strict_cost --rounds 3 --out benchmarks/results/strict_cost.json

Both servers run at once, idle servers sleep (``--sleep-on-idle``), and the timed passes alternate between them
(plain, strict, plain, ...), so a change in the machine's load during the run reaches both alike. A pass sends
the requests one after the other (image chats and text prompts, greedy, a fixed number of new tokens). The
report: each server's median and fastest pass, and the median over rounds of strict / plain within a round
(on a shared machine the fastest passes and the per-round ratios are the least disturbed numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from madakv_sglang.server_process import STRICT_ENV, Server, exit_on_sigterm

SERVER_ARGS = ["--kv-policy", "madakv", "--kv-budget", "0.2", "--kv-window", "8", "--max-total-tokens", "8192"]
WORDS = [
    "the",
    "robot",
    "walked",
    "through",
    "the",
    "garden",
    "of",
    "the",
    "old",
    "castle",
    "and",
    "painted",
    "every",
    "flower",
    "it",
    "found",
    "there",
    "while",
    "the",
    "children",
    "watched",
    "from",
    "the",
    "window",
    "and",
    "the",
    "sun",
    "went",
    "down",
    "behind",
    "the",
    "hills",
]


def requests_for(images: list[Path], count: int, max_new: int) -> list[tuple[str, dict[str, Any]]]:
    """``count`` requests: every other one a chat with one image, the rest ~200-token text prompts."""
    from madakv_sglang.demo import data_url

    out: list[tuple[str, dict[str, Any]]] = []
    for index in range(count):
        text = " ".join(WORDS[(index + i) % len(WORDS)] for i in range(180))
        if index % 2 == 0:
            content = [
                {"type": "image_url", "image_url": {"url": data_url(images[index % len(images)])}},
                {"type": "text", "text": "Describe the picture. " + text[:200]},
            ]
            out.append(
                (
                    "/v1/chat/completions",
                    {
                        "model": "tiny",
                        "messages": [{"role": "user", "content": content}],
                        "temperature": 0,
                        "max_tokens": max_new,
                        "ignore_eos": True,
                    },
                )
            )
        else:
            out.append(
                (
                    "/generate",
                    {
                        "text": text,
                        "sampling_params": {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True},
                    },
                )
            )
    return out


def timed_pass(server: Server, batch: list[tuple[str, dict[str, Any]]]) -> float:
    start = time.perf_counter()
    for path, payload in batch:
        server.post(path, payload)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.strict_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8, help="requests per pass (default 8)")
    parser.add_argument("--max-new", type=int, default=16, help="new tokens per request (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per server (default 3)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    exit_on_sigterm()

    from madakv_sglang.demo import default_work_dir, prepare_tiny

    model, images = prepare_tiny(default_work_dir())
    batch = requests_for(images, args.requests, args.max_new)
    times: dict[str, list[float]] = {"plain": [], "strict": []}
    with (
        tempfile.TemporaryDirectory(prefix="strict_cost-") as logs,
        Server(model, SERVER_ARGS, Path(logs) / "plain.log", strict=False) as plain,
        Server(model, SERVER_ARGS, Path(logs) / "strict.log", strict=True) as strict,
    ):
        servers = {"plain": plain, "strict": strict}
        for server in servers.values():
            timed_pass(server, batch[:2])  # warm-up: first-call costs are not what is measured
        for _ in range(args.rounds):
            for name, server in servers.items():
                times[name].append(round(timed_pass(server, batch), 3))
    medians = {name: statistics.median(values) for name, values in times.items()}
    fastest = {name: min(values) for name, values in times.items()}
    per_round = [round(s / p, 2) for s, p in zip(times["strict"], times["plain"], strict=True)]
    result = {
        "strict_env": STRICT_ENV,
        "server_args": SERVER_ARGS,
        "requests_per_pass": args.requests,
        "max_new_tokens": args.max_new,
        "seconds_per_pass": times,
        "median_seconds": medians,
        "fastest_seconds": fastest,
        "ratio_per_round": per_round,
        "ratio_median": statistics.median(per_round),
        "ratio_fastest": round(fastest["strict"] / fastest["plain"], 2),
        "load_average": os.getloadavg(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(
        f"strict / plain: {result['ratio_median']}x (median of {args.rounds} rounds), {result['ratio_fastest']}x "
        f"fastest passes ({fastest['strict']:.1f} s vs {fastest['plain']:.1f} s for {args.requests} requests)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
