"""Ingest benchmarks: how fast and how lean `read_document` is next to a bare pypdf
loop over the same PDF (`bench_ingest`), and how long a full-text search over a
library of 5,000 pages takes (`bench_search`).

Each measurement runs in a fresh subprocess so its peak resident set size
(VmHWM on Linux, `getrusage(RUSAGE_SELF).ru_maxrss` elsewhere) belongs to that run
alone, imports included.
The bare loop is the floor any pypdf-based reader pays: open the file, call
`extract_text()` on every page, keep nothing. Our reader adds page labels, the
outline, running-line detection, normalisation with offset maps, and keeps every
page's text — the ratio of the two times is the price of that.

    quire bench ingest book.pdf    (or: python -m bench.ingest book.pdf [--json out.json])
    quire bench search
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

_KIB_PER_UNIT = 1 if sys.platform != "darwin" else 1 / 1024  # ru_maxrss: KiB on Linux, bytes on macOS


def _peak_rss_mib() -> float:
    # On Linux, ru_maxrss survives exec: a child of a large parent (a test process
    # holding a model) reports the parent's size. VmHWM is this program's own peak.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _KIB_PER_UNIT / 1024


def _run_ours(path: Path) -> dict[str, float]:
    import importlib

    from ingest.readers import detect_format, read_document

    # Import the reader before the clock starts, as the bare run imports pypdf first.
    importlib.import_module(f"ingest.readers.{'text' if detect_format(path) in ('txt', 'md') else detect_format(path)}")
    start = time.perf_counter()
    document = read_document(path)
    seconds = time.perf_counter() - start
    report = document.report
    return {
        "seconds": seconds,
        "pages": report.pages,
        "characters": report.characters,
        "needs_ocr": len(report.needs_ocr),
        "sparse_pages": len(report.sparse_pages),
        "warnings": len(report.warnings),
        "outline_entries": len(document.outline),
        "offset_maps": sum(1 for page in document.pages if page.raw_offsets is not None),
        "peak_rss_mib": _peak_rss_mib(),
    }


def _run_bare(path: Path) -> dict[str, float]:
    from pypdf import PdfReader

    logging.getLogger("pypdf").addHandler(logging.NullHandler())
    start = time.perf_counter()
    reader = PdfReader(path)
    characters = 0
    pages = 0
    for page in reader.pages:
        characters += len(page.extract_text())
        pages += 1
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "pages": pages, "characters": characters, "peak_rss_mib": _peak_rss_mib()}


_RUNNERS = {"ours": _run_ours, "bare": _run_bare}


def _in_subprocess(kind: str, path: Path) -> dict[str, float]:
    root = Path(__file__).resolve().parents[1]
    completed = subprocess.run(
        [sys.executable, "-m", "bench.ingest", "--run", kind, str(path)],
        capture_output=True,
        text=True,
        cwd=root,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{kind} run failed on {path.name}: {completed.stderr.strip().splitlines()[-1:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def bench_ingest(path: str | Path) -> dict[str, object]:
    """Time our reader and (for a PDF) the bare pypdf loop, each in its own process.

    Returns pages, seconds, pages/s, peak RSS (MiB) of both runs and
    `ratio_to_bare` = our seconds / bare seconds (None when the file is not a PDF)."""
    from ingest.readers import detect_format

    path = Path(path)
    kind = detect_format(path)
    ours = _in_subprocess("ours", path)
    result: dict[str, object] = {
        "file": path.name,
        "bytes": path.stat().st_size,
        "format": kind,
        "pages": ours["pages"],
        "seconds": round(ours["seconds"], 3),
        "pages_per_second": round(ours["pages"] / ours["seconds"], 1),
        "peak_rss_mib": round(ours["peak_rss_mib"], 1),
        "characters": ours["characters"],
        "needs_ocr": ours["needs_ocr"],
        "sparse_pages": ours["sparse_pages"],
        "warnings": ours["warnings"],
        "outline_entries": ours["outline_entries"],
        "bare_seconds": None,
        "bare_pages_per_second": None,
        "bare_peak_rss_mib": None,
        "ratio_to_bare": None,
    }
    if kind == "pdf":
        bare = _in_subprocess("bare", path)
        result["bare_seconds"] = round(bare["seconds"], 3)
        result["bare_pages_per_second"] = round(bare["pages"] / bare["seconds"], 1)
        result["bare_peak_rss_mib"] = round(bare["peak_rss_mib"], 1)
        result["ratio_to_bare"] = round(ours["seconds"] / bare["seconds"], 3)
    log.info("ingest bench %s: %s", path.name, result)
    return result


_SYLLABLES = ("ka", "lo", "mi", "ra", "te", "su", "vo", "ne", "di", "ph", "or", "an", "el", "is", "un", "qu")
PLANTED_PHRASE = "harbour ledger"  # put on 1% of the pages: a phrase query with few hits


def _vocabulary(rng: random.Random, size: int) -> list[str]:
    """`size` distinct made-up words of 2 to 4 syllables, most frequent first."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < size:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def bench_search(
    *, pages: int = 5000, pages_per_document: int = 100, words_per_page: int = 300, repeats: int = 50,
    limit: int = 100, seed: int = 0,
) -> dict[str, object]:
    """Latency of `Library.search` over a generated library of `pages` pages.

    The page text is made-up words drawn with Zipf frequencies (as in prose: a few
    words on every page, most words rare), in a temporary library.db. Each query
    (the most frequent word, a middling one, a rare one, a planted two-word phrase,
    an absent word) runs once to warm the cache, then `repeats` times; the result
    gives the median and p95 in milliseconds per query and over all of them.
    `limit` is the number of hits asked for (the app's search panel asks for 100)."""
    from ingest.document import Document, Page, assign_offsets
    from ingest.library import Library

    rng = random.Random(seed)
    vocabulary = _vocabulary(rng, 5000)
    weights = [1.0 / rank for rank in range(1, len(vocabulary) + 1)]
    queries = {
        "frequent word": vocabulary[0],
        "middling word": vocabulary[100],
        "rare word": vocabulary[3000],
        "two words": PLANTED_PHRASE,
        "phrase": f'"{PLANTED_PHRASE}"',
        "absent word": "zzyzx",
    }
    result: dict[str, object] = {"pages": pages, "documents": -(-pages // pages_per_document), "words_per_page": words_per_page,
                                 "repeats": repeats, "limit": limit}
    with tempfile.TemporaryDirectory(prefix="quire-search-bench-") as folder:
        library = Library(Path(folder) / "library.db")
        try:
            started = time.perf_counter()
            number = 0
            for first in range(0, pages, pages_per_document):
                texts = []
                for _ in range(first, min(first + pages_per_document, pages)):
                    words = rng.choices(vocabulary, weights, k=words_per_page)
                    if rng.random() < 0.01:
                        words.insert(rng.randrange(len(words)), PLANTED_PHRASE)
                    texts.append(" ".join(words))
                number += 1
                document = Document(path=f"{folder}/book-{number}.txt", format="txt", title=f"Generated book {number}",
                                    pages=assign_offsets([Page(index=0, text=text) for text in texts]))
                document_id = library.begin_document(path=document.path, content_hash=f"generated-{number}", format="txt")
                library.store_document(document_id, document)
            result["build_seconds"] = round(time.perf_counter() - started, 2)
            result["database_mib"] = round(sum(p.stat().st_size for p in Path(folder).iterdir()) / 2**20, 1)
            timings: dict[str, dict[str, object]] = {}
            every: list[float] = []
            for role, query in queries.items():
                hits = len(library.search(query, limit))  # warm: the pages are read into SQLite's cache
                samples = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    library.search(query, limit)
                    samples.append((time.perf_counter() - started) * 1000)
                every += samples
                timings[role] = {"query": query, "hits": hits, "median_ms": round(statistics.median(samples), 2),
                                 "p95_ms": round(_percentile(samples, 0.95), 2)}
        finally:
            library.close()
    result["queries"] = timings
    result["median_ms"] = round(statistics.median(every), 2)
    result["p95_ms"] = round(_percentile(every, 0.95), 2)
    result["max_ms"] = round(max(every), 2)
    log.info("search bench: %s", result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--run", choices=sorted(_RUNNERS), help=argparse.SUPPRESS)  # one measured run (internal)
    args = parser.parse_args(argv)
    if args.run:
        sys.stdout.write(json.dumps(_RUNNERS[args.run](args.path)) + "\n")
        return 0
    result = bench_ingest(args.path)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
