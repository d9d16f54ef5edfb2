"""Short chat prompts on real weights: does a compressing server answer them as stock SGLang does?

SmolLM2-135M-Instruct (``make setup-smollm2``) served by SGLang on CPU, once stock (``--kv-policy full``) and once
with ``--kv-policy madakv``; every compressing policy and setting goes through per-request ``custom_params`` on
the second server. Each factual question is asked bare (a chat of 30-60 tokens) and after 1, 2, 3, 4 or 6 paragraphs of
unrelated context (up to ~900 tokens), so agreement with ``full`` can be read against the prompt length. The
skip rule is off (``kv_min_prompt 0``): this measures what eviction does to such prompts, which is what the
default ``--kv-min-prompt`` is chosen from.

    python -m benchmarks.short_prompts --out benchmarks/results/short-prompts.json

A question counts as answered when the greedy answer contains its expected word (case-insensitive); agreement
means the same output tokens as ``full``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / ".models" / "smollm2-135m-instruct"
MAX_NEW = 16
SYSTEM = "You are a helpful assistant. Answer in one short sentence."


@dataclass(frozen=True)
class Question:
    """One short factual request: the user's text, the word a right answer contains, and whether the chat
    carries a system prompt."""

    text: str
    expected: str
    system: bool = False


# Questions SmolLM2-135M-Instruct answers right with the full cache, bare and after 4 context paragraphs (picked
# from a larger probe; the engine test checks the bare ones again). The model gets many simple facts wrong (the
# capital of the United States, the first president, the colour of snow), so those are not here.
QUESTIONS: tuple[Question, ...] = (
    *(
        Question(f"What is the capital of {country}?", city, system)
        for country, city in (("France", "Paris"), ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Australia", "Canberra"))
        for system in (False, True)
    ),
    *(
        Question(f"What is the capital of {country}?", city)
        for country, city in (
            ("Germany", "Berlin"),
            ("England", "London"),
            ("Russia", "Moscow"),
            ("China", "Beijing"),
            ("Greece", "Athens"),
            ("Canada", "Ottawa"),
        )
    ),
    Question("What is the opposite of hot?", "cold", system=True),
    Question("What is the opposite of day?", "night", system=True),
    Question("What is the opposite of up?", "down"),
    Question("What is the opposite of big?", "small"),
    Question("Who wrote Romeo and Juliet?", "Shakespeare", system=True),
    Question("What colour is the sky on a clear day?", "blue", system=True),
    *(
        Question(text, expected, system)
        for text, expected in (
            ("What is the chemical symbol for water?", "H2O"),
            ("What is the boiling point of water in Celsius?", "100"),
            ("What is the tallest mountain in the world?", "Everest"),
            ("What language is spoken in France?", "French"),
            ("What is the currency of Japan?", "yen"),
        )
        for system in (False, True)
    ),
    Question("Who painted the Mona Lisa?", "Leonardo"),
    Question("What language is spoken in Spain?", "Spanish"),
)

# Unrelated context paragraphs put before a question to lengthen the prompt (about 110-150 tokens each).
PARAGRAPHS: tuple[str, ...] = (
    "The town of Millbrook lies on the east bank of a slow river, about forty kilometres north of the coast. It "
    "was founded by a group of millers, and the old mill still stands at the end of the main street. About "
    "twelve thousand people live there today; most of them work in farming, in the paper factory or in the "
    "small hospital on Oak Street.",
    "Every September the town holds an apple festival in the main square. Farmers sell cider, pies and fresh "
    "apples, children ride a small wooden carousel, and a brass band plays in the evening until the lanterns "
    "are lit. Visitors come from the villages around, and the hotel by the station is full for a week.",
    "The public library has a famous collection of old maps, some of them more than three hundred years old. "
    "Students from the university in the capital come to study them, and once a year the library shows the "
    "most fragile ones behind glass in the entrance hall, next to a model of the town as it looked long ago.",
    "Winters are cold and snowy, and the river sometimes freezes near the stone bridge. Summers are warm, with "
    "frequent thunderstorms in July and long dry weeks in August, when the farmers worry about their fields and "
    "the fire brigade watches the forest on the hills to the west of the town.",
    "The local football team plays in green shirts and has never won the regional cup, although it reached the "
    "final twice. On match days the whole town seems to gather on the small ground behind the school, and the "
    "bakery sells a special bread shaped like a ball.",
    "A train line connects the town with the coast. The trains are old and slow, and the journey takes almost "
    "two hours, but many people prefer it to the narrow road through the hills, which is often closed by snow in "
    "winter and by fallen trees after the summer storms.",
)
CONTEXTS = (0, 1, 2, 3, 4, 6)  # paragraphs before the question


def messages(question: Question, paragraphs: int) -> list[dict[str, str]]:
    """The chat for one question after ``paragraphs`` context paragraphs."""
    context = "\n\n".join(PARAGRAPHS[:paragraphs])
    user = f"{context}\n\n{question.text}" if context else question.text
    chat = [{"role": "system", "content": SYSTEM}] if question.system else []
    return [*chat, {"role": "user", "content": user}]


def prompt_ids(tokenizer: Any, question: Question, paragraphs: int) -> list[int]:
    text = str(
        tokenizer.apply_chat_template(messages(question, paragraphs), add_generation_prompt=True, tokenize=False)
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answered(text: str, question: Question) -> bool:
    return question.expected.lower() in text.lower()


def generate(server: Any, ids: list[int], custom: dict[str, Any] | None = None) -> dict[str, Any]:
    """Greedy ``/generate`` of MAX_NEW tokens; ``custom`` becomes ``custom_params`` (per-request settings)."""
    sampling: dict[str, Any] = {"temperature": 0, "max_new_tokens": MAX_NEW}
    if custom:
        sampling["custom_params"] = custom
    return dict(server.post("/generate", {"input_ids": ids, "sampling_params": sampling}))


# (name, custom_params) of the compressing settings compared with full; the skip rule off in all of them.
SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    *((policy, {"kv_policy": policy, "kv_min_prompt": 0}) for policy in ("madakv", "snapkv", "adakv")),
    ("madakv sink 0", {"kv_policy": "madakv", "kv_min_prompt": 0, "kv_sink": 0}),
)


def run(model: Path, concurrency: int, settings: Sequence[str]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from madakv_sglang.server_process import Server

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [(q, k, prompt_ids(tokenizer, q, k)) for q in QUESTIONS for k in CONTEXTS]
    base = ["--max-total-tokens", "16384"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as logs, ThreadPoolExecutor(concurrency) as pool:
        with Server(model, [*base, "--attention-backend", "torch_native"], Path(logs) / "full.log") as stock:
            full = list(pool.map(lambda p: generate(stock, p[2]), prompts))
        with Server(model, [*base, "--kv-policy", "madakv"], Path(logs) / "madakv.log") as server:
            for name, custom in (item for item in SETTINGS if item[0] in settings):
                started = time.monotonic()
                outs = list(pool.map(lambda p, c=custom: generate(server, p[2], c), prompts))
                print(f"{name}: {time.monotonic() - started:.0f} s", file=sys.stderr)
                for (question, k, ids), ref, out in zip(prompts, full, outs, strict=True):
                    rows.append(
                        {
                            "setting": name,
                            "question": question.text,
                            "system": question.system,
                            "paragraphs": k,
                            "prompt_tokens": len(ids),
                            "full_answer": ref["text"],
                            "answer": out["text"],
                            "full_correct": answered(ref["text"], question),
                            "correct": answered(out["text"], question),
                            "same_tokens": out["output_ids"] == ref["output_ids"],
                        }
                    )
    return {"model": str(model), "max_new_tokens": MAX_NEW, "contexts": list(CONTEXTS), "rows": rows}


def summary(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per setting and context length: mean prompt tokens, share answered right, share equal to full."""
    out = []
    names = dict.fromkeys(row["setting"] for row in report["rows"])
    for name in names:
        for k in report["contexts"]:
            rows = [r for r in report["rows"] if r["setting"] == name and r["paragraphs"] == k]
            out.append(
                {
                    "setting": name,
                    "paragraphs": k,
                    "tokens": f"{min(r['prompt_tokens'] for r in rows)}-{max(r['prompt_tokens'] for r in rows)}",
                    "full_correct": sum(r["full_correct"] for r in rows) / len(rows),
                    "correct": sum(r["correct"] for r in rows) / len(rows),
                    "same_tokens": sum(r["same_tokens"] for r in rows) / len(rows),
                }
            )
    return out


def table(report: dict[str, Any]) -> str:
    lines = [
        "| setting | context paragraphs | prompt tokens | full right | right | same tokens as full |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary(report):
        lines.append(
            f"| {row['setting']} | {row['paragraphs']} | {row['tokens']} | {row['full_correct']:.2f} | "
            f"{row['correct']:.2f} | {row['same_tokens']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.short_prompts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "short-prompts.json")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (SGLang batches them)")
    names = [name for name, _ in SETTINGS]
    parser.add_argument(
        "--settings",
        nargs="+",
        default=names,
        choices=names,
        metavar="NAME",
        help=f"compressing settings to compare with full (default: all of {', '.join(names)})",
    )
    parser.add_argument("--summarize", action="store_true", help="print the table of an existing --out file")
    args = parser.parse_args(argv)
    if args.summarize:
        print(table(json.loads(args.out.read_text())))
        return 0
    if not (args.model / "model.safetensors").exists():
        parser.error(f"no weights at {args.model}: run `make setup-smollm2`")
    report = run(args.model, args.concurrency, args.settings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
