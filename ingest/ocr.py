"""Text for pages that have none: render the page with PDFium, read the picture
with an OCR engine.

The engine is Tesseract 5 (Debian's `tesseract-ocr`, Homebrew's `tesseract`), found
at run time and run as a program: `tesseract - - tsv` gives every word with a
confidence (0-100). It was chosen by measurement over RapidOCR (PP-OCRv4 in ONNX,
the one engine installable from PyPI alone, models in the wheel): on ten scanned
pages of real manuals Tesseract's character error rate was 5.8% against 10.7%, at
the same pages per second (docs/lab/ocr.md). Where Tesseract is missing, pages
without text are listed as needing OCR, with `HOW_TO_ENABLE`.

A page's confidence is the mean of its words' (or lines') confidences weighted by
their length, 0..1, so one misread dot does not sink a page of good text.

References: Tesseract's TSV output, https://tesseract-ocr.github.io/tessdoc/;
PDFium rendering through pypdfium2,
https://pypdfium2.readthedocs.io/
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from PIL.Image import Image

RENDER_DPI = 300  # Tesseract's documented sweet spot for body text
LANGUAGES_ENV = "QUIRE_OCR_LANGUAGES"  # Tesseract's "eng+deu"; the app sets it from its settings
VERSION_TIMEOUT_S = 10  # `tesseract --version` answers at once; one that hangs is absent
TESSERACT_TIMEOUT_S = 120  # one page; a hung process must not hold the import forever
HOW_TO_ENABLE = (
    "install Tesseract (Debian/Ubuntu: sudo apt install tesseract-ocr; macOS: brew install tesseract), "
    "then add the document again"
)


class OcrError(RuntimeError):
    """An OCR engine failed on a page (the page stays without text)."""


# A word read by OCR and where it lies on the page, in PDF points from the top-left
# corner: (word, left, top, right, bottom). The viewer highlights with these.
OcrWord = tuple[str, float, float, float, float]


@dataclass
class OcrResult:
    text: str
    confidence: float  # 0..1, weighted by the length of the words or lines
    words: list[OcrWord] = field(default_factory=list)  # in reading order


class OcrEngine(Protocol):
    name: str  # with its version, for the extraction report

    def read(self, image: Image) -> OcrResult: ...


def _weighted(pieces: list[tuple[str, float]]) -> float:
    total = sum(len(text) for text, _ in pieces)
    return sum(len(text) * score for text, score in pieces) / total if total else 0.0


class Tesseract:
    """Tesseract as a program. Each process is held to one thread
    (OMP_THREAD_LIMIT=1) and pages are read in parallel instead: on the 2-core box
    a page took 6.1 s with OpenMP's default threads and 1.5 s with one
    (docs/lab/ocr.md)."""

    parallel = True  # read() may run on several threads at once

    def __init__(self, binary: str, languages: str | None = None) -> None:
        """`languages`: Tesseract's "eng+deu" form; None reads LANGUAGES_ENV at each
        page (the app sets it from its settings), else English where installed."""
        self.binary = binary
        self._languages = languages
        self._installed: list[str] | None = None
        try:
            result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as error:
            raise OcrError(f"tesseract does not run: {error}") from error
        if result.returncode != 0:
            raise OcrError(f"tesseract --version exited with {result.returncode}")
        # The first line is "tesseract 5.3.0" (older versions print it on stderr).
        version = "?"
        for line in (result.stdout + "\n" + result.stderr).splitlines():
            words = line.split()
            if len(words) >= 2 and words[0].lower() == "tesseract":
                version = words[1]
                break
        self.version = version

    @property
    def name(self) -> str:
        return f"tesseract {self.version} ({self.languages()})"

    def installed_languages(self) -> list[str]:
        """The language data installed for Tesseract (`--list-langs`), without "osd"."""
        if self._installed is None:
            try:
                result = subprocess.run([self.binary, "--list-langs"], capture_output=True, text=True,
                                        timeout=VERSION_TIMEOUT_S)
                lines = (result.stdout + "\n" + result.stderr).splitlines()
            except (OSError, subprocess.SubprocessError):
                lines = []
            # After the line "List of available languages in "…" (N):", one code a line.
            start = next((n + 1 for n, line in enumerate(lines) if line.startswith("List of available languages")), len(lines))
            self._installed = [line.strip() for line in lines[start:] if line.strip() and line.strip() != "osd"]
        return self._installed

    def languages(self) -> str:
        wanted = self._languages if self._languages is not None else os.environ.get(LANGUAGES_ENV, "")
        wanted = "+".join(part for part in wanted.replace(",", "+").split("+") if part.strip())
        if wanted:
            return wanted
        installed = self.installed_languages()
        return "eng" if "eng" in installed or not installed else "+".join(installed)

    def read(self, image: Image) -> OcrResult:
        languages = self.languages()
        missing = [code for code in languages.split("+") if code not in self.installed_languages()]
        if missing and self.installed_languages():
            raise OcrError(f"Tesseract has no data for {', '.join(missing)} (installed: "
                           f"{', '.join(self.installed_languages())}); on Debian/Ubuntu: sudo apt install "
                           + " ".join(f"tesseract-ocr-{code}" for code in missing))
        picture = io.BytesIO()
        image.save(picture, format="PNG")
        try:
            result = subprocess.run(
                [self.binary, "-", "-", "-l", languages, "tsv"],
                input=picture.getvalue(), capture_output=True, timeout=TESSERACT_TIMEOUT_S,
                env={**os.environ, "OMP_THREAD_LIMIT": "1"},
            )
        except subprocess.TimeoutExpired as error:
            raise OcrError(f"tesseract took over {TESSERACT_TIMEOUT_S} s on one page") from error
        if result.returncode != 0:
            raise OcrError(f"tesseract failed: {result.stderr.decode(errors='replace').strip()[:200]}")
        dpi = image.info.get("dpi", (RENDER_DPI, RENDER_DPI))[0] or RENDER_DPI
        return parse_tsv(result.stdout.decode("utf-8", errors="replace"), points_per_pixel=72 / dpi)


def parse_tsv(tsv: str, points_per_pixel: float = 72 / RENDER_DPI) -> OcrResult:
    """Tesseract's TSV (level, page, block, paragraph, line, word, box, conf, text) as
    text with a line break per line and a blank line per paragraph, and each word's
    box in points."""
    lines: dict[tuple[int, int, int], list[str]] = {}
    words: list[tuple[str, float]] = []
    boxes: list[OcrWord] = []
    for row in tsv.splitlines()[1:]:
        fields = row.split("\t")
        if len(fields) < 12 or fields[0] != "5":
            continue
        text = fields[11].strip()
        if not text:
            continue
        key = (int(fields[2]), int(fields[3]), int(fields[4]))
        lines.setdefault(key, []).append(text)
        words.append((text, max(0.0, float(fields[10])) / 100))
        left, top, width, height = (float(value) * points_per_pixel for value in fields[6:10])
        boxes.append((text, round(left, 1), round(top, 1), round(left + width, 1), round(top + height, 1)))
    out: list[str] = []
    previous: tuple[int, int] | None = None
    for (block, paragraph, _line), line_words in lines.items():
        if previous is not None and (block, paragraph) != previous:
            out.append("")
        out.append(" ".join(line_words))
        previous = (block, paragraph)
    return OcrResult("\n".join(out), _weighted(words), boxes)


def engine_names() -> list[str]:
    """The OCR engines installed here, best first, without starting them."""
    return ["tesseract"] if shutil.which("tesseract") else []


def make_engine(name: str) -> OcrEngine:
    if name == "tesseract":
        binary = shutil.which("tesseract")
        if binary is None:
            raise OcrError("tesseract is not installed")
        return Tesseract(binary)
    raise OcrError(f"unknown OCR engine {name!r} (known: tesseract)")


def installed() -> list[str]:
    """The OCR engines that start here, each with its version ("tesseract 5.3.0")."""
    names = []
    for name in engine_names():
        try:
            names.append(make_engine(name).name)
        except OcrError:
            continue
    return names


def best_engine() -> OcrEngine | None:
    """The best OCR engine that starts here, or None."""
    for name in engine_names():
        try:
            return make_engine(name)
        except OcrError:
            continue
    return None


def render(page, dpi: int = RENDER_DPI) -> Image:  # noqa: ANN001 - a pypdfium2 PdfPage
    """A PDF page (opened with pypdfium2) as a greyscale picture at `dpi`."""
    picture = page.render(scale=dpi / 72, grayscale=True).to_pil()
    picture.info["dpi"] = (dpi, dpi)  # so word boxes can be given in points
    return picture
