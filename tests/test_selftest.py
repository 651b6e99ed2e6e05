"""`quire gui --selftest` end to end in a subprocess, as the packaged app's smoke test
runs it: the default model, a PDF written by Qt, one question, evidence on page 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_selftest_passes_with_the_default_model():
    from engine.paths import models_dir
    from engine.runtime import DEFAULT_MODEL

    if not (models_dir() / DEFAULT_MODEL).is_dir():
        pytest.skip(f"{DEFAULT_MODEL} is not installed (quire models install)")
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "gui", "--selftest"], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stderr[-2000:]
    report = json.loads(lines[-1])
    assert result.returncode == 0, report
    assert report["ok"] is True and all(report["checks"].values())
    assert "Elspeth" in report["answer"]
    assert report["document"]["pages"] == 3
    assert report["viewer"] == {"mode": "pdf", "page": 1}
