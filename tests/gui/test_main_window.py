"""The real service path (LocalService, no scripting) with a model file that does not
exist: the window opens, says why in one line, and keeps Ask disabled."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QSettings  # noqa: E402

from app.gui.main import MainWindow  # noqa: E402
from app.settings import AppSettings  # noqa: E402


def test_window_survives_a_missing_model(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("QUIRE_HOME", str(tmp_path / "home"))
    missing = tmp_path / "no-such-model.gguf"
    window = MainWindow(
        settings=AppSettings(model=str(missing)),
        settings_file=tmp_path / "settings.json",
        library_path=tmp_path / "library.db",
        qsettings=QSettings(str(tmp_path / "layout.ini"), QSettings.Format.IniFormat),
    )
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(window.banner.isVisible, timeout=20000)
    message = window.banner.text()
    assert "no-such-model.gguf" in message
    assert "Traceback" not in message
    assert window.model_label.text() == "Model: not loaded"
    assert not window.conversation.ask.isEnabled()
    window.close()
