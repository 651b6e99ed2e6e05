"""`quire bench …` is a plugin (issue 27): the bench/ package registers it through an
entry point, each benchmark is its own subcommand with only its own options, every
command the docs record still parses, and without the plugin `quire bench` says so in
one line."""

from __future__ import annotations

import re
import shlex
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from app.cli import COMMAND_PLUGINS, build_parser, installed_plugins, main
from bench.cli import QA_METHODS, TASK_METHODS

ROOT = Path(__file__).resolve().parents[1]
BENCH = EntryPoint("bench", "bench.cli:register", COMMAND_PLUGINS)


def parse(command: str):
    return build_parser([BENCH]).parse_args(shlex.split(command))


def recorded_commands() -> list[str]:
    """Every `quire bench …` command of docs/results.json's rows and of the README's
    code, without comments after `#`, shell variables as a plain word."""
    import json

    found = [row["command"] for row in json.loads((ROOT / "docs" / "results.json").read_text())]
    readme = (ROOT / "README.md").read_text()
    found += re.findall(r"^\.venv/bin/(quire bench .*)$", readme, flags=re.MULTILINE)
    commands = []
    for command in found:
        command = re.sub(r"\$\(?\w+\)?", "X", command.split("#")[0]).strip()
        if command.startswith("quire bench "):
            commands.append(command.removeprefix("quire "))
    return commands


def test_the_installed_entry_point_is_the_bench_package():
    assert [p.value for p in installed_plugins() if p.name == "bench"] == ["bench.cli:register"]


def test_every_recorded_command_still_parses():
    commands = recorded_commands()
    assert len(commands) >= 30
    for command in commands:
        args = parse(command)
        assert args.command == "bench" and callable(args.func), command


def test_each_benchmark_has_only_its_own_options():
    for command in ("bench search --haystack H", "bench qa --haystack H", "bench runtime --questions Q",
                    "bench niah --haystack H --methods quire", "bench report F --out X", "bench tasks --scopes own",
                    "bench gui --documents D --lengths 512", "bench ocr S --model M", "bench scale --haystack H --needles 2"):
        with pytest.raises(SystemExit):
            parse(command)
    runtime = parse("bench runtime")
    assert runtime.lengths == [512, 2048, 8192] and runtime.backend == ["auto"] and runtime.model is None
    assert not hasattr(runtime, "haystack") and not hasattr(runtime, "methods")
    qa = parse("bench qa")
    assert (qa.methods, qa.scopes, qa.qa_documents, qa.qa_tokens, qa.dense_limit) == (
        ["quire", "bm25", "embed", "dense"], ["own", "library"], "bench-data/qa", 200, 8192)
    niah = parse("bench niah --haystack H")
    assert (niah.depths, niah.needles, niah.kinds, niah.baselines, niah.precision) == (
        [0.0, 0.25, 0.5, 0.75, 1.0], 5, ["single"], ["bm25", "dense"], "int8")
    assert parse("bench ocr S.pdf").first_page == 1 and parse("bench gui --documents D").max_tokens == 64


def test_the_parser_offers_the_methods_the_benchmarks_have():
    from bench import qa, tasks

    assert QA_METHODS == qa.METHODS and TASK_METHODS == tasks.METHODS
    assert parse("bench tasks").methods == list(tasks.METHODS)


def test_without_the_plugin_quire_bench_says_so_in_one_line(capsys):
    assert main(["bench", "qa", "--out", "x.json"], plugins=[]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "benchmarks are not installed" in error
    broken = EntryPoint("bench", "no_such_package.cli:register", COMMAND_PLUGINS)
    assert main(["bench", "--help"], plugins=[broken]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "could not be loaded" in error and "no_such_package" in error
    assert build_parser([broken]).parse_args(["ask", "why?"]).command == "ask"  # the other commands stand


def test_python_m_bench_cli_is_quire_with_the_benchmarks(capsys):
    from bench.cli import main as bench_main

    assert bench_main(["bench", "report", str(ROOT / "docs" / "results.json")]) == 0
    assert capsys.readouterr().out == (ROOT / "docs" / "BENCHMARKS.md").read_text()
