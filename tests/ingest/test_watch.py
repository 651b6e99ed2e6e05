"""Watched folders (ingest/watch.py): new and changed files come in, unchanged and
failed-unchanged files are left alone, gone files are marked missing (and kept),
returned ones unmarked, an unreachable folder marks nothing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ingest.errors import LibraryError
from ingest.library import Library
from ingest.watch import changes, scan


def write(path: Path, text: str, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def statuses(library: Library) -> dict[str, tuple[str, bool]]:
    return {Path(r.path).name: (r.status, r.missing_since is not None) for r in library.documents()}


def test_a_watched_folder_follows_its_files(tmp_path: Path) -> None:
    folder = tmp_path / "books"
    one = write(folder / "one.txt", "The first book, about harbours and ships.")
    write(folder / "deep" / "two.md", "# Two\n\nThe second book, about lighthouses.")
    write(folder / "notes.xyz", "not a supported file: never read")
    with Library(tmp_path / "library.db") as library:
        library.watch(folder)
        first = scan(library)
        assert sorted(p.name for p in first.to_read) == ["one.txt", "two.md"]
        assert len(first.ingest.added) == 2
        assert statuses(library) == {"one.txt": ("ready", False), "two.md": ("ready", False)}

        # Nothing changed: nothing to read.
        assert changes(library).to_read == []

        # A changed file, a new one, a broken one.
        write(one, "The first book, revised: about harbours, ships and tar.", mtime=one.stat().st_mtime + 10)
        write(folder / "three.txt", "A third book.")
        (folder / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
        second = scan(library)
        assert sorted(p.name for p in second.to_read) == ["broken.pdf", "one.txt", "three.txt"]
        assert [Path(o.path).name for o in second.ingest.updated] == ["one.txt"]
        assert [Path(o.path).name for o in second.ingest.failed] == ["broken.pdf"]
        assert "revised" in library.pages(library.find_by_path(one).id)[0].text
        # The broken file is not failed again on every pass while it stays the same.
        assert changes(library).to_read == []

        # Gone: marked missing, kept with its text. Back: unmarked.
        moved = shutil.move(str(folder / "deep" / "two.md"), str(tmp_path / "two.md"))
        third = scan(library)
        assert [Path(r.path).name for r in third.missing] == ["two.md"]
        assert statuses(library)["two.md"] == ("ready", True)
        assert "missing: " in third.describe()
        shutil.move(moved, str(folder / "deep" / "two.md"))
        fourth = scan(library)
        assert len(fourth.returned) == 1 and statuses(library)["two.md"] == ("ready", False)


def test_an_unreachable_folder_marks_nothing_missing(tmp_path: Path) -> None:
    folder = tmp_path / "usb"
    write(folder / "one.txt", "A book on a removable disk.")
    with Library(tmp_path / "library.db") as library:
        library.watch(folder)
        scan(library)
        shutil.rmtree(folder)  # the disk is unplugged
        summary = scan(library)
        assert summary.unreachable == [folder.resolve()] and summary.missing == []
        assert statuses(library) == {"one.txt": ("ready", False)}
        assert library.unwatch(folder) is True and library.watched() == []
        assert library.unwatch(folder) is False
        assert len(library.documents()) == 1  # unwatching keeps the documents


def test_only_folders_can_be_watched(tmp_path: Path) -> None:
    with Library(tmp_path / "library.db") as library, pytest.raises(LibraryError, match="not a folder"):
        library.watch(tmp_path / "nowhere")
