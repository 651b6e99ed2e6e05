"""Ingestion jobs over a temporary library with the fake .txt reader: folders,
duplicates, re-ingest on change, failures, passwords, progress, cancel, and a
process killed with SIGKILL in the middle of a large ingest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ingest.jobs import IngestJob, IngestProgress, expand_paths, ingest_paths, resume_unfinished, sha256_file
from ingest.library import Library
from tests.ingest.fake_reader import EXTENSIONS, FakeReader

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def library(tmp_path, monkeypatch):
    monkeypatch.setenv("QUIRE_HOME", str(tmp_path / "home"))
    with Library() as opened:
        yield opened


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def run(library: Library, *paths: Path, reader: FakeReader | None = None, **options):
    return ingest_paths(library, paths, reader=reader or FakeReader(), extensions=EXTENSIONS, **options)


def statuses(library: Library) -> dict[str, str]:
    return {Path(record.path).name: record.status for record in library.documents()}


def test_folder_is_expanded_recursively_to_supported_files(library, tmp_path):
    books = tmp_path / "books"
    write(books / "moby.txt", "Title: Moby-Dick\nCall me Ishmael.\fThe white whale.")
    write(books / "nested" / "deeper" / "emma.txt", "Emma Woodhouse, handsome, clever, and rich.")
    write(books / "cover.jpg", "not text")
    write(books / ".hidden.txt", "skipped")
    write(books / ".git" / "notes.txt", "skipped too")
    files, missing = expand_paths([books, books / "moby.txt", tmp_path / "nope"], EXTENSIONS)
    assert [path.relative_to(books).as_posix() for path in files] == ["moby.txt", "nested/deeper/emma.txt"]
    assert missing == [tmp_path / "nope"]

    reports: list[IngestProgress] = []
    summary = run(library, books, tokenize=lambda text: len(text.split()), progress=reports.append)

    assert [Path(item.path).name for item in summary.added] == ["moby.txt", "emma.txt"]
    assert summary.failed == [] and summary.pages == 3 and not summary.cancelled
    moby = library.find_by_path(books / "moby.txt")
    assert (moby.status, moby.title, moby.pages, moby.tokens, moby.format) == ("ready", "Moby-Dick", 2, 6, "txt")
    assert moby.content_hash == sha256_file(books / "moby.txt")
    assert moby.file_size == (books / "moby.txt").stat().st_size
    assert [(page.label, page.text) for page in library.pages(moby.id)] == [("1", "Call me Ishmael."), ("2", "The white whale.")]
    hits = library.search("white whale")
    assert [(hit.title, hit.page_index, hit.snippet) for hit in hits] == [("Moby-Dick", 1, "The [white whale].")]

    done = [report for report in reports if report.file_done]
    assert [(r.index, r.total, r.pages_done) for r in done] == [(0, 2, 2), (1, 2, 3)]
    assert done[-1].fraction == 1.0 and done[-1].eta_seconds == 0.0
    assert 0 < done[0].fraction < 1
    assert done[0].message == "moby.txt: added as #1 (2 pages, 6 tokens)"
    assert [r.message for r in reports if not r.file_done] == [
        "reading moby.txt", "moby.txt: page 1 of 2", "moby.txt: page 2 of 2", "reading emma.txt", "emma.txt: page 1 of 1",
    ]
    fractions = [report.fraction for report in reports]
    assert fractions == sorted(fractions) and fractions[0] == 0.0


def test_identical_content_is_a_duplicate_and_a_rerun_changes_nothing(library, tmp_path):
    original = write(tmp_path / "a" / "book.txt", "Title: Walden\nI went to the woods.")
    copy = write(tmp_path / "b" / "copy.txt", "Title: Walden\nI went to the woods.")
    summary = run(library, original, copy)
    assert [item.outcome for item in summary.outcomes] == ["added", "duplicate"]
    assert summary.duplicates[0].document_id == summary.added[0].document_id
    assert summary.duplicates[0].message == f"duplicate of #{summary.added[0].document_id} 'Walden'"
    assert len(library.documents()) == 1

    reader = FakeReader()
    again = run(library, tmp_path, reader=reader)
    assert [item.outcome for item in again.outcomes] == ["unchanged", "duplicate"]
    assert reader.calls == []
    # Without trusting size and mtime the content is hashed, and still not re-read.
    forced = run(library, original, reader=reader, trust_mtime=False)
    assert [item.outcome for item in forced.outcomes] == ["unchanged"] and reader.calls == []
    # Touched but identical: not re-read, and its new mtime is remembered.
    os.utime(original, (1_000_000, 1_000_000))
    touched = run(library, original, reader=reader)
    assert [item.outcome for item in touched.outcomes] == ["unchanged"] and reader.calls == []
    assert library.find_by_path(original).file_mtime == 1_000_000.0
    assert len(library.documents()) == 1 and library.check() == []


def test_changed_file_at_a_known_path_is_reingested_in_place(library, tmp_path):
    book = write(tmp_path / "notes.txt", "first draft about lighthouses")
    first = run(library, book).added[0].document_id
    collection = library.create_collection("Drafts")
    library.add_to_collection(collection, [first])
    old_hash = library.get(first).content_hash
    removed: list[tuple[int, str | None]] = []
    library.on_remove(lambda document_id, content_hash: removed.append((document_id, content_hash)))

    write(book, "second draft about harbours\fwith a second page")
    summary = run(library, book)

    assert [(item.outcome, item.document_id) for item in summary.outcomes] == [("updated", first)]
    record = library.get(first)
    assert (record.status, record.pages, record.content_hash) == ("ready", 2, sha256_file(book))
    assert library.search("lighthouses") == []
    assert [hit.document_id for hit in library.search("harbours")] == [first]
    assert removed == [(first, old_hash)]
    assert library.collections()[0].document_ids == [first]
    assert len(library.documents()) == 1 and library.check() == []


def test_a_bad_file_is_recorded_and_the_others_continue(library, tmp_path):
    good = write(tmp_path / "good.txt", "fine text")
    empty = write(tmp_path / "empty.txt", "")
    image = write(tmp_path / "photo.png", "png")
    summary = run(library, empty, image, tmp_path / "missing.txt", good)

    assert [(Path(item.path).name, item.outcome) for item in summary.outcomes] == [
        ("missing.txt", "failed"), ("empty.txt", "failed"), ("photo.png", "failed"), ("good.txt", "added"),
    ]
    assert summary.failed[0].message == "failed: no such file or directory"
    # A typed path that does not exist is reported, not recorded in the library.
    errors = {Path(record.path).name: (record.status, record.error) for record in library.documents()}
    assert errors == {
        "empty.txt": ("failed", "empty.txt: the file is empty"),
        "photo.png": ("failed", "photo.png: not a format Quire reads"),
        "good.txt": ("ready", None),
    }
    assert library.check() == []

    # Fixing the file and adding it again retries it into the same row.
    failed_id = library.find_by_path(empty).id
    write(empty, "now it has words")
    retry = run(library, empty, tmp_path / "missing.txt")
    assert [(item.outcome, item.document_id) for item in retry.outcomes][1] == ("added", failed_id)
    assert library.get(failed_id).status == "ready"
    assert len(library.documents()) == 3


def test_unexpected_reader_errors_are_one_line(library, tmp_path):
    first = write(tmp_path / "a.txt", "alpha")
    second = write(tmp_path / "b.txt", "beta")

    def flaky(path: Path, *, password: str | None = None):
        if path.name == "a.txt":
            raise ValueError("bad xref table\n  at offset 12")
        return FakeReader()(path)

    summary = ingest_paths(library, [first, second], reader=flaky, extensions=EXTENSIONS)
    assert [item.outcome for item in summary.outcomes] == ["failed", "added"]
    assert library.find_by_path(first).error == "ValueError: bad xref table at offset 12"


def test_encrypted_documents_ask_for_a_password(library, tmp_path):
    locked = write(tmp_path / "locked.txt", "ENCRYPTED: open sesame\nTitle: Secrets\nhidden words")
    asked: list[Path] = []

    def wrong(path: Path) -> str | None:
        asked.append(path)
        return "guess"

    reader = FakeReader()
    failed = run(library, locked, reader=reader, password_for=wrong)
    assert failed.failed[0].message == "failed: locked.txt is password-protected: give the password"
    # Asked again after the wrong one; the same wrong password is not tried twice.
    assert asked == [locked, locked] and len(reader.calls) == 2

    summary = run(library, locked, password_for=lambda path: "open sesame")
    assert [item.outcome for item in summary.outcomes] == ["added"]
    assert library.get(summary.added[0].document_id).title == "Secrets"
    assert [hit.document_id for hit in library.search("hidden words")] == [summary.added[0].document_id]


def test_cancel_between_files_and_resume(library, tmp_path):
    for number in range(5):
        write(tmp_path / f"book{number}.txt", f"book number {number}")
    reports: list[IngestProgress] = []

    def cancel() -> bool:
        return sum(report.file_done for report in reports) >= 2

    summary = run(library, tmp_path, progress=reports.append, cancel=cancel)
    assert summary.cancelled and [item.path.name for item in summary.added] == ["book0.txt", "book1.txt"]
    assert [path.name for path in summary.remaining] == ["book2.txt", "book3.txt", "book4.txt"]
    assert statuses(library) == {"book0.txt": "ready", "book1.txt": "ready"}

    reader = FakeReader()
    rest = run(library, tmp_path, reader=reader)
    assert [path.name for path in reader.calls] == ["book2.txt", "book3.txt", "book4.txt"]
    assert [item.outcome for item in rest.outcomes] == ["unchanged"] * 2 + ["added"] * 3


def test_cancel_between_pages_stops_the_reader(library, tmp_path):
    write(tmp_path / "a.txt", "one")
    write(tmp_path / "b.txt", "\f".join(f"page {number}" for number in range(10)))
    write(tmp_path / "c.txt", "three")
    reports: list[IngestProgress] = []
    reader = FakeReader()
    summary = run(library, tmp_path, reader=reader, progress=reports.append,
                  cancel=lambda: any(report.message == "b.txt: page 3 of 10" for report in reports))
    assert summary.cancelled and [item.path.name for item in summary.outcomes] == ["a.txt"]
    assert [path.name for path in summary.remaining] == ["b.txt", "c.txt"]
    assert reports[-1].message == "b.txt: page 3 of 10"  # page 4 was never reported
    assert statuses(library) == {"a.txt": "ready", "b.txt": "pending"}
    assert library.check() == []


def test_cancel_while_reading_puts_the_file_back_to_pending(library, tmp_path):
    write(tmp_path / "a.txt", "first")
    write(tmp_path / "b.txt", "second")
    job: IngestJob

    def cancelling_reader(path: Path, *, password: str | None = None):
        # A reader without a page callback; cancel pressed while it reads.
        job.cancel()
        return FakeReader()(path, password=password)

    job = IngestJob(library, [tmp_path], reader=cancelling_reader, extensions=EXTENSIONS)
    summary = job.run()
    assert summary.cancelled and summary.outcomes == []
    assert [path.name for path in summary.remaining] == ["a.txt", "b.txt"]
    assert statuses(library) == {"a.txt": "pending"}
    assert library.pages(library.find_by_path(tmp_path / "a.txt").id) == []

    resumed = resume_unfinished(library, reader=FakeReader(), extensions=EXTENSIONS)
    assert [(item.path.name, item.outcome) for item in resumed.outcomes] == [("a.txt", "added")]
    assert statuses(library) == {"a.txt": "ready"}


def test_resume_unfinished_marks_vanished_files_failed(library, tmp_path):
    gone = write(tmp_path / "gone.txt", "soon deleted")
    document_id = library.begin_document(path=gone, content_hash=sha256_file(gone))
    gone.unlink()
    summary = resume_unfinished(library, reader=FakeReader(), extensions=EXTENSIONS)
    assert [item.outcome for item in summary.outcomes] == ["failed"]
    assert (library.get(document_id).status, library.get(document_id).error) == ("failed", "no such file or directory")


# -- crash safety: a real process killed with SIGKILL ---------------------------------

CHILD = textwrap.dedent("""
    import os, re, signal, sys
    from pathlib import Path
    from ingest.jobs import ingest_paths
    from ingest.library import Library
    from tests.ingest.fake_reader import EXTENSIONS, FakeReader

    library = Library(Path(sys.argv[1]))
    kill_inside_transaction = int(sys.argv[3])
    updates = 0
    pages_in_transaction = 0

    def trace(sql):
        # Kill this process when document N's pages are written but not committed:
        # its final metadata update runs inside the same transaction.
        global updates, pages_in_transaction
        if sql.strip() == "BEGIN":
            pages_in_transaction = 0
        elif re.match(r'\\s*INSERT INTO \\W?pages\\W', sql):
            pages_in_transaction += 1
        elif kill_inside_transaction and re.match(r'\\s*UPDATE\\s+\\W?documents\\W+SET\\s+\\W?format', sql, re.I):
            updates += 1
            if updates == kill_inside_transaction:
                print(f"killed with {pages_in_transaction} page inserts uncommitted", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    library.db.conn.set_trace_callback(trace)

    def progress(report):
        if report.file_done:
            print(report.index, flush=True)

    ingest_paths(library, [sys.argv[2]], reader=FakeReader(delay=float(sys.argv[4])),
                 extensions=EXTENSIONS, progress=progress)
    print("finished", flush=True)
""")

FILES, PAGES = 30, 40


def make_corpus(folder: Path) -> None:
    for number in range(FILES):
        pages = [f"book{number}page{page} " + "words of filler text " * 20 for page in range(PAGES)]
        write(folder / f"book{number:02d}.txt", "\f".join(pages))


def start_child(db: Path, corpus: Path, kill_inside_transaction: int, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), str(corpus), str(kill_inside_transaction), str(delay)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def assert_consistent_and_resumable(db: Path, corpus: Path) -> None:
    with Library(db) as library:
        assert library.check() == []
        before = {Path(record.path).name: record for record in library.documents()}
        ready = sorted(name for name, record in before.items() if record.status == "ready")
        assert 0 < len(ready) < FILES
        for name, record in before.items():
            assert record.status in ("ready", "ingesting"), (name, record.status)
            assert len(library.pages(record.id)) == (PAGES if record.status == "ready" else 0)
        last_ready = int(ready[-1][4:6])
        assert [hit.page_index for hit in library.search(f"book{last_ready}page{PAGES - 1}")] == [PAGES - 1]

        reader = FakeReader()
        summary = ingest_paths(library, [corpus], reader=reader, extensions=EXTENSIONS)
        assert sorted(path.name for path in reader.calls) == sorted(
            f"book{number:02d}.txt" for number in range(FILES) if f"book{number:02d}.txt" not in ready
        )
        assert len(summary.unchanged) == len(ready) and len(summary.added) == FILES - len(ready)
        after = library.documents()
        assert len(after) == FILES and {record.status for record in after} == {"ready"}
        # The document the crash interrupted keeps its id.
        assert all(before[Path(record.path).name].id == record.id for record in after if Path(record.path).name in before)
        assert library.db.execute("SELECT COUNT(*) FROM pages").fetchone()[0] == FILES * PAGES
        assert library.check() == []
        assert len(library.search(f"book{FILES - 1}page0")) == 1


def test_sigkill_in_the_middle_of_a_large_ingest(tmp_path):
    corpus, db = tmp_path / "corpus", tmp_path / "library.db"
    make_corpus(corpus)
    child = start_child(db, corpus, kill_inside_transaction=0, delay=0.05)
    try:
        done = 0
        for line in child.stdout:
            done += 1
            if done == 8:
                os.kill(child.pid, signal.SIGKILL)
                break
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    assert_consistent_and_resumable(db, corpus)


def test_sigkill_inside_the_pages_transaction(tmp_path):
    corpus, db = tmp_path / "corpus", tmp_path / "library.db"
    make_corpus(corpus)
    child = start_child(db, corpus, kill_inside_transaction=4, delay=0.0)
    output, errors = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, errors
    assert output.split() == ["0", "1", "2"]
    assert int(errors.split("killed with ")[1].split()[0]) >= PAGES
    with Library(db) as library:
        fourth = library.find_by_path(corpus / "book03.txt")
        assert (fourth.status, fourth.pages, library.pages(fourth.id)) == ("ingesting", 0, [])
    assert_consistent_and_resumable(db, corpus)


def test_ocr_progress_says_which_ocr_page(library, tmp_path):
    import functools

    from ingest.readers.pdf import read_pdf
    from tests.ingest.builders import write_pdf
    from tests.ingest.test_pdf import ScriptedOcr

    scan = write_pdf(tmp_path / "scan.pdf", [["Typed."], [], []], header=None, footer_numbers=False, scanned=[1, 2])
    reader = functools.partial(read_pdf, ocr=ScriptedOcr(["one", "two"]))
    reports: list[IngestProgress] = []
    summary = ingest_paths(library, [scan], reader=reader, extensions={".pdf"}, progress=reports.append)
    assert len(summary.added) == 1
    messages = [r.message for r in reports]
    assert "scan.pdf: page 1 of 3" in messages  # the first page, before any is known to need OCR
    assert messages[-3:-1] == ["scan.pdf: OCR page 1 of 2", "scan.pdf: OCR page 2 of 2"]
    fractions = [r.file_fraction for r in reports if not r.file_done]
    assert fractions == sorted(fractions)  # the bar never runs back when OCR starts
