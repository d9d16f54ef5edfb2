"""Real-weights text needle: SmolLM2-135M-Instruct served by SGLang on CPU, pass-key retrieval vs KV budget.

    make setup-smollm2
    python -m benchmarks.text_needle --samples 16 --sentences 40 120 --out benchmarks/results/text_needle

The one accuracy number here from weights nobody on the team trained (MileBench's TN task in miniature). The
haystack is the needle suite's text task; its needle becomes a five-digit pass key stated twice ("The pass key is
52445. Remember it. 52445 is the pass key."), the classic pass-key prompt, and the answer is primed with "The
pass key is" after the chat template: at 135M parameters the bare question is answered far less reliably
(measured on 8 prompts of ~250 tokens: 2/8 with a word key and a bare question, 8/8 in this form). One
``--kv-policy madakv`` server answers every policy and budget through per-request ``custom_params``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.accuracy import (
    DEFAULT_SINK,
    ENGINE_ONLY,
    POLICIES,
    Run,
    add_engine_arguments,
    ask_engine,
    engine_server_args,
    markdown_table,
    plot,
    summarize,
)
from benchmarks.needles import NeedleConfig, make_sample
from madakv_sglang.server_process import exit_on_sigterm

MODEL = Path(".models/smollm2-135m-instruct")
INTRO = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
QUESTION = "\nWhat is the pass key?"
PRIME = "The pass key is"
MAX_NEW_TOKENS = 8


def passkey_prompt(tokenizer: Any, sentences: int, depth: float, seed: int) -> tuple[str, str]:
    """(prompt text ending in the primed answer, the pass key)."""
    sample = make_sample(NeedleConfig("text", sentences=sentences, images=0, depth=depth), seed)
    key = str(random.Random(f"passkey|{seed}").randint(10_000, 99_999))
    haystack = sample.text().replace(
        f"The key is {sample.answer}.", f"The pass key is {key}. Remember it. {key} is the pass key."
    )
    messages = [{"role": "user", "content": INTRO + haystack + QUESTION}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + PRIME, key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL)
    servable = [p for p in POLICIES if p != "h2o"]
    default = [p for p in servable if p not in ENGINE_ONLY]  # the *-chunk variants are opt-in
    parser.add_argument("--policies", nargs="+", default=default, choices=servable)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.5])
    parser.add_argument("--sentences", nargs="+", type=int, default=[40, 120], help="haystack lengths")
    parser.add_argument("--samples", type=int, default=8, help="prompts per length (depths spread evenly)")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--sink", type=int, default=DEFAULT_SINK, help="attention sinks of every scoring policy")
    parser.add_argument("--layout", choices=["shared", "per-layer"], default="shared", help="the server's --kv-layout")
    add_engine_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/text_needle"))
    args = parser.parse_args(argv)
    exit_on_sigterm()
    if not (args.model / "config.json").exists():
        raise SystemExit(f"{args.model} has no checkpoint: run `make setup-smollm2` first")

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from madakv_sglang.server_process import Server

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = [
        (sentences, i, *passkey_prompt(tokenizer, sentences, (i + 0.5) / args.samples, i))
        for sentences in args.sentences
        for i in range(args.samples)
    ]
    grid = [(name, budget) for name in args.policies for budget in ([1.0] if name == "full" else args.budgets)]
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    started = time.perf_counter()
    server_args = engine_server_args(args)
    with (
        Server(args.model, server_args, args.out / "server.log") as server,
        ThreadPoolExecutor(args.concurrency) as pool,
    ):
        for name, budget in tqdm(grid, desc="policies x budgets", file=sys.stderr):
            replies = pool.map(
                lambda p, name=name, budget=budget: ask_engine(
                    server, {"text": p[2]}, name, budget, args.window, MAX_NEW_TOKENS, args.sink
                ),
                prompts,
            )
            for (sentences, seed, _, key), (prediction, prompt_len, kept) in zip(prompts, replies, strict=True):
                runs.append(
                    Run(
                        "engine",
                        name,
                        budget,
                        f"passkey-{sentences}",
                        seed,
                        key,
                        prediction,
                        key in prediction,
                        prompt_len,
                        kept,
                        args.layout,
                    )
                )
    summary = summarize(runs)
    command = "python -m benchmarks.text_needle " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {
        "command": command,
        "seconds": time.perf_counter() - started,
        "model": str(args.model),
        "summary": summary,
        "runs": [asdict(r) for r in runs],
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    table = markdown_table(summary, "engine", tasks=[f"passkey-{s}" for s in args.sentences])
    (args.out / "table.md").write_text(f"`{command}`\n\n{table}\n")
    plot(summary, "engine", args.out)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
