"""`quire cache build|status` and `quire ask` end to end: a temporary QUIRE_HOME whose
`models` links to the installed models, a real Markdown file added with the real
reader, and SmolLM2-135M-Instruct answering over the cache with evidence."""

from __future__ import annotations

import random
import re

import pytest

from app.cli import main
from app.service import corpus_document
from ingest.library import Library

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
FACT = "The lighthouse keeper on Marrow Island was named Elspeth Varga."
QUESTION = "Who was the lighthouse keeper on Marrow Island?"


@pytest.fixture
def home(tmp_path, monkeypatch):
    import torch

    from engine.paths import models_dir

    installed = models_dir()  # resolved before QUIRE_HOME moves
    if not (installed / MODEL).is_dir():
        pytest.skip(f"{MODEL} is not installed (quire models install)")
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(installed, target_is_directory=True)
    monkeypatch.setenv("QUIRE_HOME", str(home))
    # One thread: two contend for a two-core box shared with a benchmark (test_cache.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield home
    torch.set_num_threads(threads)


@pytest.fixture
def island_file(tmp_path):
    # Seed 2: under the removed block-sparse path the 135M model missed the fact for
    # one filler seed in eight (seed 0 among them).
    rng = random.Random(2)
    words = (["The old mill", "A quiet river", "The village baker", "The harbour master", "A flock of gulls"],
             ["stood beside", "drifted past", "looked over", "waited near", "leaned against"],
             ["the stone wall", "the green hills", "the fishing boats", "the church tower", "the wooden pier"],
             ["every morning.", "in the spring.", "before the storm.", "long after dusk."])

    def filler(count: int) -> str:
        return " ".join(" ".join(rng.choice(w) for w in words) for _ in range(count))

    path = tmp_path / "marrow.md"
    path.write_text(
        f"# The harbour\n\n{filler(10)}\n\n# The island\n\n{filler(5)} {FACT} {filler(5)}\n\n"
        f"# The village\n\n{filler(10)}\n",
        encoding="utf-8",
    )
    return path


def quire(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_ask_with_an_empty_library_says_what_to_do(home, capsys):
    code, out, err = quire(capsys, "ask", QUESTION, "--model", MODEL)
    assert code == 1 and out == ""
    assert err == "quire: nothing to ask over: add documents first (quire add PATH)\n"


def test_cache_build_status_and_ask_with_evidence(home, island_file, capsys):
    code, _, err = quire(capsys, "add", str(island_file))
    assert code == 0, err
    with Library() as library:
        [record] = library.documents(status="ready")
        document = corpus_document(library, record)
        fact_page = next(p for p in library.pages(record.id) if FACT in p.text)
    fact_start = document.text.index(FACT)
    fact_end = fact_start + len(FACT)
    fact_label = fact_page.label or str(fact_page.index + 1)
    assert len(document.pages) == 3

    code, out, _ = quire(capsys, "cache", "status", "--model", MODEL)
    assert code == 0
    assert re.match(rf"^\s+{record.id}\s+not cached\s+{re.escape(record.display_title)}$", out.splitlines()[0])

    code, out, _ = quire(capsys, "cache", "build", "--model", MODEL)
    assert code == 0
    assert out.startswith("cached 1 document(s): 1 segment(s) built, 0 reused, ")
    assert list((home / "cache").rglob("*.qkv"))  # under QUIRE_HOME, not the user's cache

    code, out, _ = quire(capsys, "cache", "status", "--model", MODEL)
    assert code == 0
    lines = out.splitlines()
    assert re.match(rf"^\s+{record.id}\s+cached\s+{re.escape(record.display_title)}$", lines[0])
    assert lines[1].startswith("cache: ") and str(home / "cache") in lines[1]

    code, out, err = quire(capsys, "ask", QUESTION, "--model", MODEL, "--max-tokens", "20")
    assert code == 0, err
    answer, _, evidence = out.partition("\nEvidence:\n")
    assert "Elspeth" in answer, out
    assert "building the cache" not in err  # it was cached
    line_pattern = re.compile(r"^\s+\[\d+\]\s+\d+\.\d%\s+(.*) p\. (.+?)\s+chars (\d+)–(\d+): “")
    references = [line_pattern.match(line) for line in evidence.splitlines() if line]
    assert references and all(references), evidence
    assert all(m.group(1) == record.display_title for m in references)
    assert any(
        m.group(2) == fact_label and int(m.group(3)) < fact_end and int(m.group(4)) > fact_start for m in references[:3]
    ), evidence

    # Removing the document frees its cache without loading a model.
    size = sum(p.stat().st_size for p in (home / "cache").rglob("*.qkv"))
    code, out, _ = quire(capsys, "remove", str(record.id))
    assert code == 0
    freed = float(re.search(r"([\d.]+) MiB of cache freed", out).group(1))
    assert abs(freed - size / 2**20) < 0.1, (freed, size)
    assert not list((home / "cache").rglob("*.qkv"))
    assert not list((home / "cache").rglob("*.json"))


def test_the_removed_cache_heads_command_is_refused(capsys):
    # The retrieval heads served the block-sparse answer path only, removed with it.
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "heads"])
    assert exit_info.value.code == 2 and "invalid choice: 'heads'" in capsys.readouterr().err


def test_find_all_summarise_and_compare_from_the_command_line(home, island_file, tmp_path, capsys):
    other = tmp_path / "keeper.md"
    other.write_text("# Keepers\n\nA lighthouse keeper trims the lamp. Elspeth Varga kept the log.\n", encoding="utf-8")
    assert quire(capsys, "add", str(island_file), str(other))[0] == 0
    with Library() as library:
        ids = [d.id for d in library.documents(status="ready")]
    code, out, err = quire(capsys, "find-all", "Elspeth Varga")
    assert code == 0 and out.startswith("**2 sentence(s) mention “Elspeth Varga”** in 2 of 2 document(s).")
    assert FACT in out and "[2]" in out and "find-all: 2 document(s)" in err
    code, out, err = quire(capsys, "summarise", str(ids[0]), "--pages", "9-12", "--model", MODEL)
    assert code == 2 and "pages" in err  # a short Markdown file has fewer pages
    code, out, err = quire(capsys, "summarise", str(ids[0]), "--model", MODEL, "--max-tokens", "24")
    assert code == 0 and "Sources:" in out and "[summarise: 1 document(s)" in err and "part(s)" in err
    code, out, err = quire(capsys, "compare", str(ids[0]), "lighthouse keepers", "--model", MODEL)
    assert code == 2 and "two or more" in err
    code, out, err = quire(capsys, "compare", *map(str, ids), "lighthouse keepers", "--model", MODEL, "--max-tokens", "24")
    assert code == 0 and "Sources:" in out
