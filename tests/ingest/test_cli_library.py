"""`quire add/list/show/remove/search` over a temporary library, with the fake .txt
reader in place of the real readers."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ingest.jobs
from app import cli_library
from tests.ingest.fake_reader import EXTENSIONS, FakeReader

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QUIRE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(ingest.jobs, "_default_reader", lambda: FakeReader())
    monkeypatch.setattr(ingest.jobs, "_default_extensions", lambda: EXTENSIONS)
    return tmp_path / "home"


@pytest.fixture
def books(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "moby.txt").write_text("Title: Moby-Dick\nCall me Ishmael.\fThe white whale.", encoding="utf-8")
    (folder / "walden.txt").write_text("Title: Walden\nI went to the woods.", encoding="utf-8")
    return folder


def quire(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_library.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_add_list_show_search_remove(home, books, capsys):
    code, out, err = quire(capsys, "add", str(books))
    assert code == 0 and out == ""
    lines = err.splitlines()
    assert lines[0].startswith("[1/2 ") and lines[0].endswith("] moby.txt: added as #1 (2 pages)")
    assert lines[1].startswith("[2/2 100%] walden.txt: added as #2 (1 page)")
    assert lines[2].startswith("2 added, 0 updated, 0 duplicate, 0 unchanged, 0 failed; 3 pages in ")
    assert (home / "library.db").is_file()

    code, out, _ = quire(capsys, "list")
    assert code == 0
    assert out.splitlines() == [
        "  id  status     pages    tokens  title",
        "   1  ready          2         -  Moby-Dick",
        "   2  ready          1         -  Walden",
    ]
    code, out, _ = quire(capsys, "list", "--json")
    listed = json.loads(out)
    assert [(d["id"], d["title"], d["pages"], d["path"]) for d in listed] == [
        (1, "Moby-Dick", 2, str(books / "moby.txt")), (2, "Walden", 1, str(books / "walden.txt")),
    ]

    code, out, _ = quire(capsys, "show", "1")
    assert code == 0
    assert "title:       Moby-Dick" in out and "status:      ready" in out and "pages:       2" in out
    assert f"path:        {books / 'moby.txt'}" in out
    assert "  encrypted:        no" in out and "  sparse pages:     none" in out

    code, out, err = quire(capsys, "search", "white whale")
    assert (code, out) == (0, "#1 Moby-Dick, page 2: The [white whale].\n")
    code, out, err = quire(capsys, "search", "kraken")
    assert (code, out, err) == (0, "", "no pages contain 'kraken'\n")

    code, out, _ = quire(capsys, "remove", "1")
    assert (code, out) == (0, "removed #1 Moby-Dick\n")
    code, out, err = quire(capsys, "search", "whale")
    assert out == ""
    code, out, err = quire(capsys, "show", "1")
    assert (code, out, err) == (1, "", "quire: error: no document with id 1 in the library\n")


def test_add_reports_duplicates_and_failures(home, books, capsys):
    (books / "copy.txt").write_text("Title: Walden\nI went to the woods.", encoding="utf-8")
    (books / "empty.txt").write_text("", encoding="utf-8")
    code, out, err = quire(capsys, "add", str(books), str(books / "missing.pdf"))
    assert code == 1
    assert "walden.txt: duplicate of #1 'Walden'" in err
    assert f"quire: error: {books / 'empty.txt'}: empty.txt: the file is empty" in err.splitlines()
    assert f"quire: error: {books / 'missing.pdf'}: no such file or directory" in err.splitlines()
    _, out, _ = quire(capsys, "list")
    assert out.splitlines()[1:] == [
        "   1  ready          1         -  Walden",
        "   2  failed         0         -  empty.txt  (empty.txt: the file is empty)",
        "   3  ready          2         -  Moby-Dick",
    ]

    code, out, err = quire(capsys, "add", str(books / "moby.txt"))
    assert code == 0 and "moby.txt: unchanged" in err


def test_add_with_password(home, tmp_path, capsys):
    locked = tmp_path / "locked.txt"
    locked.write_text("ENCRYPTED: pw\nTitle: Locked\nsecret\ntext", encoding="utf-8")
    code, _, err = quire(capsys, "add", str(locked))
    assert code == 1 and "locked.txt is password-protected" in err
    code, _, err = quire(capsys, "add", str(locked), "--password", "pw")
    assert code == 0 and "locked.txt: added as #1" in err
    _, out, _ = quire(capsys, "search", "secret")
    assert out == "#1 Locked, page 1: [secret] text\n"


def test_search_errors_are_one_line(home, capsys):
    code, out, err = quire(capsys, "search", "  ")
    assert (code, out, err) == (1, "", "quire: error: nothing to search for: the phrase is empty\n")


def test_register_adds_the_commands_to_another_parser(home, books, capsys):
    parser = argparse.ArgumentParser(prog="quire")
    subparsers = parser.add_subparsers(dest="command", required=True)
    subparsers.add_parser("generate")
    cli_library.register(subparsers)
    args = parser.parse_args(["add", str(books / "walden.txt")])
    assert args.func(args) == 0
    args = parser.parse_args(["remove", "7"])
    assert args.func(args) == 1
    assert capsys.readouterr().err.endswith("quire: error: no document with id 7 in the library\n")


def test_errors_are_one_line_in_a_real_process(tmp_path):
    env = {**os.environ, "QUIRE_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli_library", "show", "42"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "quire: error: no document with id 42 in the library\n")
    listed = subprocess.run(
        [sys.executable, "-m", "app.cli_library", "list"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert (listed.returncode, listed.stdout) == (0, "the library is empty: add books with `quire add PATH`\n")
