"""Accuracy vs KV budget on the multimodal needle suite, through the HF path and through the SGLang engine.

    python -m benchmarks.accuracy --model benchmarks/models/needle-vl --samples 20 --out benchmarks/results/accuracy

Every policy x budget x task (``text``, ``image``, ``mixed`` and the needle-absent control) answers the same
prompts greedily. Per run it records the answer, whether it is right (``benchmarks.needles.is_correct``), the
prompt length n and the slots the request holds after compression (M, ``madakv_sglang.layout.slot_count``,
under the ``shared`` layout and, in the HF path, also under ``per-layer``), so accuracy can be read against the
nominal budget and against the physical slots. ``--path both`` runs the
engine too (one ``--kv-policy madakv`` server; each request overrides policy and budget through
``custom_params``) and reports where the two paths answer differently. ``h2o`` runs in the HF path only (a
serving prefill does not compute every query's attention).

Writes ``results.json``, ``table.md`` and two PNG plots into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.needles import TASKS, NeedleConfig, NeedleSample, is_correct, make_sample, prompt_inputs, prompt_text
from benchmarks.needles.smol import HAYSTACKS, SMOL_TASKS, SmolConfig, make_smol_sample
from benchmarks.needles.suite import png_data_url
from madakv_sglang.config import PolicyConfig
from madakv_sglang.layout import slot_count
from madakv_sglang.server_process import exit_on_sigterm

# name -> the PolicyConfig fields beyond policy and budget (the ablations are madakv with one idea off)
POLICIES: dict[str, dict[str, Any]] = {
    "full": {"policy": "full"},
    "madakv": {"policy": "madakv"},
    "madakv-mpa-off": {"policy": "madakv", "mpa": False},
    "madakv-hcc-off": {"policy": "madakv", "hcc": "off"},
    "madakv-cap2": {"policy": "madakv", "cap": 2.0},
    "madakv-cap4": {"policy": "madakv", "cap": 4.0},
    "madakv-no-cap": {"policy": "madakv", "cap": None},
    "snapkv": {"policy": "snapkv"},
    "adakv": {"policy": "adakv"},
    "pyramidkv": {"policy": "pyramidkv"},
    "streamingllm": {"policy": "streamingllm"},
    "h2o": {"policy": "h2o"},
    "lookm": {"policy": "lookm"},
    "random": {"policy": "random"},
    "madakv-chunk": {"policy": "madakv", "prefill_evict": "chunk"},  # the default --kv-prefill-keep (4)
    "snapkv-chunk": {"policy": "snapkv", "prefill_evict": "chunk"},
    "madakv-chunk-keep1": {"policy": "madakv", "prefill_evict": "chunk", "prefill_keep": 1.0},
    "madakv-chunk-keep2": {"policy": "madakv", "prefill_evict": "chunk", "prefill_keep": 2.0},
    "madakv-chunk-keep4": {"policy": "madakv", "prefill_evict": "chunk", "prefill_keep": 4.0},
}
HF_ONLY = {"h2o"}
# Eviction during chunked prefill is a serving mechanism: the HF path prefills whole prompts.
ENGINE_ONLY = {name for name, fields in POLICIES.items() if fields.get("prefill_evict") == "chunk"}
BUDGETS = (0.05, 0.1, 0.2, 0.5)
DEFAULT_SINK = PolicyConfig().sink
# Greedy tokens per reply: needle-vl answers in one or two words (mixed: "apple red"), a few tokens each in its
# byte-level BPE; smol-vl in a short sentence ("The shape is in image 12.", 8 tokens, then <|im_end|>).
MAX_NEW_TOKENS = {"needle": 8, "smol": 12}


@dataclass
class Run:
    path: str
    policy: str
    budget: float
    task: str
    seed: int
    answer: str
    prediction: str
    correct: bool
    prompt_len: int
    kept_slots: int  # under ``layout``
    layout: str = "shared"
    kept_slots_per_layer: int | None = None  # HF path: the same kept sets under the per-layer layout
    context: str = ""  # "IMAGESxSENTENCES" of the haystack

    @classmethod
    def of_sample(
        cls,
        path: str,
        name: str,
        budget: float,
        sample: NeedleSample,
        prediction: str,
        prompt_len: int,
        kept_slots: int,
        layout: str,
        kept_slots_per_layer: int | None = None,
    ) -> Run:
        """One answer to a needle-suite sample, scored by the suite's rule."""
        return cls(
            path,
            name,
            budget,
            sample.config.task,
            sample.meta["seed"],
            sample.answer,
            prediction,
            is_correct(prediction, sample.answer),
            prompt_len,
            kept_slots,
            layout,
            kept_slots_per_layer,
            f"{sample.config.images}x{sample.config.sentences}",
        )


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """``--concurrency`` and ``--chunked-prefill-size``, shared by the sweeps that ask a server."""
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="engine requests in flight; SGLang batches them (each request's eviction is its own)",
    )
    parser.add_argument(
        "--chunked-prefill-size",
        type=int,
        default=None,
        help="the server's prefill chunk (default: SGLang's); the *-chunk policies cut between chunks",
    )


