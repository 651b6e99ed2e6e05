"""The OCR module's own parts: Tesseract's TSV read into lines, paragraphs and a
length-weighted confidence; the OCR benchmark's error rates; the benchmark itself
on two scanned pages where Tesseract is installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.ocr import bench_ocr, error_rates
from ingest.ocr import best_engine, parse_tsv
from tests.ingest.builders import write_pdf

HEADER = "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\tconf\ttext"


def row(level: int, block: int, paragraph: int, line: int, word: int, conf: float, text: str) -> str:
    return f"{level}\t1\t{block}\t{paragraph}\t{line}\t{word}\t0\t0\t10\t10\t{conf}\t{text}"


def test_tsv_becomes_lines_and_paragraphs_with_a_weighted_confidence() -> None:
    tsv = "\n".join([
        HEADER,
        row(1, 0, 0, 0, 0, -1, ""),  # page, block, paragraph and line rows carry no word
        row(4, 1, 1, 1, 0, -1, ""),
        row(5, 1, 1, 1, 1, 96, "Harbour"),
        row(5, 1, 1, 1, 2, 90, "ledger"),
        row(5, 1, 1, 2, 1, 80, "of"),
        row(5, 1, 1, 2, 2, 50, " "),  # an empty word is dropped
        row(5, 2, 1, 1, 1, 40, "tar."),
    ])
    result = parse_tsv(tsv)
    assert result.text == "Harbour ledger\nof\n\ntar."
    # (7*0.96 + 6*0.90 + 2*0.80 + 4*0.40) / 19
    assert result.confidence == pytest.approx((7 * 0.96 + 6 * 0.90 + 2 * 0.80 + 4 * 0.40) / 19)
    assert parse_tsv(HEADER).text == "" and parse_tsv(HEADER).confidence == 0.0


def test_error_rates_count_words_out_of_order_and_words_never_read() -> None:
    assert error_rates("the brig Osprey carried tar", "the brig Osprey carried tar") == (0.0, 0.0)
    assert error_rates("the brig Osprey carried tar", "the brig 0sprey carried tar") == pytest.approx((0.2, 0.2))
    # Every word read, one out of order: in order 4 of 5 match, none is missing.
    assert error_rates("a b c d e", "a b d c e") == (pytest.approx(0.2), 0.0)


@pytest.mark.skipif(best_engine() is None, reason="Tesseract is not installed")
def test_bench_ocr_reads_a_scan_of_typed_pages(tmp_path: Path) -> None:
    lines = ["The harbour master kept a ledger of every ship that came in to Valdmere,",
             "with the day it arrived, its cargo, and the name of its captain, for many",
             "years, until the ledger was lost in the great storm of the autumn."]
    source = write_pdf(tmp_path / "typed.pdf", [lines, lines[::-1]], header=None, footer_numbers=False)
    result = bench_ocr(source, pages=2)
    assert result["pages"] == 2 and result["ocr_pages"] == 2 and result["still_need_ocr"] == 0
    assert result["scored_pages"] == 2 and result["words_missed"] < 0.15
    assert result["pages_per_second"] > 0
    json.dumps(result)  # what quire bench prints


def test_tsv_words_carry_their_boxes_in_points() -> None:
    tsv = "\n".join([HEADER, "5\t1\t1\t1\t1\t1\t300\t150\t600\t75\t91\tHarbour"])
    [word] = parse_tsv(tsv, points_per_pixel=72 / 300).words
    assert word == ("Harbour", 72.0, 36.0, 216.0, 54.0)


def test_a_passage_on_a_scan_is_highlighted_from_the_ocr_boxes() -> None:
    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from app.gui.viewer import ocr_rects

    words = [("The", 40, 50, 60, 60), ("brig", 64, 50, 90, 60), ("Osprey", 94, 50, 140, 60),
             ("carried", 40, 66, 80, 76), ("tar.", 84, 66, 104, 76)]
    page_text = "The brig Osprey\ncarried tar."
    start = page_text.index("Osprey")
    rects, complete = ocr_rects(words, page_text, start, page_text.index("tar.") + 4)
    assert complete
    # One rectangle per line: "Osprey" alone on the first, "carried tar." joined on the second.
    assert [(r.left(), r.top(), r.right(), r.bottom()) for r in rects] == [(94, 50, 140, 60), (40, 66, 104, 76)]
    assert ocr_rects(words, "Nothing like it at all on this page", 0, 20) is None


@pytest.mark.skipif(best_engine() is None, reason="Tesseract is not installed")
def test_tesseract_boxes_land_where_the_words_were_typed(tmp_path: Path) -> None:
    from ingest.readers.pdf import read_pdf
    from tests.ingest.builders import write_scanned_pdf

    lines = ["The harbour master kept a ledger of ships.", "The brig Osprey arrived on the ninth of March"]
    document = read_pdf(write_scanned_pdf(tmp_path / "scan.pdf", [lines]))
    words = document.pages[0].ocr_words
    osprey = next(word for word in words if word[0] == "Osprey")
    # write_pdf sets the second line's baseline 75 pt below the top of the page, at x = 40 pt.
    _, left, top, right, bottom = osprey
    assert 60 < top < bottom < 80 and 40 < left < right < 300


@pytest.mark.skipif(best_engine() is None, reason="Tesseract is not installed")
def test_ocr_languages_come_from_the_setting_and_a_missing_one_says_how_to_install_it(monkeypatch) -> None:
    from PIL import Image

    from ingest.ocr import LANGUAGES_ENV, OcrError

    engine = best_engine()
    monkeypatch.delenv(LANGUAGES_ENV, raising=False)
    assert engine.languages() == "eng" and engine.name.endswith("(eng)")
    monkeypatch.setenv(LANGUAGES_ENV, "eng,deu")
    assert engine.languages() == "eng+deu"
    monkeypatch.setenv(LANGUAGES_ENV, "eng+xyz")
    with pytest.raises(OcrError, match=r"no data for xyz .*sudo apt install tesseract-ocr-xyz"):
        engine.read(Image.new("L", (200, 100), 255))


def test_the_apps_ocr_languages_reach_ingest(monkeypatch) -> None:
    import os

    from app.settings import AppSettings, apply_ocr_languages
    from ingest.ocr import LANGUAGES_ENV

    monkeypatch.setenv(LANGUAGES_ENV, "fra")  # set in the shell
    apply_ocr_languages(AppSettings(ocr_languages="eng+deu"), override=False)
    assert os.environ[LANGUAGES_ENV] == "fra"  # the command line keeps the shell's
    apply_ocr_languages(AppSettings(ocr_languages="eng+deu"))
    assert os.environ[LANGUAGES_ENV] == "eng+deu"  # the window applies its settings
    apply_ocr_languages(AppSettings())
    assert LANGUAGES_ENV not in os.environ
