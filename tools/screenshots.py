"""Drive the real window through its main states and screenshot the whole screen.

Run under a virtual display so the pictures are what a person would see:

    Xvfb :99 -screen 0 1440x900x24 &
    DISPLAY=:99 .venv/bin/python tools/screenshots.py DOCS_FOLDER OUT_FOLDER "question"

Uses a fresh library in OUT_FOLDER/home with the installed default model; writes
01-first-run.png … 06-dark.png (ImageMagick's `import -window root` takes them).
Nothing here is used by the app or the tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def main(documents: Path, out: Path, question: str) -> int:
    from engine.paths import models_dir
    from engine.runtime import DEFAULT_MODEL

    model = models_dir() / DEFAULT_MODEL  # resolved before QUIRE_HOME moves
    home = out / "home"
    os.environ["QUIRE_HOME"] = str(home)
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from app.gui.main import MainWindow
    from app.gui.settings_dialog import SettingsDialog
    from app.gui.theme import apply_theme
    from app.settings import AppSettings

    app = QApplication(sys.argv[:1])
    app.setApplicationName("Quire")
    apply_theme(app, "light")
    settings = AppSettings(model=str(model), max_answer_tokens=96)
    window = MainWindow(
        settings=settings,
        settings_file=home / "settings.json",
        library_path=home / "library.db",
        qsettings=QSettings(str(out / "layout.ini"), QSettings.Format.IniFormat),
    )
    window.setGeometry(10, 10, 1420, 860)
    window.show()

    def pump(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)

    def wait(condition, limit: float = 900) -> None:
        end = time.monotonic() + limit
        while not condition():
            pump(0.05)
            if time.monotonic() > end:
                raise TimeoutError("state not reached")

    def shot(name: str) -> None:
        pump(0.4)
        subprocess.run(["import", "-window", "root", str(out / f"{name}.png")], check=True)
        print("wrote", out / f"{name}.png", flush=True)

    wait(lambda: window.engine_ready)
    shot("01-first-run")
    window.add_paths([str(p) for p in sorted(documents.iterdir())])
    wait(lambda: any(row.caching is not None for row in window.library.model.rows))
    pump(1.5)
    shot("02-library-caching")
    wait(lambda: window.library.model.rows and all(row.cached for row in window.library.model.rows if row.record.status == "ready"))
    window.conversation.question.setPlainText(question)
    window.conversation._on_submit()
    wait(lambda: len(window.conversation.live_answer) > 40)
    shot("03-answer-streaming")
    wait(lambda: not window.answering)
    if window.evidence.model.citations:
        window.evidence._open_row(0)
    shot("04-answer-evidence-source")
    dialog = SettingsDialog(window.settings, window)
    dialog.show()
    dialog.move(window.geometry().center() - dialog.rect().center())
    shot("05-settings")
    dialog.close()
    apply_theme(app, "dark")
    shot("06-dark")
    window.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]))