def engine_server_args(args: argparse.Namespace) -> list[str]:
    """The sweep's server: one ``--kv-policy madakv`` server whose requests set their policy per request."""
    server_args = ["--max-total-tokens", "16384", "--kv-policy", "madakv", "--kv-window", str(args.window)]
    server_args += ["--kv-layout", args.layout]
    if args.chunked_prefill_size is not None:
        server_args += ["--chunked-prefill-size", str(args.chunked_prefill_size)]
    return server_args


def policy_config(name: str, budget: float, window: int, sink: int = DEFAULT_SINK) -> PolicyConfig:
    """The sweep's settings for one policy name: the skip rule off (``min_prompt=0``), since the sweep measures
    what eviction does to its prompts, short ones included."""
    fields = dict(POLICIES[name])
    if fields["policy"] == "full":
        return PolicyConfig(policy="full")
    return PolicyConfig(budget=str(budget), window=window, sink=sink, min_prompt=0, **fields)


def run_hf(
    model: Any,
    processor: Any,
    sample: NeedleSample,
    inputs: Mapping[str, Any],
    name: str,
    budget: float,
    window: int,
    prefills: dict[tuple[str, int, str], Any] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS["needle"],
) -> Run:
    """``inputs``: the sample's ``prompt_inputs``, built once for every policy and budget. ``prefills``: this
    sample's prefills by ``hf.score_key``, filled as needed, so the prompt runs once per score source rather than
    once per policy and budget (the answers are the same: ``tests/policies/test_hf.py``)."""
    from madakv_sglang import hf

    cfg = policy_config(name, budget, window)
    prefilled = None
    if prefills is not None:
        key = hf.score_key(cfg)
        if key not in prefills:
            prefills[key] = hf.prefill(model, inputs, cfg)
        prefilled = prefills[key]
    eos = processor.tokenizer.eos_token_id
    result = hf.generate(model, inputs, cfg, max_new_tokens, eos_token_id=eos, prefilled=prefilled)
    prediction = processor.tokenizer.decode(result.tokens, skip_special_tokens=True)
    counts = result.selection.all_head_counts
    kept = {layout: int(slot_count(counts, layout=layout)[0]) for layout in ("shared", "per-layer")}
    return Run.of_sample(
        "hf", name, budget, sample, prediction, result.prompt_len, kept["shared"], "shared", kept["per-layer"]
    )


def ask_engine(
    server: Any,
    request: dict[str, Any],
    name: str,
    budget: float,
    window: int,
    max_new_tokens: int,
    sink: int = DEFAULT_SINK,
) -> tuple[str, int, int]:
    """POST ``request`` (``text``, ``image_data``, ...) to ``/generate`` greedily with the policy and budget in
    ``custom_params``; returns (prediction, prompt tokens, slots the request kept after compression under the
    server's layout)."""
    config = policy_config(name, budget, window, sink)
    # The layout is the server's (a request cannot change it): the slots reported are the server's layout's.
    custom = {f"kv_{key}": value for key, value in config.to_strings().items() if key != "layout"}
    output = server.post(
        "/generate",
        {**request, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "custom_params": custom}},
    )
    prompt_len = int(output["meta_info"]["prompt_tokens"])
    report = output["meta_info"].get("madakv") or [{}]
    return str(output["text"]), prompt_len, int(report[0].get("kept_slots", prompt_len))


def engine_request(processor: Any, sample: NeedleSample) -> dict[str, Any]:
    """The sample's ``/generate`` body without sampling parameters (the chat text and PNG data URLs)."""
    return {
        "text": prompt_text(processor, sample),
        "image_data": [png_data_url(image) for image in sample.images] or None,
    }


