"""The window with the real small model (SmolLM2-135M) over a generated three-page
PDF: add it, let the cache build, ask, and check the streamed answer, the evidence
page and the source viewer opening the PDF at that page. The model is the point
here, so nothing is scripted."""

from __future__ import annotations

import os
import random
import textwrap

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402

from app.gui.main import MainWindow  # noqa: E402
from app.settings import AppSettings  # noqa: E402
from tests.ingest.builders import write_pdf  # noqa: E402

MODEL = "smollm2-135m-instruct"
FACT = "The lighthouse keeper on Marrow Island was named Elspeth Varga."
QUESTION = "Who was the lighthouse keeper on Marrow Island?"
FILLER = [
    "The old mill stood beside the stone wall every morning.",
    "A quiet river drifted past the fishing boats in the spring.",
    "The village baker looked over the church tower before the storm.",
    "Autumn rain waited near the wheat fields as the bells rang.",
    "The harbour master rolled toward the empty station long after dusk.",
    "A flock of gulls gleamed above the wooden pier without a sound.",
]


def page_lines(rng: random.Random, sentences: int, fact: bool = False) -> list[str]:
    text = [rng.choice(FILLER) for _ in range(sentences)]
    if fact:
        text.insert(sentences // 2, FACT)
    return [line for sentence in text for line in textwrap.wrap(sentence, 64)]


@pytest.fixture
def model_path(monkeypatch, tmp_path):
    from engine.paths import models_dir

    path = models_dir() / MODEL  # resolved before QUIRE_HOME moves
    if not path.is_dir():
        pytest.skip(f"{MODEL} is not installed (quire models install)")
    monkeypatch.setenv("QUIRE_HOME", str(tmp_path / "home"))
    return path


def test_ask_the_real_model_about_a_pdf(qtbot, tmp_path, model_path):
    rng = random.Random(3)
    pdf = write_pdf(tmp_path / "marrow.pdf", [page_lines(rng, 10), page_lines(rng, 10, fact=True), page_lines(rng, 10)])
    window = MainWindow(
        settings=AppSettings(model=str(model_path), cache_dir=str(tmp_path / "cache"), max_answer_tokens=24),
        settings_file=tmp_path / "settings.json",
        library_path=tmp_path / "library.db",
        qsettings=QSettings(str(tmp_path / "layout.ini"), QSettings.Format.IniFormat),
    )
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: window.engine_ready, timeout=120000)
    assert MODEL in window.model_label.text()

    window.add_paths([str(pdf)])
    qtbot.waitUntil(lambda: any(row.record.status == "ready" for row in window.library.model.rows), timeout=180000)
    record = window.library.model.rows[0].record
    assert not window.library.model.rows[0].cached  # the answer needs no cache, and none is built unasked
    assert (record.status, record.pages) == ("ready", 3)
    assert record.tokens and record.tokens > 100

    tokens: list[str] = []
    window._inbox.token.connect(tokens.append)
    with qtbot.waitSignal(window._inbox.answer_finished, timeout=180000) as finished:
        window.ask(QUESTION)
    assert not window.banner.isVisible(), window.last_error
    answer = window.store.messages(window.conversation_id)[-1]
    assert len(tokens) > 1 and "".join(tokens) == answer.content  # streamed piece by piece, saved whole
    assert "Elspeth" in answer.content, answer.content
    stats = finished.args[0]["stats"]
    assert stats["passages_read"] >= 1 and stats["passages_from_cache"] == 0 and stats["context_tokens"] > 100
    assert stats["time_to_first_token"] > 0

    citations = window.evidence.model.citations
    assert citations and citations == sorted(citations, key=lambda c: -c.weight)
    on_fact = [c for c in citations[:3] if c.page_label == "2" and ("Elspeth" in c.quote or "Marrow" in c.quote)]
    assert on_fact, [(c.page_label, c.quote[:60], round(c.weight, 3)) for c in citations]
    row = citations.index(on_fact[0])
    window.evidence._open_row(row)
    assert window.viewer.mode() == "pdf"
    assert window.viewer.current_page() == on_fact[0].page_index == 1
    window.close()
