"""Watched folders: new and changed files come into the library by themselves, and
documents whose files have gone are marked missing (kept, with their text, cache
and citations, until the user removes them).

`scan()` is one pass over every watched folder. It finds the files that need
reading (not in the library yet, or a size or modification time that differs from
what the library recorded; a file that failed and has not changed since is left
alone rather than failed again on every pass), marks missing and returned files,
and ingests what it found with the same job as `quire add`. The app runs a pass
when a folder changes (QFileSystemWatcher) and every few minutes (the watcher does
not see into subfolders); `quire watch scan` runs one from the command line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ingest.jobs import IngestProgress, IngestSummary, _default_extensions, expand_paths, ingest_paths
from ingest.library import DocumentRecord, Library


@dataclass
class WatchSummary:
    folders: int = 0
    to_read: list[Path] = field(default_factory=list)  # new or changed files
    missing: list[DocumentRecord] = field(default_factory=list)  # newly gone
    returned: list[DocumentRecord] = field(default_factory=list)  # back where they were
    unreachable: list[Path] = field(default_factory=list)  # watched folders that are gone (a removed disk)
    ingest: IngestSummary | None = None

    def describe(self) -> str:
        parts = [f"{self.folders} watched folder{'s' if self.folders != 1 else ''}"]
        if self.ingest is not None and self.to_read:
            parts.append(self.ingest.describe())
        else:
            parts.append("nothing new")
        if self.missing:
            parts.append(f"{len(self.missing)} missing: " + ", ".join(r.display_title for r in self.missing[:3]))
        if self.returned:
            parts.append(f"{len(self.returned)} back")
        if self.unreachable:
            parts.append("not reachable: " + ", ".join(str(p) for p in self.unreachable))
        return "; ".join(parts)


def _inside(path: str, folder: Path) -> bool:
    try:
        Path(path).relative_to(folder)
        return True
    except ValueError:
        return False


def changes(library: Library) -> WatchSummary:
    """What a pass would do, without reading anything: the files to read, and the
    documents of watched folders whose files went missing or came back."""
    summary = WatchSummary()
    folders = library.watched()
    summary.folders = len(folders)
    records = library.documents()
    by_path = {record.path: record for record in records}
    for folder in folders:
        if not folder.is_dir():
            summary.unreachable.append(folder)  # its documents are not marked: the disk may come back
            continue
        files, _ = expand_paths([folder], _default_extensions())
        for path in files:
            known = by_path.get(str(path))
            try:
                stat = path.stat()
            except OSError:
                continue
            same = known is not None and known.file_size == stat.st_size and known.file_mtime == stat.st_mtime
            if not (same and known.status in ("ready", "failed")):
                summary.to_read.append(path)
        for record in records:
            if not _inside(record.path, folder):
                continue
            exists = Path(record.path).exists()
            if not exists and record.missing_since is None:
                summary.missing.append(record)
            elif exists and record.missing_since is not None:
                summary.returned.append(record)
    return summary


def scan(
    library: Library,
    *,
    progress: Callable[[IngestProgress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    tokenize: Callable[[str], int] | None = None,
) -> WatchSummary:
    """One pass: mark missing and returned documents, then read what is new or changed."""
    summary = changes(library)
    for record in summary.missing:
        library.set_missing(record.id, True)
    for record in summary.returned:
        library.set_missing(record.id, False)
    if summary.to_read:
        summary.ingest = ingest_paths(library, summary.to_read, progress=progress, cancel=cancel, tokenize=tokenize)
    return summary