def run_engine(
    server: Any,
    sample: NeedleSample,
    request: dict[str, Any],
    name: str,
    budget: float,
    window: int,
    layout: str,
    max_new_tokens: int = MAX_NEW_TOKENS["needle"],
) -> Run:
    """``request``: the sample's :func:`engine_request`, built once for every policy and budget; ``layout``: the
    server's."""
    prediction, prompt_len, kept = ask_engine(server, request, name, budget, window, max_new_tokens)
    return Run.of_sample("engine", name, budget, sample, prediction, prompt_len, kept, layout)


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Accuracy and mean kept-slot fraction per (path, policy, budget, task)."""
    groups: dict[tuple[str, str, float, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.path, run.policy, run.budget, run.task)].append(run)
    cells = []
    for (path, policy, budget, task), members in sorted(groups.items()):
        cell = {
            "path": path,
            "policy": policy,
            "budget": budget,
            "task": task,
            "samples": len(members),
            "accuracy": sum(r.correct for r in members) / len(members),
            "layout": members[0].layout,
            "slot_fraction": sum(r.kept_slots / r.prompt_len for r in members) / len(members),
        }
        if all(r.kept_slots_per_layer is not None for r in members):
            cell["slot_fraction_per_layer"] = sum((r.kept_slots_per_layer or 0) / r.prompt_len for r in members) / len(
                members
            )
        cells.append(cell)
    by_context: dict[tuple[str, str, float, str, str], list[bool]] = defaultdict(list)
    for run in runs:
        by_context[(run.path, run.policy, run.budget, run.task, run.context)].append(run.correct)
    contexts = [
        {"path": k[0], "policy": k[1], "budget": k[2], "task": k[3], "context": k[4], "accuracy": sum(v) / len(v)}
        for k, v in sorted(by_context.items())
    ]
    return {"cells": cells, "by_context": contexts, "agreement": _agreement(runs)}


def context_table(summary: dict[str, Any], path: str, policy: str = "full") -> str:
    """``policy``'s accuracy per task (rows) and haystack size (columns, IMAGESxSENTENCES)."""
    cells = [c for c in summary["by_context"] if c["path"] == path and c["policy"] == policy]
    contexts = sorted({c["context"] for c in cells}, key=lambda c: [int(x) for x in c.split("x")])
    tasks = sorted({c["task"] for c in cells}, key=_task_order)
    budgets = sorted({c["budget"] for c in cells})
    lines = [f"| task | budget | {' | '.join(contexts)} |", "|---|---|" + "---|" * len(contexts)]
    for task in tasks:
        for budget in budgets:
            row = {c["context"]: c["accuracy"] for c in cells if c["task"] == task and c["budget"] == budget}
            lines.append(
                f"| {task} | {budget:g} | " + " | ".join(f"{row[c]:.2f}" if c in row else "-" for c in contexts) + " |"
            )
    return "\n".join(lines)


def _agreement(runs: list[Run]) -> dict[str, Any]:
    """Where HF and the engine ran the same (policy, budget, sample): how often they give the same answer."""
    by_key: dict[tuple[str, float, str, int], dict[str, Run]] = defaultdict(dict)
    for run in runs:
        by_key[(run.policy, run.budget, run.task, run.seed)][run.path] = run
    pairs = [(v["hf"], v["engine"]) for v in by_key.values() if "hf" in v and "engine" in v]
    differ = [
        {
            "policy": h.policy,
            "budget": h.budget,
            "task": h.task,
            "seed": h.seed,
            "hf": h.prediction,
            "engine": e.prediction,
        }
        for h, e in pairs
        if h.prediction.strip() != e.prediction.strip()
    ]
    return {"pairs": len(pairs), "same_answer": len(pairs) - len(differ), "differences": differ}


def markdown_table(summary: dict[str, Any], path: str, tasks: list[str] | None = None) -> str:
    """One row per (policy, budget), accuracy per task, and the mean fraction of prompt slots kept under the
    run's layout (and under ``per-layer`` too where the run measured it)."""
    cells = [c for c in summary["cells"] if c["path"] == path]
    tasks = [
        t for t in tasks or sorted({c["task"] for c in cells}, key=_task_order) if any(c["task"] == t for c in cells)
    ]
    layout = cells[0].get("layout", "shared") if cells else "shared"
    both = bool(cells) and all("slot_fraction_per_layer" in c for c in cells)
    columns = [f"slots kept ({layout})", *(["slots kept (per-layer)"] if both else [])]
    lines = [
        f"| policy | budget | {' | '.join(tasks)} | {' | '.join(columns)} |",
        "|---|---|" + "---|" * (len(tasks) + len(columns)),
    ]
    keys = sorted({(c["policy"], c["budget"]) for c in cells}, key=lambda k: (list(POLICIES).index(k[0]), k[1]))
    for policy, budget in keys:
        row = {c["task"]: c for c in cells if (c["policy"], c["budget"]) == (policy, budget)}
        accuracy = " | ".join(f"{row[t]['accuracy']:.2f}" if t in row else "-" for t in tasks)
        keys_used = ["slot_fraction", *(["slot_fraction_per_layer"] if both else [])]
        slots = " | ".join(f"{sum(c[k] for c in row.values()) / len(row):.1%}" for k in keys_used)
        lines.append(f"| {policy} | {budget:g} | {accuracy} | {slots} |")
    return "\n".join(lines)


