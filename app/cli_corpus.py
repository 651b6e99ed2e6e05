"""`quire` corpus commands: questions and whole-document tasks over the library's
documents (read as text: passages chosen by BM25, written by the reader), and the
corpus cache. Each is a few lines over `engine.corpus.answerer.Answerer`, opened from
the app's settings (`open_answerer`) and wired to the library here (the engine never
imports ingest).

    quire cache build [--doc ID...] [--precision int8|int4|fp16]   progress on stderr
    quire cache status                                             what is cached, bytes
    quire cache clear                                              drop segments of removed documents
    quire ask "question" [--doc ID...]                             streams the answer, then evidence
    quire find-all "term" [--doc ID...]                            every sentence that mentions it
    quire summarise ID [--pages A-B | --chapter TITLE]             a cited summary, with progress
    quire compare ID ID [ID...] "topic"                            how the documents differ on it
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

from engine.corpus.build import BuildProgress
from engine.corpus.settings import CacheSettings
from app.service import library_content_keys, scope_documents
from ingest.library import Library


def open_answerer(args: argparse.Namespace):
    """The Answerer the app would open (its model, reader and corpus cache), from the
    app's settings (app/settings.py: model, device, cache folder and precision, reader),
    each overridden by a flag given to this command."""
    from app.service import resolve_device
    from app.settings import load_settings
    from engine.corpus.answerer import Answerer
    from engine.reader import make_reader
    from engine.runtime import load_model

    settings = load_settings()
    flag = getattr(args, "backend", None)
    try:
        backend, device = (flag, "auto") if flag and flag != "auto" else resolve_device(settings.device)
    except ValueError as error:  # the settings name a device this machine lacks
        raise SystemExit(f"quire: error: {error} (quire config device auto)") from None
    model = load_model(getattr(args, "model", None) or settings.model_spec(), backend=backend, device=device)
    cache = CacheSettings(precision=getattr(args, "precision", None) or settings.precision)
    reader = make_reader(getattr(args, "reader", None) or settings.reader,
                         api_key=getattr(args, "reader_key", None) or settings.reader_api_key, backend=backend,
                         device=device)
    return Answerer(model, cache_root=settings.cache_root(), cache_settings=cache, reader=reader)


def _print_build_progress(progress: BuildProgress) -> None:
    eta = f", about {progress.eta_seconds:.0f} s left" if progress.eta_seconds is not None else ""
    fraction = progress.tokens_done / progress.tokens_total if progress.tokens_total else 1.0
    print(
        f"\r[{progress.documents_done}/{progress.documents_total} documents, "
        f"{progress.tokens_done:,}/{progress.tokens_total:,} tokens {fraction:4.0%}{eta}]   ",
        end="", file=sys.stderr, flush=True,
    )


def cmd_cache(args: argparse.Namespace) -> int:
    if args.action == "clear":
        return cmd_cache_clear(args)
    with Library() as library:
        documents = scope_documents(library, args.doc)
    answerer = open_answerer(args)
    if args.action == "build":
        if not documents:
            print("quire: nothing to cache: add documents first (quire add PATH)", file=sys.stderr)
            return 1
        summary = answerer.cache.build(documents, on_progress=_print_build_progress)
        print(file=sys.stderr)
        print(
            f"cached {summary.documents} document(s): {summary.segments_built} segment(s) built, "
            f"{summary.segments_reused} reused, {summary.bytes_written / 2**20:.1f} MiB written in {summary.seconds:.1f} s"
        )
    elif args.action == "status":
        for document in documents:
            state = "cached" if answerer.cache.is_cached(document) else "not cached"
            print(f"{document.doc_id:>5}  {state:<10}  {document.title}")
        print(f"cache: {answerer.cache.total_bytes() / 2**20:.1f} MiB in {answerer.cache.root}")
    return 0


def cmd_cache_clear(args: argparse.Namespace) -> int:
    from app.settings import load_settings
    from engine.corpus.cache import prune_caches

    with Library() as library:
        keep = library_content_keys(library)
    freed = prune_caches(keep, load_settings().cache_root())
    print(f"freed {freed / 2**20:.1f} MiB")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from engine.corpus.answerer import AskStats, Evidence
    from engine.generate import SamplingParams, Token

    with Library() as library:
        documents = scope_documents(library, args.doc)
    if not documents:
        print("quire: nothing to ask over: add documents first (quire add PATH)", file=sys.stderr)
        return 1
    answerer = open_answerer(args)
    # The answer reads passages as text; only cached reading needs the cache built.
    if answerer.read_cached and not all(answerer.cache.is_cached(d) for d in documents):
        print("building the cache for documents not cached yet…", file=sys.stderr)
        answerer.cache.build(documents, on_progress=_print_build_progress)
        print(file=sys.stderr)
    evidence: list[Evidence] = []
    stats = None
    started = time.perf_counter()
    from app.settings import load_settings

    max_tokens = args.max_tokens or load_settings().max_answer_tokens
    for event in answerer.ask(args.question, documents, SamplingParams(max_new_tokens=max_tokens)):
        if isinstance(event, Token):
            print(event.text, end="", flush=True)
        elif isinstance(event, Evidence):
            evidence.append(event)
        elif isinstance(event, AskStats):
            stats = event
    print()
    if args.json:
        print(json.dumps({"evidence": [asdict(e) for e in evidence], "stats": asdict(stats) if stats else None}, indent=2))
        return 0
    print("\nEvidence:")
    for e in evidence:
        page = f"p. {e.page_label}" if e.page_label else "—"
        quote = " ".join(e.text.split())
        number = f"[{e.number}]" if e.number is not None else "   "
        mark = ("cited" if e.supported else "cited, unsupported") if e.cited else ""
        print(f"  {number} {e.weight:5.1%}  {e.title} {page}  chars {e.char_start}–{e.char_end}: “{quote[:160]}”"
              + (f"  ({mark})" if mark else ""))
    if stats is not None:
        print(
            f"\n[{len(documents)} document(s) in scope, {stats.passages_read} passages read "
            f"({stats.context_tokens:,} prompt tokens, chosen in {stats.retrieval_seconds:.2f} s), "
            + (f"{stats.unsupported_citations} of {stats.citations} citations unsupported, " if stats.unsupported_citations else "")
            + f"first token {stats.time_to_first_token:.2f} s, {stats.decode_tokens_per_second:.1f} tok/s, "
            f"total {time.perf_counter() - started:.1f} s]",
            file=sys.stderr,
        )
    return 0


def _run_task(events, *, show_evidence: bool, json_out: bool) -> int:
    """Stream a whole-document task: text to stdout, progress to stderr, then evidence."""
    from engine.corpus.answerer import AskStats, Evidence
    from engine.corpus.tasks import TaskProgress, TaskStats
    from engine.generate import Token

    evidence: list[Evidence] = []
    stats = None
    progress_shown = False
    try:
        for event in events:
            if isinstance(event, Token):
                if progress_shown:
                    print(file=sys.stderr)
                    progress_shown = False
                print(event.text, end="", flush=True)
            elif isinstance(event, TaskProgress):
                left = f", about {event.eta_seconds:.0f} s left" if event.eta_seconds is not None else ""
                print(f"\r[{event.stage}: {event.done}/{event.total}{left}]   ", end="", file=sys.stderr, flush=True)
                progress_shown = True
            elif isinstance(event, Evidence):
                evidence.append(event)
            elif isinstance(event, (TaskStats, AskStats)):
                stats = event
    except KeyboardInterrupt:
        print("\n(stopped)", file=sys.stderr)
        return 130
    print()
    if json_out:
        print(json.dumps({"evidence": [asdict(e) for e in evidence], "stats": asdict(stats) if stats else None}, indent=2))
        return 0
    if show_evidence and evidence:
        print("\nSources:")
        for e in evidence:
            page = f"p. {e.page_label}" if e.page_label else "—"
            mark = "cited" if e.cited else ""
            print(f"  [{e.number}] {e.title} {page}  chars {e.char_start}–{e.char_end}: “{' '.join(e.text.split())[:120]}”"
                  + (f"  ({mark})" if mark else ""))
    if isinstance(stats, TaskStats):
        print(f"\n[{stats.task}: {stats.documents} document(s), {stats.characters_read:,} characters, "
              + (f"{stats.parts} part(s), {stats.prompt_tokens:,} prompt tokens, {stats.generated_tokens:,} generated, "
                 if stats.parts else f"{stats.found} found, ")
              + f"{stats.seconds:.1f} s" + (", cancelled" if stats.cancelled else "") + "]", file=sys.stderr)
    return 0


def _documents_or_fail(ids: list[int] | None):
    with Library() as library:
        documents = scope_documents(library, ids)
    if not documents:
        print("quire: no ready documents to read: add documents first (quire add PATH)", file=sys.stderr)
    return documents


def cmd_find_all(args: argparse.Namespace) -> int:
    from engine.corpus.tasks import find_all

    documents = _documents_or_fail(args.doc)
    if not documents:
        return 1
    return _run_task(find_all(args.term, documents), show_evidence=False, json_out=args.json)


def cmd_summarise(args: argparse.Namespace) -> int:
    from engine.generate import SamplingParams

    from app.service import chapter_pages
    from engine.corpus.tasks import parse_pages

    documents = _documents_or_fail([args.id])
    if not documents:
        return 1
    try:
        if args.chapter:
            with Library() as library:
                first, last = chapter_pages(library.get(args.id), args.chapter)
        else:
            first, last = parse_pages(args.pages or "")
    except ValueError as error:
        print(f"quire: {error}", file=sys.stderr)
        return 2
    answerer = open_answerer(args)
    try:
        events = answerer.summarise(documents[0], SamplingParams(max_new_tokens=args.max_tokens), first_page=first, last_page=last)
        return _run_task(events, show_evidence=True, json_out=args.json)
    except ValueError as error:
        print(f"quire: {error}", file=sys.stderr)
        return 2


def cmd_compare(args: argparse.Namespace) -> int:
    from engine.generate import SamplingParams

    if len(args.ids) < 2:
        print("quire: compare needs two or more document ids, then the topic", file=sys.stderr)
        return 2
    documents = _documents_or_fail(args.ids)
    if len(documents) < 2:
        return 1
    answerer = open_answerer(args)
    events = answerer.compare(documents, args.topic, SamplingParams(max_new_tokens=args.max_tokens))
    return _run_task(events, show_evidence=True, json_out=args.json)


def register(subparsers: argparse._SubParsersAction) -> None:
    cache = subparsers.add_parser("cache", help="build or inspect the corpus cache")
    cache.add_argument("action", choices=["build", "status", "clear"])
    cache.add_argument("--doc", type=int, action="append", help="document id (repeatable; default: all ready)")
    cache.add_argument("--precision", choices=["int8", "int4", "fp16"], help="cache precision (default: the settings')")
    cache.add_argument("--model", help="installed model name, .gguf file or model folder")
    cache.set_defaults(func=cmd_cache)

    ask = subparsers.add_parser("ask", help="ask a question over the library, with evidence")
    ask.add_argument("question")
    ask.add_argument("--doc", type=int, action="append", help="document id (repeatable; default: all ready)")
    ask.add_argument("--model", help="installed model name, .gguf file or model folder")
    ask.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"],
                     help="auto: MLX on Apple Silicon where installed, else torch (the cache is shared)")
    ask.add_argument("--precision", choices=["int8", "int4", "fp16"])
    ask.add_argument("--max-tokens", type=int, help="answer length (default: the settings' max_answer_tokens)")
    ask.add_argument("--reader", help="who writes the answer: a second local model (name, .gguf or folder) or "
                     "URL/MODEL of an OpenAI-compatible server, e.g. http://127.0.0.1:11434/v1/qwen2.5:7b")
    ask.add_argument("--reader-key", default=os.environ.get("QUIRE_READER_KEY", ""),
                     help="API key of the reader's server (default: $QUIRE_READER_KEY)")
    ask.add_argument("--json", action="store_true", help="evidence and statistics as JSON")
    ask.set_defaults(func=cmd_ask)

    find = subparsers.add_parser("find-all", help="every sentence of the library (or --doc) that mentions a term")
    find.add_argument("term")
    find.add_argument("--doc", type=int, action="append", help="document id (repeatable; default: all ready)")
    find.add_argument("--json", action="store_true", help="the sentences and statistics as JSON")
    find.set_defaults(func=cmd_find_all)

    summary = subparsers.add_parser("summarise", aliases=["summarize"], help="summarise a document or a page range, cited")
    summary.add_argument("id", type=int, help="document id (quire list)")
    span = summary.add_mutually_exclusive_group()
    span.add_argument("--pages", help="A-B: pages A to B (1-based, inclusive)")
    span.add_argument("--chapter", help="a chapter of the document's outline, by the start of its title")
    summary.add_argument("--model", help="installed model name, .gguf file or model folder")
    summary.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
    summary.add_argument("--max-tokens", type=int, default=400, help="length of the final summary")
    summary.add_argument("--json", action="store_true", help="sources and statistics as JSON")
    summary.set_defaults(func=cmd_summarise)

    compare = subparsers.add_parser("compare", help="how two or more documents differ on a topic, cited")
    compare.add_argument("ids", type=int, nargs="+", help="document ids (two or more)")
    compare.add_argument("topic")
    compare.add_argument("--model", help="installed model name, .gguf file or model folder")
    compare.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
    compare.add_argument("--max-tokens", type=int, default=400)
    compare.add_argument("--json", action="store_true", help="sources and statistics as JSON")
    compare.set_defaults(func=cmd_compare)
