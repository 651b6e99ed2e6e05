"""`quire doctor`: each item of a support request as a PASS/WARN/FAIL line, exit 1 on
any FAIL. A temporary QUIRE_HOME holds a real library (documents ingested from
files), a model converted by engine.model_store from a tiny GGUF, and cache segments
written by the segment store; each is then damaged and must turn its line to FAIL."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from app.cli import main
from app.cli_doctor import FAIL, NO_OCR, PASS, WARN
from app.settings import AppSettings, save_settings
from engine import install
from engine.corpus.store import SegmentStore
from engine.install import DefaultModel
from engine.model_store import convert_gguf
from engine.runtime import DEFAULT_MODEL
from ingest.jobs import ingest_paths
from ingest.library import Library
from ingest.ocr import installed as ocr_engines
from tests.corpus.test_store import make_kv
from tests.test_gguf_loader import write_tiny_gguf

MODEL = "tiny-model"


@pytest.fixture
def quire_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("QUIRE_HOME", str(home))
    monkeypatch.delenv("QUIRE_GGUF_DIR", raising=False)
    return home


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, dict], str]:
    """Run `quire doctor --json`; (exit status, {check: entry}, the text output too)."""
    code = main(["doctor", "--json", *args])
    entries = json.loads(capsys.readouterr().out)
    assert all(set(entry) == {"check", "status", "detail"} for entry in entries)
    assert all(entry["status"] in (PASS, WARN, FAIL) for entry in entries)
    assert main(["doctor"]) == code
    text = capsys.readouterr().out
    assert len(text.splitlines()) == len(entries)
    return code, {entry["check"]: entry for entry in entries}, text


@pytest.fixture
def tiny_model(quire_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A converted model under models/, chosen in the settings; the default models
    are reduced to it (pinned by its real sha256), so nothing else is missing."""
    gguf = tmp_path / "src" / f"{MODEL}.gguf"
    gguf.parent.mkdir()
    write_tiny_gguf(gguf)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    convert_gguf(gguf, quire_home / "models" / MODEL)
    save_settings(AppSettings(model=MODEL))
    pinned = DefaultModel(name=MODEL, parts=(), filename=gguf.name, size=gguf.stat().st_size, sha256=digest)
    monkeypatch.setattr(install, "DEFAULT_MODELS", [pinned])
    return gguf


def test_installed_model_passes_and_a_changed_byte_fails(tiny_model: Path, capsys) -> None:
    code, checks, text = doctor(capsys)
    line = checks[f"model {MODEL}"]
    assert line["status"] == PASS, line
    assert "matches, the pinned one" in line["detail"] and tiny_model.name in line["detail"]
    assert not [c for c in checks.values() if c["status"] == FAIL], text
    assert code == 0

    blob = bytearray(tiny_model.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size: only the hash can tell
    tiny_model.write_bytes(bytes(blob))
    code, checks, text = doctor(capsys)
    line = checks[f"model {MODEL}"]
    assert line["status"] == FAIL
    assert "checksum mismatch" in line["detail"]
    assert hashlib.sha256(bytes(blob)).hexdigest()[:16] in line["detail"]
    assert "`quire models install`" in line["detail"]
    assert f"FAIL  model {MODEL}: checksum mismatch" in text
    assert code == 1


def test_truncated_weights_fail(tiny_model: Path, quire_home: Path, capsys) -> None:
    weights = quire_home / "models" / MODEL / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size - 4)
    code, checks, _ = doctor(capsys)
    assert checks[f"model {MODEL}"]["status"] == FAIL
    assert "truncated" in checks[f"model {MODEL}"]["detail"]
    assert code == 1


