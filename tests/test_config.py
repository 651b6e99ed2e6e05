"""`quire config` shows and sets the settings the window and the commands share."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quire(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", "config", *args], capture_output=True, text=True, cwd=ROOT,
                          env={"QUIRE_HOME": str(home), "PATH": "/usr/bin:/bin"})


def test_config_shows_sets_checks_and_resets(tmp_path):
    home = tmp_path / "home"
    listing = quire(home).stdout
    assert "precision          int8" in listing and "reader_api_key     (not set)" in listing
    assert quire(home, "precision", "int4").stdout == "precision = int4\n"
    assert quire(home, "auto_cache", "on").stdout == "auto_cache = true\n"
    assert quire(home, "reader", "http://127.0.0.1:11434/v1/qwen2.5:7b").returncode == 0
    assert quire(home, "reader_api_key", "s3cret").stdout == "reader_api_key = (set)\n"
    saved = json.loads((home / "settings.json").read_text())
    assert (saved["precision"], saved["auto_cache"], saved["reader_api_key"]) == ("int4", True, "s3cret")
    assert "s3cret" not in quire(home).stdout  # a key is never printed
    bad = quire(home, "precision", "fp8")
    assert bad.returncode == 1 and "one of int8, int4, fp16" in bad.stderr
    assert quire(home, "max_answer_tokens", "3").returncode == 1  # out of range, as the dialog refuses it
    assert quire(home, "precision", "--reset").stdout == "precision = int8\n"
    assert quire(home, "precision").stdout == "int8\n"
    assert json.loads((home / "settings.json").read_text())["reader"] == "http://127.0.0.1:11434/v1/qwen2.5:7b"
