"""docs/BENCHMARKS.md is generated from docs/results.json (issue 27): the two agree, and
every row of the registry is complete and points at a study that exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app.cli import main
from bench.report import MET_VALUES, RECORD_KEYS, record_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return json.loads((DOCS / "results.json").read_text())


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors, fence = set(), False
    for line in markdown.split("\n"):
        if line.startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            anchors.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return anchors


def test_the_committed_record_is_what_the_registry_renders(rows):
    assert record_markdown(rows) == (DOCS / "BENCHMARKS.md").read_text()


def test_quire_bench_report_regenerates_the_record(capsys):
    assert main(["bench", "report", str(DOCS / "results.json")]) == 0
    assert capsys.readouterr().out == (DOCS / "BENCHMARKS.md").read_text()


def test_every_row_is_complete_and_its_study_exists(rows):
    assert len(rows) >= 40
    for row in rows:
        assert set(RECORD_KEYS) <= set(row), row
        assert all(isinstance(row[key], str) and row[key] for key in RECORD_KEYS), row
        assert row["met"] in MET_VALUES, row
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["date"]), row
        path, _, anchor = row["study"].partition("#")
        assert path.startswith("lab/") and (DOCS / path).is_file(), row["study"]
        assert anchor in _anchors((DOCS / path).read_text()), row["study"]


def test_every_number_of_a_figure_is_in_its_study(rows):
    for row in rows:
        study = re.sub(r"\s+", " ", (DOCS / row["study"].partition("#")[0]).read_text())
        for number in re.findall(r"\d+(?:[.,]\d+)*", row["figure"]):
            assert number in study, (number, row["target"])


def test_a_row_without_a_key_or_with_an_unknown_verdict_is_refused(rows):
    incomplete = {key: value for key, value in rows[0].items() if key != "machine"}
    with pytest.raises(ValueError, match="machine"):
        record_markdown([incomplete])
    with pytest.raises(ValueError, match="met must be one of"):
        record_markdown([{**rows[0], "met": "nearly"}])


def test_a_pipe_in_a_cell_does_not_split_the_table(rows):
    markdown = record_markdown([{**rows[0], "figure": "a | b"}])
    assert "| a \\| b |" in markdown
