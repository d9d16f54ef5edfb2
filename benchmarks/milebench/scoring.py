"""MileBench's scoring rules, re-implemented: ROUGE-L F, option-letter accuracy, needle hits, Few/Medium/Many.

Written from MileBench's ``evaluate.py`` (github.com/MileBench/MileBench, HEAD) and the ``rouge==1.0.1`` package
it calls, so that a score here is the score MileBench's own script would give the same predictions. Their quirks
are kept on purpose, each marked "MileBench:" below; changing one would make our numbers incomparable with
published ones.

Which rule a dataset gets (``evaluate.py``'s ``main``): a name containing ``NeedleInAHaystack`` -> ``needle``
(hit when the normalized answer is one of the prediction's whitespace-separated words); ``MMCoQA`` ->
``substring`` (hit when the answer is a substring of the prediction); else by ``meta_data.question_type``:
``open-ended`` -> ``rouge`` (ROUGE-L F), ``multi-choice`` -> ``choice`` (accuracy after option extraction).
Both strings are normalized first (:func:`normalize`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Rule = Literal["needle", "substring", "rouge", "choice"]
Level = Literal["Few", "Medium", "Many"]
LEVELS: tuple[Level, ...] = ("Few", "Medium", "Many")

_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# MileBench writes "(?!<=\d)(\.)(?!\d)": the first group is a look-*ahead* for "<=" (a typo for a look-behind),
# which never fires before a ".", so every period not followed by a digit goes. It also passes re.UNICODE (32)
# as sub()'s *count* argument, so at most 32 periods are removed.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIODS_REMOVED = 32
_ROUGE_EPSILON = 1e-8  # rouge's F = 2PR / (P + R + 1e-8)
_REGEX_SPECIAL = ("\\", ".", "^", "$", "*", "+", "?", "{", "}", "[", "]", "|", "(", ")")


def normalize(text: str) -> str:
    """MileBench's ``Eval.process``: one line, punctuation dropped or spaced, outer quotes stripped, lowercase.

    Each punctuation mark is deleted when it touches a space anywhere in the *original* text (or when the text
    has a digit-comma-digit), else replaced by a space; then periods not followed by a digit go (see _PERIOD).
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    out = _PERIOD.sub("", out, count=_PERIODS_REMOVED)
    return out.strip("'").strip('"').strip().lower()


