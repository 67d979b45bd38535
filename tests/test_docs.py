"""The documents point at what exists: every `BENCHMARKS.md, "<section>"` named in the README and
the docs is a heading of BENCHMARKS.md (two sections were once dropped while the README still
pointed at them)."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
# BENCHMARKS.md, "Section"   or   BENCHMARKS.md ("Section")   (a name may wrap across lines)
REFERENCE = re.compile(r'BENCHMARKS\.md,?\s*\(?"([^"]+)"')


def headings(path: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]


def references() -> list[tuple[str, str]]:
    found = []
    for path in [ROOT / "README.md", ROOT / "RELIABILITY.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = " ".join(path.read_text().split())
        found += [(path.name, name) for name in REFERENCE.findall(text)]
    return found


def test_every_benchmarks_section_the_docs_name_exists():
    sections = headings(ROOT / "BENCHMARKS.md")
    found = references()
    assert len(found) >= 5  # the pattern still reads the references the README makes
    assert not missing(found, sections), f"named but not in BENCHMARKS.md: {missing(found, sections)}"


def missing(found: list[tuple[str, str]], sections: list[str]) -> list[tuple[str, str]]:
    return [(doc, name) for doc, name in found if not any(title.startswith(name) for title in sections)]


def test_the_check_catches_a_section_that_is_not_there():
    text = " ".join('see BENCHMARKS.md, "Ingest on\nRay" and BENCHMARKS.md ("Nowhere")'.split())
    assert REFERENCE.findall(text) == ["Ingest on Ray", "Nowhere"]
    found = [("README.md", name) for name in REFERENCE.findall(text)]
    assert missing(found, headings(ROOT / "BENCHMARKS.md")) == [("README.md", "Nowhere")]
