"""Ingest benchmark: how fast and how lean `read_document` is next to a bare pypdf
loop over the same PDF.

Each measurement runs in a fresh subprocess so its peak resident set size
(VmHWM on Linux, `getrusage(RUSAGE_SELF).ru_maxrss` elsewhere) belongs to that run
alone, imports included.
The bare loop is the floor any pypdf-based reader pays: open the file, call
`extract_text()` on every page, keep nothing. Our reader adds page labels, the
outline, running-line detection, normalisation with offset maps, and keeps every
page's text — the ratio of the two times is the price of that.

    python -m ingest.bench book.pdf [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
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
        [sys.executable, "-m", "ingest.bench", "--run", kind, str(path)],
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
