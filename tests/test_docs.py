"""The docs the code cites exist: every ``docs/design.md §n`` names a section of that file, and nothing cites the
design brief outside the repository (``DESIGN §n``, ``STYLE §n``), which a user of the package does not have."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["madakv_sglang", "kernels", "launch", "benchmarks", "tests", "README.md", "docs"]


def _texts() -> dict[Path, str]:
    files: list[Path] = []
    for name in SOURCES:
        path = ROOT / name
        files += [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in (".py", ".md")]
    return {path: path.read_text() for path in files if ".venv" not in path.parts}


def test_every_design_citation_names_a_section() -> None:
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", (ROOT / "docs/design.md").read_text(), re.MULTILINE)}
    assert sections == set(range(1, len(sections) + 1)) and len(sections) >= 9, sections
    cited: list[tuple[Path, int]] = []
    for path, text in _texts().items():
        for match in re.finditer(r"docs/design\.md ((?:§\d+(?:[-,] ?)?)+)", text):
            cited += [(path, int(n)) for n in re.findall(r"§(\d+)", match.group(1))]
    assert len(cited) >= 20, "the code cites the design (a broken pattern would find nothing)"
    missing = [f"{path.relative_to(ROOT)}: §{n}" for path, n in cited if n not in sections]
    assert not missing, missing


def test_nothing_cites_the_brief_outside_the_repository() -> None:
    stale = [
        f"{path.relative_to(ROOT)}: {m.group(0)}"
        for path, text in _texts().items()
        for m in re.finditer(r"\b(?:DESIGN|STYLE) §\d+|DESIGN\.md", text)
        if path.name != "test_docs.py"
    ]
    assert not stale, stale
