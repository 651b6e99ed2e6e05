"""`quire bench gui`: does the window stay responsive while the engine works?

Opens the real main window (offscreen unless a display is asked for) over a fresh
library in a temporary folder, with the chosen model, and runs a LatencyProbe
through three phases: adding documents, building their cache, and answering one
question. Writes JSON with the event-loop delay per phase (max, p99, mean) and
the phase durations. The goal in the desktop-app issue is a worst delay ≤ 100 ms.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path


def run_gui_bench(
    documents: list[Path], question: str, *, model: str | None = None, max_tokens: int = 64, timeout: float = 1800.0
) -> dict:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from app.gui.main import MainWindow
    from bench.latency_probe import LatencyProbe
    from app.settings import AppSettings

    app = QApplication.instance() or QApplication([])
    folder = Path(tempfile.mkdtemp(prefix="quire-gui-bench-"))
    settings = AppSettings(model=model or "", cache_dir=str(folder / "cache"), max_answer_tokens=max_tokens, auto_cache=False)
    window = MainWindow(
        settings=settings,
        settings_file=folder / "settings.json",
        library_path=folder / "library.db",
        qsettings=QSettings(str(folder / "layout.ini"), QSettings.Format.IniFormat),
    )
    window.show()
    probe = LatencyProbe(20)
    result: dict = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "platform_plugin": os.environ.get("QT_QPA_PLATFORM"),
        "documents": [str(p) for p in documents],
        "phases": {},
    }

    def wait(condition, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            app.processEvents()
            time.sleep(0.002)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} took longer than {timeout:.0f} s")
            if window.banner.isVisible() and window.last_error:
                raise RuntimeError(window.last_error)

    def phase(name: str, start, done) -> None:
        probe.start()
        started = time.perf_counter()
        start()
        wait(done, name)
        seconds = time.perf_counter() - started
        result["phases"][name] = {"seconds": round(seconds, 2), **probe.stop()}

    try:
        wait(lambda: window.engine_ready, "loading the model")
        result["model"] = window.engine_info.get("model")
        finished = []
        window._inbox.ingest_finished.connect(lambda _summary: finished.append("ingest"))
        phase("ingest", lambda: window.add_paths([str(p) for p in documents]), lambda: "ingest" in finished)
        window._inbox.cache_finished.connect(lambda _text: finished.append("cache"))
        phase("cache_build", window.build_cache, lambda: "cache" in finished)
        answered = []
        window._inbox.answer_finished.connect(answered.append)
        phase("answer", lambda: window.ask(question), lambda: bool(answered))
        stats = answered[0]["stats"]
        result["answer"] = {
            "text": window.store.messages(window.conversation_id)[-1].content,
            "time_to_first_token": stats.get("time_to_first_token"),
            "decode_tokens_per_second": stats.get("decode_tokens_per_second"),
            "memory_tokens": stats.get("memory_tokens"),
        }
        result["corpus_tokens"] = sum(r.record.tokens or 0 for r in window.library.model.rows)
    finally:
        window.close()
    return result


def main_json(result: dict, out: Path | None) -> str:
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
    return text
