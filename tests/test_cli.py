"""The `quire` CLI: bad model files give one clear line on stderr and exit 1, never a
traceback; `quire models` lists what the data directory holds."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, env_home=None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    if env_home is not None:
        env["QUIRE_HOME"] = str(env_home)
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "empty"),
        (b"NOPE" + b"\0" * 64, "magic"),
        (b"GGUF\x03\x00\x00\x00" + b"\x01", "truncated"),
    ],
)
def test_bad_model_file_is_one_line(tmp_path, content, expected):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    done = run_cli("generate", "hello", "--model", str(bad), env_home=tmp_path / "home")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("quire: error:")
    assert expected in lines[0].lower()
    assert "Traceback" not in done.stderr


def test_unknown_model_name_lists_installed(tmp_path):
    done = run_cli("generate", "hello", "--model", "no-such-model", env_home=tmp_path)
    assert done.returncode == 1
    assert "not installed" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_models_on_an_empty_data_directory(tmp_path):
    done = run_cli("models", env_home=tmp_path)
    assert done.returncode == 0
    assert "no models installed" in done.stdout


def test_the_command_line_opens_the_answerer_the_app_would(tmp_path, monkeypatch):
    """`quire ask` and friends read the app's settings.json (model, cache folder and
    precision, reader); a flag overrides a setting for one command."""
    import argparse
    import json

    from app.cli_corpus import open_answerer
    from engine.paths import models_dir
    from engine.reader import RemoteReader

    model = models_dir() / "smollm2-135m-instruct"
    if not model.is_dir():
        pytest.skip("smollm2-135m-instruct is not installed (quire models install)")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("QUIRE_HOME", str(home))
    (home / "settings.json").write_text(json.dumps({
        "model": str(model), "cache_dir": str(tmp_path / "elsewhere"), "precision": "int4",
        "reader": "http://127.0.0.1:9/v1/qwen2.5:7b",
    }))
    answerer = open_answerer(argparse.Namespace())
    assert answerer.cache.root.parent == tmp_path / "elsewhere"
    assert answerer.cache.settings.precision == "int4"
    assert isinstance(answerer.reader, RemoteReader) and answerer.reader.spec.model == "qwen2.5:7b"
    answerer = open_answerer(argparse.Namespace(precision="int8", reader="http://127.0.0.1:9/v1/other"))
    assert answerer.cache.settings.precision == "int8" and answerer.reader.spec.model == "other"
