"""`quire bench tasks`' scoring and grouping, driven by a scripted answerer."""

from __future__ import annotations

from bench.tasks import TaskRunner, coverage, summarise_rows
from engine.corpus.build import CorpusDocument
from engine.corpus.tasks import TaskStats
from engine.generate import Token


class ScriptedAnswerer:
    """Summaries name the pages they were asked for; the model is never run."""

    model = None

    def __init__(self) -> None:
        self.asked: list[tuple[int | None, int | None]] = []

    def summarise(self, document, params, *, first_page=None, last_page=None):
        self.asked.append((first_page, last_page))
        yield Token(-1, "Tom paints the fence. " if first_page else "Tom paints the fence. Becky is lost in the cave.")
        yield TaskStats("summarise", parts=2 if first_page else 9, prompt_tokens=100)


def test_coverage_counts_a_point_when_any_of_its_forms_is_named():
    assert coverage([["whitewash", "fence"], ["becky"], ["cave"]], "Tom paints the FENCE.") == 1 / 3


def test_a_whole_book_is_scored_and_reported_apart_from_the_page_ranges():
    book = CorpusDocument("b", "Tom whitewashes the fence. " * 50, [(0, "1"), (700, "2")], "Book")
    runner = TaskRunner(ScriptedAnswerer(), {"book": book})
    points = [["fence"], ["becky"], ["cave"]]
    ranged = runner.run({"id": "r", "task": "summarise", "docs": ["book"], "pages": [1, 2], "points": points}, "quire")
    whole = runner.run({"id": "w", "task": "summarise", "docs": ["book"], "pages": [None, None], "points": points}, "quire")
    assert runner.answerer.asked == [(1, 2), (None, None)]
    assert (ranged["task"], whole["task"]) == ("summarise", "summarise-whole")
    assert (ranged["parts"], whole["parts"]) == (2, 9)
    summary = summarise_rows([ranged, whole])
    assert summary["summarise"]["quire"]["coverage"] == 33.3
    assert summary["summarise-whole"]["quire"]["coverage"] == 100.0
