"""Which OCR engines this machine has, without running one on a page.

A page without a text layer (a scan) stays empty unless an OCR engine reads it.
Two are recognised: the `tesseract` binary on PATH (Debian/Ubuntu `tesseract-ocr`,
Homebrew `tesseract`) and the Python package `rapidocr-onnxruntime`, which
imports as `rapidocr_onnxruntime`. `quire doctor` reports what this finds; the
OCR step of ingest can use it to choose an engine.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import subprocess

log = logging.getLogger(__name__)

TESSERACT = "tesseract"
RAPIDOCR_MODULE = "rapidocr_onnxruntime"
# `tesseract --version` answers at once; a binary that hangs is treated as absent.
_VERSION_TIMEOUT_S = 10


def ocr_engines() -> list[str]:
    """The OCR engines available here, each as "name version" (or the name alone
    where the version is unknown): tesseract first, then rapidocr_onnxruntime.
    Empty when there is none."""
    found: list[str] = []
    tesseract = tesseract_version()
    if tesseract is not None:
        found.append(f"{TESSERACT} {tesseract}".rstrip())
    rapidocr = _rapidocr_version()
    if rapidocr is not None:
        found.append(f"{RAPIDOCR_MODULE} {rapidocr}".rstrip())
    return found


def tesseract_version() -> str | None:
    """The version `tesseract --version` prints ("5.3.0"), "" when it runs but prints
    none we recognise, None when there is no working binary on PATH."""
    binary = shutil.which(TESSERACT)
    if binary is None:
        return None
    try:
        result = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=_VERSION_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        log.info("%s does not run: %s", binary, error)
        return None
    if result.returncode != 0:
        log.info("%s --version exited with %d", binary, result.returncode)
        return None
    # The first line is "tesseract 5.3.0" (older versions print it on stderr).
    for line in (result.stdout + "\n" + result.stderr).splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].lower() == TESSERACT:
            return words[1]
    return ""


def _rapidocr_version() -> str | None:
    """The installed rapidocr-onnxruntime's version ("" if it has none), None when it
    does not import (absent, or onnxruntime missing or broken)."""
    try:
        module = importlib.import_module(RAPIDOCR_MODULE)
    except Exception as error:  # a broken install raises whatever its imports raise
        if not isinstance(error, ModuleNotFoundError) or error.name != RAPIDOCR_MODULE:
            log.info("%s does not import: %s", RAPIDOCR_MODULE, error)
        return None
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    from importlib.metadata import PackageNotFoundError, version as distribution_version

    try:
        return distribution_version("rapidocr-onnxruntime")
    except PackageNotFoundError:
        return ""
