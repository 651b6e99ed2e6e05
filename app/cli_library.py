"""`quire` library commands, each a few lines over `ingest.library` / `ingest.jobs`.

    quire add PATH... [--password P]   ingest files and folders (progress on stderr)
    quire watch add|remove|list|scan [FOLDER...]   watched folders (ingest/watch.py)
    quire list [--json]                the documents and their status
    quire show ID                      metadata and extraction report of one document
    quire remove ID                    remove a document (pages, index, collection links)
    quire search "phrase" [--limit N]  pages containing the phrase, with a snippet

`register(subparsers)` adds them to the main `quire` parser; `main(argv)` runs them
alone. Errors ingest raises on purpose print as one line `quire: error: …` on stderr
with exit status 1.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from app.extraction import report_lines
from app.settings import apply_ocr_languages, load_settings
from ingest.errors import IngestError
from ingest.jobs import IngestProgress, ingest_paths
from ingest.library import DocumentRecord, Library

Command = Callable[[argparse.Namespace], int]


def _print_error(message: str) -> None:
    print(f"quire: error: {message}", file=sys.stderr)


def _reports_errors(command: Command) -> Command:
    """Turn an ingest error into one line on stderr and exit status 1, whichever
    main() runs the command (this module's or app.cli's)."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except IngestError as error:
            _print_error(str(error))
            return 1

    return run


def _print_progress(progress: IngestProgress) -> None:
    if not progress.file_done:
        return  # one line per file: its outcome
    eta = f", about {progress.eta_seconds:.0f} s left" if progress.eta_seconds is not None and progress.fraction < 1 else ""
    print(f"[{progress.index + 1}/{progress.total} {progress.fraction:4.0%}{eta}] {progress.message}", file=sys.stderr)


@_reports_errors
def cmd_add(args: argparse.Namespace) -> int:
    apply_ocr_languages(load_settings(), override=False)
    password_for = (lambda path: args.password) if args.password else None
    with Library() as library:
        summary = ingest_paths(
            library, args.paths, progress=_print_progress, password_for=password_for, tokenize=_token_counter()
        )
    print(summary.describe(), file=sys.stderr)
    for item in summary.failed:
        _print_error(f"{item.path}: {item.message.removeprefix('failed: ')}")
    return 1 if summary.failed else 0


def _token_counter() -> Callable[[str], int] | None:
    """Token counts with the default model's tokenizer, when that model is installed."""
    from engine.errors import QuireEngineError
    from engine.model_store import open_model
    from engine.runtime import DEFAULT_MODEL
    from engine.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(open_model(DEFAULT_MODEL).path)
    except QuireEngineError:
        return None
    return lambda text: len(tokenizer.encode(text))


def _document_dict(record: DocumentRecord) -> dict[str, object]:
    return {
        "id": record.id, "title": record.display_title, "author": record.author, "status": record.status,
        "format": record.format, "pages": record.pages, "characters": record.characters,
        "tokens": record.tokens, "path": record.path, "error": record.error,
    }


@_reports_errors
def cmd_list(args: argparse.Namespace) -> int:
    with Library() as library:
        records = library.documents()
    if args.json:
        print(json.dumps([_document_dict(record) for record in records], indent=2))
        return 0
    if not records:
        print("the library is empty: add books with `quire add PATH`")
        return 0
    print(f"{'id':>4}  {'status':9} {'pages':>6} {'tokens':>9}  title")
    for record in records:
        tokens = f"{record.tokens:9d}" if record.tokens is not None else f"{'-':>9}"
        suffix = f"  ({record.error})" if record.error else ""
        print(f"{record.id:4d}  {record.status:9} {record.pages:6d} {tokens}  {record.display_title}{suffix}")
    return 0


