"""Send MileBench prompts to a running SGLang server and score the answers.

Each sample is one ``/v1/chat/completions`` request: a single user message whose content parts are the prompt's
text pieces and ``image_url`` parts (in order), greedy (``temperature`` 0), ``max_tokens``, plus any
``extra_body`` fields (e.g. ``{"custom_params": {"kv_budget": 0.1}}``, madakv's per-request override). Images
go as base64 data URLs, which work with any server, or as ``file://`` URLs, which SGLang 0.5.23 opens itself
(it reads ``file://`` and absolute paths in ``image_url``): no encoding, but the server must see the same files.

Requests run on a small thread pool over all tasks at once, so the server is never idle between tasks. A failed
request is recorded with its error and scores 0; it does not stop the run.
"""

from __future__ import annotations

import base64
import http.client
import json
import mimetypes
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from benchmarks.milebench.data import Dataset, load_dataset
from benchmarks.milebench.prompt import Part, Truncation, build_prompt
from benchmarks.milebench.scoring import SampleScore, answer_index, image_level, rule_for, score_sample, summarize

Transport = Literal["data", "file"]


@dataclass(frozen=True)
class Client:
    """Where and how requests go."""

    url: str  # the server's base URL, e.g. http://127.0.0.1:30000
    model: str = "default"
    max_tokens: int = 512  # MileBench's max_new_tokens
    extra_body: dict[str, Any] = field(default_factory=dict)
    transport: Transport = "data"
    timeout: float = 600.0


def image_url(path: Path, transport: Transport) -> str:
    if transport == "file":
        return path.resolve().as_uri()
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def chat_payload(parts: Sequence[Part], client: Client) -> dict[str, Any]:
    content = [
        {"type": "text", "text": part}
        if isinstance(part, str)
        else {"type": "image_url", "image_url": {"url": image_url(part, client.transport)}}
        for part in parts
    ]
    payload = {
        "model": client.model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": client.max_tokens,
    }
    return {**payload, **client.extra_body}


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


def ask(parts: Sequence[Part], client: Client) -> Answer:
    """One chat request; HTTP errors (with the server's message), connection errors and malformed replies come
    back as ``Answer.error``."""
    request = urllib.request.Request(
        client.url.rstrip("/") + "/v1/chat/completions",
        data=json.dumps(chat_payload(parts, client)).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=client.timeout) as response:
            body = json.loads(response.read())
        text = body["choices"][0]["message"]["content"] or ""
    except urllib.error.HTTPError as error:
        return Answer("", error=f"HTTP {error.code}: {error.read().decode(errors='replace')[:500]}")
    except (OSError, http.client.HTTPException, ValueError, LookupError, TypeError) as error:
        return Answer("", error=f"{type(error).__name__}: {error}")
    usage = body.get("usage") or {}
    return Answer(text, usage.get("prompt_tokens"), usage.get("completion_tokens"))


class Progress:
    """``milebench: 12/90 answered, 0 failed, 31 s``: redrawn in place on a terminal, else a line per
    tenth of the run."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream = total, stream
        self.done = self.failed = 0
        self.start = time.monotonic()
        self.tty = stream.isatty()

    def advance(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        line = (
            f"milebench: {self.done}/{self.total} answered, {self.failed} failed, {time.monotonic() - self.start:.0f} s"
        )
        if self.tty:
            print("\r" + line, end="\n" if self.done == self.total else "", file=self.stream, flush=True)
        elif self.done == self.total or self.done * 10 // self.total != (self.done - 1) * 10 // self.total:
            print(line, file=self.stream, flush=True)


def _task_result(dataset: Dataset, answers: Sequence[Answer]) -> dict[str, Any]:
    rule = rule_for(dataset.name, dataset.question_type)
    samples, scores, levels = [], [], []
    for sample, answer in zip(dataset.samples, answers, strict=True):
        scored = SampleScore(0.0) if answer.error else score_sample(rule, answer.text, sample.response, sample.choices)
        level = image_level(len(sample.images))
        scores.append(scored.score)
        levels.append(level)
        samples.append(
            {
                "sample_id": sample.sample_id,
                "level": level,
                "images": len(sample.images),
                "response": sample.response,
                "prediction": answer.text,
                "score": scored.score,
                "extracted": scored.extracted,
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
                "error": answer.error,
            }
        )
    summary = summarize(scores, levels)
    return {
        "dataset": dataset.name,
        "question_type": dataset.question_type,
        "rule": rule,
        "metric": "rouge_l_f" if rule == "rouge" else "accuracy",
        "score": summary.score,
        "count": summary.count,
        "errors": sum(s["error"] is not None for s in samples),
        "levels": {level: {"score": score, "count": count} for level, (score, count) in summary.levels.items()},
        "samples": samples,
    }


def run(
    data_dir: Path,
    tasks: Sequence[str],
    client: Client,
    adv: bool = False,
    limit: int | None = None,
    truncation: Truncation | None = None,
    concurrency: int = 4,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    """Answer and score ``tasks`` (repeats dropped); returns the results document (``--out``'s JSON). Progress
    goes to ``progress`` when given.

    Every prompt is built, every image path and every multiple-choice answer checked before the first request,
    so a broken data directory fails at once (FileNotFoundError / ValueError) instead of after hours of serving.
    """
    tasks = list(dict.fromkeys(tasks))
    datasets = {task: load_dataset(data_dir, task, adv=adv, limit=limit) for task in tasks}
    for dataset in datasets.values():
        if rule_for(dataset.name, dataset.question_type) == "choice":
            for sample in dataset.samples:
                answer_index(sample.response, sample.choices or ())
    jobs = [
        (task, i, build_prompt(sample, datasets[task].name, truncation))
        for task in tasks
        for i, sample in enumerate(datasets[task].samples)
    ]
    missing = [part for _, _, parts in jobs for part in parts if isinstance(part, Path) and not part.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images missing, e.g. {missing[0]}")
    answers: dict[str, list[Answer]] = {task: [Answer("")] * len(datasets[task].samples) for task in tasks}
    meter = Progress(len(jobs), progress) if progress is not None and jobs else None
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(ask, parts, client): (task, i) for task, i, parts in jobs}
        for future in as_completed(futures):
            task, i = futures[future]
            answers[task][i] = future.result()
            if meter is not None:
                meter.advance(answers[task][i].error is not None)
    results = {task: _task_result(datasets[task], answers[task]) for task in tasks}
    task_scores = [r["score"] for r in results.values() if r["score"] is not None]
    return {
        "benchmark": "MileBench",
        "settings": {
            "server": client.url,
            "model": client.model,
            "data_dir": str(data_dir),
            "adv": adv,
            "limit": limit,
            "max_tokens": client.max_tokens,
            "extra_body": client.extra_body,
            "transport": client.transport,
            "concurrency": concurrency,
            "max_context_tokens": None if truncation is None else truncation.max_context_tokens,
            "tokens_per_image": None if truncation is None else truncation.tokens_per_image,
        },
        "average": sum(task_scores) / len(task_scores) if task_scores else None,
        "elapsed_s": round(time.monotonic() - start, 3),
        "tasks": results,
    }