def test_a_model_converted_from_another_file_than_the_pinned_one_fails(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    other = DefaultModel(name=MODEL, parts=(), filename=tiny_model.name, size=1, sha256="ab" * 32)
    monkeypatch.setattr(install, "DEFAULT_MODELS", [other])
    code, checks, _ = doctor(capsys)
    assert checks[f"model {MODEL}"]["status"] == FAIL
    assert "not the pinned abababab" in checks[f"model {MODEL}"]["detail"]
    assert code == 1


def test_library_counts_documents_by_status(quire_home: Path, tmp_path: Path, capsys) -> None:
    sources = tmp_path / "docs"
    sources.mkdir()
    (sources / "one.txt").write_text("The first document.\n", encoding="utf-8")
    (sources / "two.md").write_text("# Two\n\nThe second document.\n", encoding="utf-8")
    (sources / "three.txt").write_text("The third document.\n", encoding="utf-8")
    (sources / "broken.pdf").write_bytes(b"%PDF-1.7\nnot really a PDF at all")
    with Library() as library:
        summary = ingest_paths(library, [sources])
        assert len(summary.failed) == 1
        pending = library.begin_document(path=sources / "later.txt", content_hash="0" * 64)
        library.mark_pending(pending)
    code, checks, _ = doctor(capsys)
    library = checks["library"]
    assert library["status"] == PASS
    assert library["detail"].startswith("5 document(s): 1 pending, 3 ready, 1 failed")
    assert checks["library unfinished"]["status"] == WARN
    assert checks["library unfinished"]["detail"].startswith("1 document(s)")
    failed = [c for name, c in checks.items() if name.startswith("library document ")]
    assert len(failed) == 1 and "broken.pdf" in failed[0]["detail"]


def test_cache_size_and_a_damaged_segment(quire_home: Path, capsys) -> None:
    store = SegmentStore(quire_home / "cache" / "fingerprint0")
    sizes = [store.write(f"segment{n}", *make_kv(seed=n), layers=[0, 1]) for n in range(3)]
    code, checks, _ = doctor(capsys)
    cache = checks["cache"]
    assert cache["status"] == PASS
    on_disk = sum(p.stat().st_size for p in (quire_home / "cache").rglob("*") if p.is_file())
    assert on_disk >= sum(sizes)
    assert cache["detail"].startswith(f"{on_disk / 2**20:.1f} MiB in {quire_home / 'cache'}, 3 segment(s) of 1 model(s)")

    damaged = store.path_for("segment1")
    blob = bytearray(damaged.read_bytes())
    blob[-9] ^= 0x01  # the last byte of the values, before the trailer: payload only
    damaged.write_bytes(bytes(blob))
    code, checks, _ = doctor(capsys)
    cache = checks["cache"]
    assert cache["status"] == FAIL
    assert "1 fail their checksum" in cache["detail"] and str(damaged) in cache["detail"]
    assert str(store.path_for("segment0")) not in cache["detail"]
    assert code == 1


def test_a_fresh_install_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    home = tmp_path / "never-created"
    monkeypatch.setenv("QUIRE_HOME", str(home))
    code, checks, text = doctor(capsys)
    assert code == 1
    assert checks["home"]["status"] == WARN and "does not exist" in checks["home"]["detail"]
    assert checks[f"model {DEFAULT_MODEL}"]["status"] == FAIL
    assert "`quire models install`" in checks[f"model {DEFAULT_MODEL}"]["detail"]
    assert checks["library"]["status"] == WARN and "`quire add PATH`" in checks["library"]["detail"]
    assert checks["cache"]["status"] == PASS
    assert not (home / "library.db").exists() and not (home / "models").exists()
    assert "Traceback" not in text


def test_versions_and_device_are_reported(quire_home: Path, capsys) -> None:
    from importlib.metadata import version

    _, checks, _ = doctor(capsys)
    assert checks["torch"] == {"check": "torch", "status": PASS, "detail": version("torch")}
    assert checks["pypdf"]["detail"] == version("pypdf")
    assert checks["python"]["detail"].startswith(".".join(map(str, sys.version_info[:3])))
    device = checks["device"]
    assert device["status"] == PASS
    assert device["detail"].startswith(("torch on cpu, ", "torch on cuda, ", "mlx on "))
    assert "(settings: device=auto)" in device["detail"]


def test_a_device_the_machine_lacks_fails(quire_home: Path, capsys) -> None:
    save_settings(AppSettings(device="mps"))  # no Apple GPU on a Linux test box
    if sys.platform == "darwin":
        pytest.skip("a Mac may have MPS")
    _, checks, _ = doctor(capsys)
    assert checks["device"]["status"] == FAIL
    assert "device=mps" in checks["device"]["detail"]


def _fake_tesseract(folder: Path, version_line: str) -> None:
    folder.mkdir()
    script = folder / "tesseract"
    script.write_text(f"#!/bin/sh\necho '{version_line}'\necho ' leptonica-1.82.0'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.mark.skipif(os.name == "nt", reason="a shell script stands in for tesseract")
def test_ocr_engines_found_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_tesseract(tmp_path / "bin", "tesseract 9.8.7")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert ocr_engines() == ["tesseract 9.8.7 (eng)"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert ocr_engines() == []


def test_no_ocr_engine_is_a_warning(quire_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    _, checks, _ = doctor(capsys)
    assert checks["ocr"] == {"check": "ocr", "status": WARN, "detail": NO_OCR}


def test_doctor_exit_status_follows_the_worst_line(tiny_model: Path, quire_home: Path, capsys) -> None:
    # Every line PASS or WARN: 0. One model FAIL (the settings' model gone): 1.
    assert main(["doctor"]) == 0
    capsys.readouterr()
    save_settings(AppSettings(model="no-such-model"))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  model no-such-model: not installed" in out
    assert sum(line.startswith(FAIL) for line in out.splitlines()) == 1