def _task_order(task: str) -> tuple[int, list[int | str]]:
    """The suites' tasks in their order, then others with numbers compared as numbers (passkey-40 < passkey-120)."""
    order = [*TASKS, *(t for t in SMOL_TASKS if t not in TASKS)]
    rank = order.index(task) if task in order else len(order)
    return rank, [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", task)]


def plot(summary: dict[str, Any], path: str, out: Path) -> list[Path]:
    """Accuracy vs nominal budget, and vs the slots actually held, one panel per needle task (not ``absent``).

    Policies that choose the same cells draw the same line, so each policy has its own marker and dash pattern
    and a line hidden under another still shows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in summary["cells"] if c["path"] == path and c["task"] != "absent"]
    tasks = sorted({c["task"] for c in cells}, key=_task_order)
    # One colour and one marker per policy (tab20 has 20 colours, and there are as many markers as policies).
    markers, dashes = "osD^vP*Xh<>pd8H+x12", ["-", "--", "-.", ":"]
    colours = plt.get_cmap("tab20").colors
    assert len(POLICIES) <= min(len(markers), len(colours)), "add markers or colours for the new policies"
    written = []
    layout = cells[0].get("layout", "shared") if cells else "shared"
    axes_wanted = [
        ("budget", "nominal budget (fraction of the prompt)", "accuracy_vs_budget.png"),
        ("slot_fraction", f"slots held after compression (M / n, {layout} layout)", "accuracy_vs_slots.png"),
    ]
    if cells and all("slot_fraction_per_layer" in c for c in cells):
        axes_wanted.append(
            (
                "slot_fraction_per_layer",
                "slots held after compression (M / n, per-layer layout)",
                "accuracy_vs_slots_per_layer.png",
            )
        )
    for x_key, label, name in axes_wanted:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), sharey=True, squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            for index, policy in enumerate(POLICIES):
                points = sorted(
                    (c["budget"], c[x_key], c["accuracy"]) for c in cells if c["policy"] == policy and c["task"] == task
                )
                if points:
                    ax.plot(
                        [p[1] for p in points],
                        [p[2] for p in points],
                        label=policy,
                        alpha=0.85,
                        color=colours[index % len(colours)],
                        marker=markers[index % len(markers)],
                        linestyle=dashes[index % len(dashes)],
                    )
            ax.set_title(task)
            ax.set_xlabel(label)
            ax.set_ylim(-0.02, 1.02)
        axes[0][0].set_ylabel("accuracy")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


def suite_samples(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[NeedleSample]:
    """``--samples`` prompts per task and context, needles at depths spread evenly over [0, 1]; one seed per
    prompt, so (task, seed) names a prompt (the HF/engine agreement pairs runs by it)."""
    tasks = args.tasks or list(TASKS if args.suite == "needle" else SMOL_TASKS)
    known = TASKS if args.suite == "needle" else SMOL_TASKS
    if set(tasks) - set(known):
        parser.error(f"--tasks {sorted(set(tasks) - set(known))}: the {args.suite} suite has {known}")
    try:
        contexts = [tuple(int(x) for x in c.split("x")) for c in args.contexts or [f"{args.images}x{args.sentences}"]]
    except ValueError:
        parser.error(f"--contexts {args.contexts}: expected IMAGESxSENTENCES, e.g. 8x100")
    if args.suite == "needle" and args.haystack != "filler":
        parser.error(f"--haystack {args.haystack}: only the smol suite has another haystack")
    samples = []
    for task in tasks:
        for images, sentences in contexts:
            for i in range(args.samples):
                depth = (i + 0.5) / args.samples
                if args.suite == "needle":
                    config: Any = NeedleConfig(task, sentences=sentences, images=images, depth=depth)  # type: ignore[arg-type]
                    samples.append(make_sample(config, args.seed + len(samples)))
                else:
                    config = SmolConfig(task, sentences, images, depth, args.haystack)
                    samples.append(make_smol_sample(config, args.seed + len(samples)))
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("benchmarks/models/needle-vl"))
    parser.add_argument(
        "--policies",
        nargs="+",
        default=[name for name in POLICIES if name not in ENGINE_ONLY],
        choices=list(POLICIES),
        help=f"the *-chunk ones ({', '.join(sorted(ENGINE_ONLY))}) run in the engine only",
    )
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument(
        "--suite",
        choices=["needle", "smol"],
        default="needle",
        help="needle: benchmarks.needles (needle-vl); smol: benchmarks.needles.smol (smol-vl)",
    )
    parser.add_argument("--tasks", nargs="+", default=None, help=f"needle: {TASKS}; smol: {SMOL_TASKS}")
    parser.add_argument("--samples", type=int, default=10, help="prompts per task and context")
    parser.add_argument("--sentences", type=int, default=80)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument(
        "--contexts",
        nargs="+",
        default=None,
        metavar="IMAGESxSENTENCES",
        help="haystack sizes, e.g. 8x100 16x500 (default: --images x --sentences)",
    )
    parser.add_argument(
        "--haystack",
        choices=HAYSTACKS,
        default="filler",
        help="smol only: the needle suite's repeated filler, or narrative prose (benchmarks.needles.prose)",
    )
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--seed", type=int, default=10_000, help="first sample seed (keep clear of training seeds)")
    parser.add_argument("--path", choices=["hf", "engine", "both"], default="hf")
    parser.add_argument(
        "--layout",
        choices=["shared", "per-layer"],
        default="shared",
        help="the engine server's --kv-layout (the HF path reports both)",
    )
    add_engine_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy"))
    args = parser.parse_args(argv)
    exit_on_sigterm()

    from tqdm import tqdm
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(args.model)
    samples = suite_samples(args, parser)
    grid = [(name, budget) for name in args.policies for budget in ([1.0] if name == "full" else args.budgets)]
    engine_only = sorted(ENGINE_ONLY & set(args.policies))
    if args.path == "hf" and engine_only:
        raise SystemExit(f"--policies {' '.join(engine_only)}: these run in the engine only (--path engine or both)")
    runs: list[Run] = []
    started = time.perf_counter()
    if args.path in ("hf", "both"):
        model = AutoModelForImageTextToText.from_pretrained(args.model, torch_dtype=torch.float32).eval()
        hf_grid = [g for g in grid if g[0] not in ENGINE_ONLY]
        for sample in tqdm(samples, desc="HF path (prompts)", file=sys.stderr):
            inputs, prefills = prompt_inputs(processor, sample), {}  # one prefill per score source and prompt
            new = MAX_NEW_TOKENS[args.suite]
            runs += [run_hf(model, processor, sample, inputs, *g, args.window, prefills, new) for g in hf_grid]
            del prefills
    if args.path in ("engine", "both"):
        from madakv_sglang.server_process import Server

        args.out.mkdir(parents=True, exist_ok=True)
        server_args = engine_server_args(args)
        requests = [engine_request(processor, s) for s in samples]
        with (
            Server(args.model, server_args, args.out / "server.log") as server,
            ThreadPoolExecutor(args.concurrency) as pool,
        ):
            for name, budget in tqdm([g for g in grid if g[0] not in HF_ONLY], desc="engine", file=sys.stderr):
                runs += pool.map(
                    lambda s, r, name=name, budget=budget: run_engine(
                        server, s, r, name, budget, args.window, args.layout, MAX_NEW_TOKENS[args.suite]
                    ),
                    samples,
                    requests,
                )
    summary = summarize(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {
        "command": command,
        "seconds": time.perf_counter() - started,
        "model": str(args.model),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summary": summary,
        "runs": [asdict(r) for r in runs],
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    paths = ["hf", "engine"] if args.path == "both" else [args.path]
    tables = [f"### {p} path\n\n{markdown_table(summary, p)}" for p in paths]
    if len({r.context for r in runs}) > 1 and any(r.policy == "full" for r in runs):
        tables += [
            f"### {p} path, full cache by haystack (images x sentences)\n\n{context_table(summary, p)}" for p in paths
        ]
    (args.out / "table.md").write_text(f"`{command}`\n\n" + "\n\n".join(tables) + "\n")
    plot(summary, paths[0], args.out)
    print("\n\n".join(tables))
    agreement = summary["agreement"]
    if agreement["pairs"]:
        print(f"HF and engine gave the same answer in {agreement['same_answer']} of {agreement['pairs']} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