@_reports_errors
def cmd_show(args: argparse.Namespace) -> int:
    with Library() as library:
        record = library.get(args.id)
    lines = [
        f"id:          {record.id}",
        f"title:       {record.display_title}",
        f"author:      {record.author or '-'}",
        f"date:        {record.date or '-'}",
        f"format:      {record.format or '-'}",
        f"path:        {record.path}",
        f"status:      {record.status}" + (f" ({record.error})" if record.error else "")
        + (f"; file missing since {record.missing_since}" if record.missing_since else ""),
        f"pages:       {record.pages}",
        f"characters:  {record.characters}",
        f"tokens:      {record.tokens if record.tokens is not None else '-'}",
        f"sha256:      {record.content_hash or '-'}",
        f"added:       {record.added_at}",
        f"updated:     {record.updated_at}",
    ]
    lines += ["extraction report:", *(f"  {line}" for line in report_lines(record))]
    print("\n".join(lines))
    return 0


@_reports_errors
def cmd_remove(args: argparse.Namespace) -> int:
    from app.service import library_content_keys
    from app.settings import load_settings
    from engine.corpus.cache import prune_caches

    with Library() as library:
        record = library.remove(args.id)
        keep = library_content_keys(library)
    freed = prune_caches(keep, load_settings().cache_root())
    cached = f", {freed / 2**20:.1f} MiB of cache freed" if freed else ""
    print(f"removed #{record.id} {record.display_title}{cached}")
    return 0


@_reports_errors
def cmd_search(args: argparse.Namespace) -> int:
    with Library() as library:
        hits = library.search(args.phrase, limit=args.limit)
    if not hits:
        print(f"no pages contain {args.phrase!r}", file=sys.stderr)
        return 0
    for hit in hits:
        where = f"page {hit.page_index + 1}"
        if hit.page_label and hit.page_label != str(hit.page_index + 1):
            where += f" ({hit.page_label})"
        snippet = " ".join(hit.snippet.split())  # one line per hit
        print(f"#{hit.document_id} {hit.title}, {where}: {snippet}")
    return 0


@_reports_errors
def cmd_watch(args: argparse.Namespace) -> int:
    from ingest.watch import scan

    apply_ocr_languages(load_settings(), override=False)
    with Library() as library:
        if args.action == "add":
            for folder in args.folders:
                print(f"watching {library.watch(folder)}")
        elif args.action == "remove":
            for folder in args.folders:
                known = library.unwatch(folder)
                print(f"{'stopped watching' if known else 'was not watching'} {Path(folder).expanduser().resolve()}")
        elif args.action == "list":
            for folder in library.watched():
                print(f"{folder}{'' if folder.is_dir() else '  (not reachable)'}")
        if args.action in ("add", "scan"):
            summary = scan(library, progress=_print_progress, tokenize=_token_counter())
            print(summary.describe())
            for record in summary.missing:
                print(f"missing: #{record.id} {record.display_title} ({record.path}); `quire remove {record.id}` removes it")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the library commands to the `quire` parser's subcommands."""
    add = subparsers.add_parser("add", help="add books and folders to the library")
    add.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    add.add_argument("--password", help="password for encrypted documents")
    add.set_defaults(func=cmd_add)

    listing = subparsers.add_parser("list", help="documents in the library")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)

    show = subparsers.add_parser("show", help="metadata and extraction report of a document")
    show.add_argument("id", type=int)
    show.set_defaults(func=cmd_show)

    remove = subparsers.add_parser("remove", help="remove a document from the library")
    remove.add_argument("id", type=int)
    remove.set_defaults(func=cmd_remove)

    watch = subparsers.add_parser("watch", help="folders whose new and changed files come in by themselves")
    watch.add_argument("action", choices=["add", "remove", "list", "scan"],
                       help="add/remove watched folders, list them, or scan them once now")
    watch.add_argument("folders", nargs="*", type=Path, metavar="FOLDER")
    watch.set_defaults(func=cmd_watch)

    search = subparsers.add_parser("search", help="full-text search of the library")
    search.add_argument("phrase")
    search.add_argument("--limit", type=int, default=20)
    search.set_defaults(func=cmd_search)


def main(argv: list[str] | None = None) -> int:
    """The library commands alone (tests; until app.cli registers them)."""
    parser = argparse.ArgumentParser(prog="quire")
    parser.add_argument("-v", "--verbose", action="store_true")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        # An interrupted document stays 'ingesting' and is redone by the next `quire add`.
        print("[cancelled]", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
