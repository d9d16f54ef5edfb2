"""The MileBench runner (``benchmarks/milebench``): MileBench's scoring rules on hand-computed cases, its prompt
and truncation, the loader on the fabricated sample (``tests/data/milebench_sample``), the requests against a
stub server, and the CLI end to end against a real SGLang server with ``--kv-policy madakv``."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest

from benchmarks.milebench import TASKS, Client, load_dataset, run
from benchmarks.milebench.__main__ import main
from benchmarks.milebench.data import Sample, dataset_dir
from benchmarks.milebench.prompt import PLACEHOLDER, Truncation, build_prompt, interleave
from benchmarks.milebench.run import Progress, ask
from benchmarks.milebench.scoring import (
    SampleScore,
    extract_option,
    image_level,
    normalize,
    option_letter,
    rouge_l_f,
    rule_for,
    score_sample,
    summarize,
)
from madakv_sglang.log_lines import request_lines
from tests.milebench_sample import SAMPLE, materialize

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("A. The red car!", "a the red car"),  # "!" touches no space: a space, stripped; the period goes
        ("dog-house", "dog house"),  # "-" touches no space: replaced by a space
        ("well - done", "well  done"),  # "-" touches a space: deleted (the two spaces stay)
        ("1,000 (approx.)", "1000 approx"),  # a digit-comma-digit anywhere: every mark is deleted
        ("3.5 m.", "3.5 m"),  # a period before a digit stays
        ("'Quoted'\n", "quoted"),
        ("." * 40, "." * 8),  # MileBench removes at most 32 periods (re.UNICODE passed as sub()'s count)
    ],
)
def test_normalize(raw: str, normalized: str) -> None:
    assert normalize(raw) == normalized


@pytest.mark.parametrize(
    ("hypothesis", "reference", "expected"),
    [
        # Distinct words: hyp {the cat sat on mat} = 5, ref {the cat is on mat} = 5; the LCS "the cat on the mat" has
        # 4 distinct words, so P = R = 4/5 and F = 0.8 (textbook ROUGE-L would say 5/6).
        ("the cat sat on the mat", "the cat is on the mat", 0.8),
        # hyp {red car}: P = 2/2; ref {the red car is fast}: R = 2/5; F = 2 * 0.4 / 1.4 = 4/7.
        ("red car", "the red car is fast", 4 / 7),
        ("x y", "a b", 0.0),
        ("the cat", "the cat", 1.0),
        # Sentences split at ".": LCS(ref "a c", hyp "a b") = {a}, LCS("a c", "c d") = {c}, LCS("b d", "a b") = {b},
        # LCS("b d", "c d") = {d}; the union {a b c d} covers both sides: F = 1 (flat LCS "a b d" / "a c d" is 3/4).
        ("a b. c d", "a c. b d", 1.0),
        # ref "a b a", hyp "b a a": LCS length 2, "a a" or "b a"; rouge's back-trace takes "b a" (on a tie it steps
        # along the hypothesis), 2 distinct words of 2 on each side: F = 1 ("a a" would have given 0.5).
        ("b a a", "a b a", 1.0),
    ],
)
def test_rouge_l_matches_hand_computed(hypothesis: str, reference: str, expected: float) -> None:
    assert rouge_l_f(hypothesis, reference) == pytest.approx(expected, abs=1e-7)  # rouge's F adds 1e-8 below


def test_rouge_rule_normalizes_and_scores_empty_zero() -> None:
    assert score_sample("rouge", "The cat sat on the mat.", "the cat is on the mat").score == pytest.approx(0.8)
    assert score_sample("rouge", "", "the cat").score == 0.0
    assert score_sample("rouge", "...", "the cat").score == 0.0  # normalizes to ""


CHOICES = ["the red car", "a blue house", "3.5 meters", "$12.50"]


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("a", "A"),  # stage 3: the prediction is a key
        ("b a blue house", "B"),  # stage 1: letter + choice ("B. A blue house" normalized)
        ("d $12.50", "D"),  # stage 1 escapes regex characters
        ("i think it is the red car", "A"),  # stage 2: the choice's text, spaces ignored
        ("it is a bluehouse", "B"),
        ("the answer is b", "AB"),  # fallback: every letter that is a key, "a" of "answer" included (a miss)
        ("it is 3.5 meters", ""),  # MileBench compares stage 2's match with the escaped "3\\.5meters": never found
        ("", "C"),  # MileBench reads an empty answer as "C"
    ],
)
def test_extract_option_stages(prediction: str, letter: str) -> None:
    assert extract_option(prediction, [normalize(c) for c in CHOICES]) == letter


def test_choice_rule_scores_letter_against_answer() -> None:
    assert score_sample("choice", "(D)", "$12.50", CHOICES) == SampleScore(1.0, "D")
    assert score_sample("choice", "A. The red car", "$12.50", CHOICES).score == 0.0
    assert score_sample("choice", "", "3.5 meters", CHOICES).score == 1.0  # empty -> "C", and C is right here
    with pytest.raises(ValueError, match="not one of the choices"):
        score_sample("choice", "A", "a green tree", CHOICES)


@pytest.mark.parametrize(
    ("prediction", "hit"),
    [
        ("The passkey is 48213.", True),
        ("48213, I think", True),  # "," touches a space: deleted
        ("passkey48213", False),  # must be a whole word
        ("482130", False),
    ],
)
def test_needle_hit_is_a_whole_word(prediction: str, hit: bool) -> None:
    assert score_sample("needle", prediction, "48213").score == float(hit)


@pytest.mark.parametrize(
    ("prediction", "hit"),
    [
        ("It came out in 1998!", True),
        ("bluegrass", False),
        ("the roof is bluegrass", False),
        ("in 19 98", False),
    ],
)
def test_mmcoqa_hit_is_a_substring(prediction: str, hit: bool) -> None:
    assert score_sample("substring", prediction, "1998").score == float(hit)
    assert score_sample("substring", "Bluegrass", "blue").score == 1.0  # inside a word counts


def test_rule_for_datasets() -> None:
    assert rule_for("TextNeedleInAHaystack", "open-ended") == "needle"
    assert rule_for("ImageNeedleInAHaystack", "multi-choice") == "needle"
    assert rule_for("MMCoQA", "open-ended") == "substring"
    assert rule_for("IEdit", "open-ended") == "rouge"
    assert rule_for("DocVQA", "multi-choice") == "choice"
    with pytest.raises(ValueError, match="question_type"):
        rule_for("IEdit", "yes-no")


def test_levels_and_breakdown() -> None:
    assert [image_level(n) for n in (2, 5, 6, 31, 32, 109)] == ["Few", "Few", "Medium", "Medium", "Many", "Many"]
    summary = summarize([1.0, 0.0, 0.5, 1.0], ["Few", "Few", "Medium", "Few"])
    assert (summary.score, summary.count) == (0.625, 4)
    assert summary.levels == {"Few": (pytest.approx(2 / 3), 3), "Medium": (0.5, 1), "Many": (None, 0)}


# ---------------------------------------------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character, so budgets can be counted by eye."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def test_prompt_interleaves_images_and_lists_choices() -> None:
    doc = load_dataset(SAMPLE, "DocVQA").samples[0]
    assert build_prompt(doc, "DocVQA") == [
        doc.instruction + "\nPage 1: ",
        doc.images[0],
        " Page 2: ",
        doc.images[1],
        " Question: What is the price of the ticket?\nChoice list: \nA. 1987\nB. March 3\nC. $12.50\nD. Page 4"
        "\nYour answer is: ",
    ]
    clevr = load_dataset(SAMPLE, "CLEVR-C").samples[0]  # adjacent images: no empty text part between them
    assert build_prompt(clevr, "CLEVR-Change") == [clevr.instruction + "\n", *clevr.images, "Change:"]
    mmcoqa = load_dataset(SAMPLE, "MMCoQA").samples[0]  # {table#2} is image 2
    assert [p for p in build_prompt(mmcoqa, "MMCoQA") if isinstance(p, Path)] == list(mmcoqa.images)


I1, I2 = Path("i1.png"), Path("i2.png")


@pytest.mark.parametrize(
    ("max_tokens", "parts"),
    [
        # instruction "Q" = 1 token, fragments "abcd" | "ef" | "gh", 3 tokens per image: all of it is 1+4+3+2+3+2 = 15
        (15, ["Q\nabcd", I1, "ef", I2, "gh"]),
        (12, ["Q\n", I1, "ef", I2, "gh"]),  # 11 left: gh 2, i2 5, ef 7, i1 10, abcd would make 14
        (9, ["Q\nef", I2, "gh"]),  # 8 left: gh 2, i2 5, ef 7, i1 would make 10
        (4, ["Q\ngh"]),  # 3 left: gh 2, i2 would make 5
        (2, ["Q\nh"]),  # 1 left: "gh" alone is too long, its last token stays
    ],
)
def test_middle_truncation_keeps_instruction_and_end(max_tokens: int, parts: list[Any]) -> None:
    context = f"abcd{PLACEHOLDER}ef{PLACEHOLDER}gh"
    assert interleave("Q", context, [I1, I2], Truncation(CharTokenizer(), max_tokens, 3)) == parts


def test_interleave_refuses_more_placeholders_than_images() -> None:
    with pytest.raises(ValueError, match="2 image placeholders"):
        interleave("Q", f"a{PLACEHOLDER}b{PLACEHOLDER}c", [I1])


# ---------------------------------------------------------------------------------------------------------------
# Loader on the fabricated sample
# ---------------------------------------------------------------------------------------------------------------


def test_loader_reads_every_paper_task() -> None:
    multi_choice = {"DocVQA", "ST", "OI"}
    for task, directory in TASKS.items():
        dataset = load_dataset(SAMPLE, task)
        assert dataset.name == directory == dataset_dir(task)
        assert dataset.question_type == ("multi-choice" if task in multi_choice else "open-ended")
        assert len(dataset.samples) >= 2
        for sample in dataset.samples:
            assert (sample.choices is not None) == (task in multi_choice)
            assert all(SAMPLE / directory / "images" in path.parents for path in sample.images)
            # The fabricated data is consistent: one placeholder per image, each used once.
            marks = re.findall(r"\{(?:image|table)#(\d+)\}", sample.context)
            assert sorted(map(int, marks)) == list(range(1, len(sample.images) + 1))
    std = load_dataset(SAMPLE, "STD").samples[0]
    assert std.images[0] == SAMPLE / "Spot-the-Diff" / "images" / "pair_0" / "before.png"


def test_loader_limit_adv_and_levels() -> None:
    needle = load_dataset(SAMPLE, "TN")
    assert [image_level(len(s.images)) for s in needle.samples] == ["Few", "Medium", "Many"]
    raw = json.loads((SAMPLE / "TextNeedleInAHaystack" / "TextNeedleInAHaystack.json").read_text())
    assert [e["image_quantity_level"] for e in raw["data"]] == ["Few", "Medium", "Many"]
    assert [s.sample_id for s in load_dataset(SAMPLE, "TN", limit=2).samples] == [0, 1]
    adv = load_dataset(SAMPLE, "TextNeedleInAHaystack", adv=True)
    assert [s.response for s in adv.samples] == ["77120"]
    assert dataset_dir("WebQA") == "WebQA"
    with pytest.raises(FileNotFoundError, match="WebQA"):
        load_dataset(SAMPLE, "WebQA")


# ---------------------------------------------------------------------------------------------------------------
# Requests, against a stub server that answers from a table
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize(tmp_path_factory.mktemp("milebench"))


class Stub:
    """A chat-completions server that records each request and answers by its text and images (``answers``,
    keyed by :func:`_key`), or with HTTP 400."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.requests: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                content = body["messages"][0]["content"]
                text = "".join(p["text"] for p in content if p["type"] == "text")
                key = _key(text, [_image_bytes(p["image_url"]["url"]) for p in content if p["type"] == "image_url"])
                if key not in stub.answers:
                    self.send_response(400)
                    self.end_headers()
                    self.wfile.write(b'{"message": "unknown prompt"}')
                    return
                reply = {
                    "choices": [{"message": {"content": stub.answers[key]}}],
                    "usage": {"prompt_tokens": len(text), "completion_tokens": 1},
                }
                self.send_response(200)
                self.end_headers()
                self.wfile.write(json.dumps(reply).encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _key(text: str, images: list[bytes]) -> str:
    return text + "".join(hashlib.sha1(image).hexdigest() for image in images)


def _image_bytes(url: str) -> bytes:
    """What the server would read: a data URL's payload or a file:// URL's file."""
    if url.startswith("data:"):
        return base64.b64decode(url.split(",", 1)[1])
    assert url.startswith("file:///"), url
    return Path(unquote(urlparse(url).path)).read_bytes()


def _sample_key(sample: Sample, dataset: str) -> str:
    parts = build_prompt(sample, dataset)
    return _key("".join(p for p in parts if isinstance(p, str)), [p.read_bytes() for p in parts if isinstance(p, Path)])


@pytest.fixture
def oracle(sample_dir: Path) -> Iterator[Stub]:
    """Answers every sample with its ground truth, except ALFRED's second sample (HTTP 400). Choices are answered
    as "C. $12.50": the choice's text alone would miss when it has a regex character (test_extract_option_stages).
    """
    answers: dict[str, str] = {}
    for task in TASKS:
        dataset = load_dataset(sample_dir, task)
        for s in dataset.samples:
            letter = "" if s.choices is None else f"{option_letter(s.choices.index(s.response))}. "
            answers[_sample_key(s, dataset.name)] = letter + s.response
    del answers[_sample_key(load_dataset(sample_dir, "ALFRED").samples[1], "ALFRED")]
    stub = Stub(answers)
    yield stub
    stub.close()


def test_run_sends_milebench_requests_and_scores_them(sample_dir: Path, oracle: Stub) -> None:
    client = Client(oracle.url, max_tokens=7, extra_body={"custom_params": {"kv_budget": 0.1}})
    results = run(sample_dir, list(TASKS), client, concurrency=3, progress=None)
    assert len(oracle.requests) == sum(len(load_dataset(sample_dir, t).samples) for t in TASKS)
    request = next(r for r in oracle.requests if "price of the ticket" in json.dumps(r))
    assert (request["temperature"], request["max_tokens"], request["custom_params"]) == (0, 7, {"kv_budget": 0.1})
    parts = request["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in parts[1::2])

    tasks = results["tasks"]
    assert set(tasks) == set(TASKS)
    for task, result in tasks.items():
        failed = 1 if task == "ALFRED" else 0
        assert (result["errors"], result["count"]) == (failed, len(result["samples"]))
        # The ground truth scores 1 under every rule (ROUGE-L up to its 1e-8); the failed request scores 0.
        assert result["score"] == pytest.approx(1 - failed / result["count"], abs=1e-7)
    assert tasks["TN"]["rule"] == "needle" and tasks["MMCoQA"]["rule"] == "substring"
    assert tasks["DocVQA"]["metric"] == "accuracy" and tasks["IEdit"]["metric"] == "rouge_l_f"
    assert tasks["TN"]["levels"] == {
        level: {"score": pytest.approx(1.0), "count": 1} for level in ("Few", "Medium", "Many")
    }
    alfred = tasks["ALFRED"]["samples"][1]
    assert alfred["error"].startswith("HTTP 400") and alfred["score"] == 0.0 and alfred["level"] == "Medium"
    assert tasks["DocVQA"]["samples"][0]["extracted"] == "C"


def test_cli_writes_json_and_exits_1_on_failed_requests(
    sample_dir: Path, oracle: Stub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.json"
    args = ["--data-dir", str(sample_dir), "--server", oracle.url, "--out", str(out), "--image-transport", "file"]
    assert main([*args, "--tasks", "TN,CLEVR-C", "--limit", "1"]) == 0
    results = json.loads(out.read_text())
    assert list(results["tasks"]) == ["TN", "CLEVR-C"] and results["average"] == pytest.approx(1.0)
    url = oracle.requests[-1]["messages"][0]["content"][1]["image_url"]["url"]
    assert url.startswith("file:///") and url.endswith(".png")
    assert "CLEVR-C  CLEVR-Change" in capsys.readouterr().out
    assert main([*args, "--tasks", "ALFRED"]) == 1
    assert json.loads(out.read_text())["tasks"]["ALFRED"]["errors"] == 1


def test_unreachable_server_is_an_error_not_a_crash() -> None:
    answer = ask(["hello"], Client("http://127.0.0.1:9", timeout=5))  # the discard port: nothing listens
    assert answer.text == "" and answer.error is not None and answer.error.startswith("URLError")


def test_progress_prints_a_line_per_tenth_off_a_terminal() -> None:
    stream = io.StringIO()
    meter = Progress(20, stream)
    for step in range(20):
        meter.advance(failed=step == 3)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("milebench: 20/20 answered, 1 failed")


def test_cli_checks_data_before_sending(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="images missing"):
        main(
            [
                "--data-dir",
                str(SAMPLE),
                "--server",
                "http://127.0.0.1:9",
                "--tasks",
                "IEdit",
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
    with pytest.raises(SystemExit):
        main(["--data-dir", str(SAMPLE), "--server", "x", "--max-context-tokens", "100"])


# ---------------------------------------------------------------------------------------------------------------
# With the tiny Qwen2-VL: truncation with its tokenizer; the CLI against SGLang serving it with MadaKV
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from madakv_sglang.checkpoints import write_checkpoint

    # The directory name contains "qwen2_vl": SGLang picks its qwen2-vl chat template by path.
    return write_checkpoint("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl"))


def test_cli_truncates_with_the_model_tokenizer(
    sample_dir: Path, oracle: Stub, tiny_qwen2_vl: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_vl)
    sample = load_dataset(sample_dir, "TN").samples[1]  # 6 images, 4 tokens each in this model
    instruction = len(tokenizer.encode(sample.instruction, add_special_tokens=False))
    budget = 200
    main(
        [
            "--data-dir",
            str(sample_dir),
            "--server",
            oracle.url,
            "--tasks",
            "TN",
            "--limit",
            "2",
            "--max-context-tokens",
            str(budget),
            "--tokenizer",
            str(tiny_qwen2_vl),
            "--tokens-per-image",
            "4",
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    (request,) = [r for r in oracle.requests if "90714" in json.dumps(r)]
    parts = request["messages"][0]["content"]
    texts = [p["text"] for p in parts if p["type"] == "text"]
    images = sum(p["type"] == "image_url" for p in parts)
    assert texts[0].startswith(sample.instruction + "\n") and texts[-1].endswith("What is the passkey?")
    assert 0 < images < len(sample.images)  # the context's beginning went, its end stayed
    used = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts) + 4 * images
    assert instruction < used <= budget + 1  # + 1: the "\n" after the instruction is not counted, as MileBench


def test_cli_against_sglang_with_madakv(
    sample_dir: Path, tiny_qwen2_vl: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.sglang_server import Server

    model = tiny_qwen2_vl
    logs = tmp_path_factory.mktemp("milebench_e2e")
    out = logs / "results.json"
    args = ["--kv-policy", "madakv", "--kv-budget", "0.5", "--kv-window", "8", "--max-total-tokens", "8192"]
    with Server(model, args, logs / "server.log") as server:
        command = [
            sys.executable,
            "-m",
            "benchmarks.milebench",
            "--data-dir",
            str(sample_dir),
            "--server",
            server.url,
            "--limit",
            "1",
            "--max-tokens",
            "4",
            "--concurrency",
            "2",
            "--extra-body",
            '{"custom_params": {"kv_budget": 0.3}}',
            "--out",
            str(out),
        ]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        log = server.log()
    assert done.returncode == 0, done.stdout + done.stderr + log[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"benchmark", "settings", "average", "elapsed_s", "tasks"}
    assert list(results["tasks"]) == list(TASKS)
    for result in results["tasks"].values():
        assert set(result) == {
            "dataset",
            "question_type",
            "rule",
            "metric",
            "score",
            "count",
            "errors",
            "levels",
            "samples",
        }
        assert (result["count"], result["errors"]) == (1, 0) and 0.0 <= result["score"] <= 1.0
        (sample,) = result["samples"]
        assert sample["error"] is None and isinstance(sample["prediction"], str)
        assert sample["prompt_tokens"] > 0 and 1 <= sample["completion_tokens"] <= 4
    # madakv compressed every request at the --extra-body budget (0.3), not the server's (0.5, exactly half here).
    kept = {line.prompt_slots: line.kept_slots for line in request_lines(log) if line.compressed}
    for result in results["tasks"].values():
        prompt = result["samples"][0]["prompt_tokens"]
        assert kept[prompt] < prompt / 2, (prompt, kept)
