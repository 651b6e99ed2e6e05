"""`quire gui --selftest`: prove an installation (a packaged bundle above all) works.

Opens the real main window offscreen over a temporary library and cache, installs
the default model if this is the first run (from the GGUF a bundle carries),
writes a small three-page PDF with Qt, adds it through the window, lets the cache
build, asks one question and checks the answer and its evidence; the source viewer
opens the evidence. Prints one JSON line with what it measured and exits 0 only if
every step worked. The user's own library and cache are not touched (the models
folder is shared, so a later start does not convert the model again).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

FACT = "The lighthouse keeper on Marrow Island was named Elspeth Varga."
QUESTION = "Who was the lighthouse keeper on Marrow Island?"
FILLER = (
    "The old mill stood beside the stone wall every morning. A quiet river drifted past the fishing "
    "boats in the spring. The village baker looked over the church tower before the storm. "
)


def write_pdf(path: Path) -> None:
    """Three pages with the fact on the second, drawn by Qt (no extra library)."""
    from PySide6.QtCore import QMarginsF
    from PySide6.QtGui import QPageLayout, QPageSize, QPdfWriter, QTextDocument

    writer = QPdfWriter(str(path))
    writer.setPageLayout(QPageLayout(QPageSize(QPageSize.PageSizeId.A5), QPageLayout.Orientation.Portrait, QMarginsF(15, 15, 15, 15)))
    document = QTextDocument()
    pages = [FILLER * 3, FILLER + FACT + " " + FILLER, FILLER * 3]
    document.setHtml("".join(f'<p style="page-break-after: always">{text}</p>' for text in pages[:-1]) + f"<p>{pages[-1]}</p>")
    document.print_(writer)


def run_selftest(timeout: float = 1200.0) -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv[:1])
    started = time.perf_counter()
    report: dict = {"ok": False}
    folder = Path(tempfile.mkdtemp(prefix="quire-selftest-"))
    try:
        from app.gui.main import MainWindow
        from app.settings import AppSettings

        pdf = folder / "marrow-island.pdf"
        write_pdf(pdf)
        settings = AppSettings(cache_dir=str(folder / "cache"), max_answer_tokens=24, auto_cache=True)
        window = MainWindow(
            settings=settings,
            settings_file=folder / "settings.json",
            library_path=folder / "library.db",
            qsettings=QSettings(str(folder / "layout.ini"), QSettings.Format.IniFormat),
        )
        window.show()
        answers: list[dict] = []
        window._inbox.answer_finished.connect(answers.append)

        def wait(condition, what: str) -> None:
            deadline = time.monotonic() + timeout
            while not condition():
                app.processEvents()
                time.sleep(0.005)
                if window.banner.isVisible():
                    raise RuntimeError(f"{what}: {window.last_error}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what}: no result after {timeout:.0f} s")

        wait(lambda: window.engine_ready, "loading the model")
        report["model"] = window.engine_info.get("model")
        report["model_ready_seconds"] = round(time.perf_counter() - started, 2)
        window.add_paths([str(pdf)])
        wait(lambda: any(row.cached for row in window.library.model.rows), "adding and caching the PDF")
        record = window.library.model.rows[0].record
        report["document"] = {"status": record.status, "pages": record.pages, "tokens": record.tokens}
        window.ask(QUESTION)
        wait(lambda: bool(answers), "answering")
        message = window.store.messages(window.conversation_id)[-1]
        citations = window.evidence.model.citations
        report["answer"] = message.content
        report["evidence"] = [{"page": c.page_label, "weight": round(c.weight, 3), "quote": c.quote[:80]} for c in citations[:3]]
        if citations:
            window.evidence._open_row(0)
            report["viewer"] = {"mode": window.viewer.mode(), "page": window.viewer.current_page()}
        checks = {
            "pdf read with 3 pages": record.pages == 3,
            "answer names the keeper": "Elspeth" in message.content,
            "evidence returned": bool(citations),
            "evidence on the fact's page": any(c.page_label == "2" for c in citations[:3]),
            "viewer opened the PDF": report.get("viewer", {}).get("mode") == "pdf",
        }
        report["checks"] = checks
        report["ok"] = all(checks.values())
        window.close()
    except Exception as error:  # noqa: BLE001 — the self-test reports, never tracebacks
        report["error"] = f"{type(error).__name__}: {error}"
    report["seconds"] = round(time.perf_counter() - started, 2)
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1