def _lcs_words(reference: list[str], hypothesis: list[str]) -> set[str]:
    """The words of one longest common subsequence, the one rouge's back-trace picks (on a tie it moves along
    the hypothesis first); which one matters because only distinct words are counted."""
    n, m = len(reference), len(hypothesis)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            if reference[i - 1] == hypothesis[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    words: set[str] = set()
    i, j = n, m
    while i > 0 and j > 0:
        if reference[i - 1] == hypothesis[j - 1]:
            words.add(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def _sentences(text: str) -> list[list[str]]:
    """rouge's split: sentences at every ".", whitespace collapsed, words at single spaces."""
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def rouge_l_f(hypothesis: str, reference: str) -> float:
    """ROUGE-L F as ``rouge.Rouge().get_scores(hyp, ref)[0]["rouge-l"]["f"]`` (rouge 1.0.1, summary level).

    Not the textbook LCS / length: rouge counts *distinct* words. The overlap is the number of distinct words in
    the union, over every (reference sentence, hypothesis sentence) pair, of one LCS per pair; P and R divide it
    by the distinct words of the hypothesis and of the reference. 0.0 when either side has no sentence.
    """
    hyp, ref = _sentences(hypothesis), _sentences(reference)
    if not hyp or not ref:
        return 0.0
    union: set[str] = set()
    for ref_words in ref:
        for hyp_words in hyp:
            union |= _lcs_words(ref_words, hyp_words)
    precision = len(union) / len({w for s in hyp for w in s})
    recall = len(union) / len({w for s in ref for w in s})
    return 2.0 * precision * recall / (precision + recall + _ROUGE_EPSILON)


def option_letter(index: int) -> str:
    """MileBench's ``Eval.char``: A..Z, then AA..AZ, then BA.. (only GPR1200 has more than 26 choices)."""
    if index < 26:
        return chr(65 + index)
    if index < 52:
        return "A" + chr(65 + index - 26)
    return "B" + chr(65 + index - 52)


def _escape(option: str) -> str:
    escaped = normalize(option)
    for char in _REGEX_SPECIAL:
        escaped = escaped.replace(char, "\\" + char)
    return escaped


def extract_option(prediction: str, choices: Sequence[str]) -> str:
    """The option letter(s) a normalized prediction picks among normalized choices (``Eval.match_choice``).

    1. letter + choice (``"b a blue house"``, what "B. A blue house" normalizes to): the first match's letter;
    2. the choice's text alone, spaces ignored on both sides;
    3. the prediction is itself a key of one or two letters (``"b"``);
    4. otherwise every character of the prediction that is an option key, upper-cased and joined (so "the answer
       is b" reads "AB", a miss).
    MileBench: an empty prediction reads "C"; in step 2 the matched text is compared with the *regex-escaped*
    choice, so a choice containing ``. $ ( ) ...`` is never found by its text alone.
    """
    options = {option_letter(i): choice for i, choice in enumerate(choices)}
    if prediction == "":
        return "C"
    with_letter = "|".join(_escape(f"{key} {choice}") for key, choice in options.items())
    found = re.search(f"({with_letter})", prediction, re.S)
    if found:
        return found.group(0)[0].upper()
    bare = {key: _escape(choice).replace(" ", "") for key, choice in options.items()}
    found = re.search(f"({'|'.join(bare.values())})", prediction.replace(" ", ""), re.S)
    if found:
        for key, pattern in bare.items():
            if found.group(0).strip() == pattern:
                return key
    if len(prediction) in (1, 2) and prediction.upper() in options:
        return prediction.upper()
    return "".join(char.upper() for char in prediction if char.upper() in options)


def rule_for(dataset: str, question_type: str) -> Rule:
    """The scoring rule of a dataset directory (module docstring)."""
    if "NeedleInAHaystack" in dataset:
        return "needle"
    if "MMCoQA" in dataset:
        return "substring"
    if question_type == "open-ended":
        return "rouge"
    if question_type == "multi-choice":
        return "choice"
    raise ValueError(f"{dataset}: question_type {question_type!r} is neither 'open-ended' nor 'multi-choice'")


@dataclass(frozen=True)
class SampleScore:
    """One prediction's score in [0, 1]; ``extracted`` is the option letter read from it (``choice`` only)."""

    score: float
    extracted: str | None = None


def score_sample(rule: Rule, prediction: str, response: str, choices: Sequence[str] | None = None) -> SampleScore:
    """Score one raw prediction against the raw ground truth (both are normalized here).

    Raises ValueError for a multiple-choice sample whose answer is not among its choices (:func:`answer_index`).
    """
    pred, gt = normalize(prediction), normalize(response)
    if rule == "needle":
        return SampleScore(float(gt in pred.split()))
    if rule == "substring":
        return SampleScore(float(gt in pred))
    if rule == "rouge":
        # MileBench scores an empty prediction 0 without calling rouge (which would raise).
        return SampleScore(rouge_l_f(pred, gt) if pred else 0.0)
    normalized = [normalize(choice) for choice in choices or ()]
    extracted = extract_option(pred, normalized)
    return SampleScore(float(extracted == option_letter(answer_index(response, choices or ()))), extracted)


def answer_index(response: str, choices: Sequence[str]) -> int:
    """Where the answer sits among the choices, both normalized (the first one on a tie, as MileBench).

    Raises ValueError when it is not there (MileBench asserts).
    """
    normalized = [normalize(choice) for choice in choices]
    try:
        return normalized.index(normalize(response))
    except ValueError:
        raise ValueError(f"answer {response!r} is not one of the choices {list(choices)}") from None


def image_level(n_images: int) -> Level:
    """Few (< 6 images), Medium (6-31), Many (> 31): MileBench derives the level from the image count (its
    HEAD ``get_image_quantity_level``), not from the JSON's ``image_quantity_level`` field."""
    if n_images < 6:
        return "Few"
    if n_images > 31:
        return "Many"
    return "Medium"


@dataclass(frozen=True)
class Summary:
    """Mean score and count, over all samples and per level; a level with no samples has score None (MileBench
    writes 0 there, which reads like a measured zero)."""

    score: float | None
    count: int
    levels: dict[Level, tuple[float | None, int]]


def summarize(scores: Sequence[float], levels: Sequence[Level]) -> Summary:
    def mean(values: Sequence[float]) -> float | None:
        return sum(values) / len(values) if values else None

    by_level = {level: [s for s, lv in zip(scores, levels, strict=True) if lv == level] for level in LEVELS}
    return Summary(mean(scores), len(scores), {lv: (mean(v), len(v)) for lv, v in by_level.items()})
