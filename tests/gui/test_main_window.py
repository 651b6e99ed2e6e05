"""The minimal window: it opens offscreen, reports a model that cannot be loaded in
its status bar instead of crashing, and keeps Ask disabled without a model."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from app.gui.main import MainWindow  # noqa: E402


def test_window_survives_a_missing_model(qtbot, tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    window = MainWindow(str(missing))
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: window.statusBar().currentMessage().startswith("Error:"), timeout=20000)
    message = window.statusBar().currentMessage()
    assert "no-such-model.gguf" in message
    assert "Traceback" not in message
    assert not window.send.isEnabled()
    window.close()
