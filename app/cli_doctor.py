"""`quire doctor`: what a support request needs, one PASS/WARN/FAIL line per item.

    quire doctor [--json]

Versions (quire, Python, torch, PySide6, pypdf, pypdfium2 and MLX where installed),
the platform, the backend, device and dtype the app would run on (from the settings,
without loading a model), the data directory, every installed model checked against
its recorded sha256, the corpus cache (size on disk, segments failing their CRCs),
the library's documents by status, and the OCR engines. The exit status is 1 when
any line is a FAIL, else 0. `--json` prints a list of {check, status, detail}.

Recorded checksums: a default model's GGUF is pinned in `engine.install` and every
converted folder's `source.json` records the sha256 of the GGUF it came from; the
converted `model.safetensors` carries none, so it is checked for completeness only
(its header's offsets against its size). Cache segments carry zlib CRC-32s of their
index and payload (engine/corpus/store.py): `Segment.verify` checks them.

A missing data directory (a fresh install) is reported, not created, except that
torch records its measured dtype choice there (`fastest_dtype`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import sqlite3
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from app.settings import AppSettings, load_settings
from ingest.ocr import HOW_TO_ENABLE, installed as ocr_engines

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"

Progress = Callable[[str], None]

# Files and caches smaller than this are checked without a progress line.
_SLOW_BYTES = 64 << 20
# Seconds between progress lines of one long check.
_PROGRESS_EVERY_S = 5.0
_HASH_CHUNK = 8 << 20
# Failed documents named one by one in the report; the rest are counted.
_FAILURES_SHOWN = 5

NO_OCR = f"no OCR engine: pages without a text layer stay empty; to read them, {HOW_TO_ENABLE}"


@dataclass(frozen=True)
class Check:
    check: str
    status: str  # PASS, WARN or FAIL
    detail: str

    def line(self) -> str:
        return f"{self.status}  {self.check}: {self.detail}"


def run_checks(progress: Progress | None = None) -> list[Check]:
    """Every check, in the order a person reads them. `progress(message)` hears about
    checks that read much data (model hashes, cache segments)."""
    report = progress or (lambda message: None)
    home = home_path()
    fresh = not home.is_dir()  # before the device probe, which may create it
    settings = load_settings(home / "settings.json")
    checks = [*version_checks(), platform_check(), device_check(settings), home_check(home, fresh)]
    checks += model_checks(home, settings, report)
    checks.append(cache_check(settings.cache_root() if not fresh else home / "cache", report))
    checks += library_checks(home / "library.db")
    checks.append(ocr_check())
    return checks


def home_path() -> Path:
    """engine.paths.data_dir() without creating it: the doctor reports a missing one."""
    import platformdirs

    override = os.environ.get("QUIRE_HOME")
    return Path(override).expanduser() if override else Path(platformdirs.user_data_dir("Quire", appauthor=False))


# -- versions, platform, device ----------------------------------------------------


def _distribution_version(*names: str) -> str | None:
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def version_checks() -> list[Check]:
    checks = [
        Check("quire", PASS, _distribution_version("quire") or "not installed as a package (running from a checkout)"),
        Check("python", PASS, f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})"),
    ]
    torch = _distribution_version("torch")
    mlx = _distribution_version("mlx")
    if torch:
        checks.append(Check("torch", PASS, torch))
    elif mlx:
        checks.append(Check("torch", WARN, "not installed: only the MLX backend can run"))
    else:
        checks.append(Check("torch", FAIL, "not installed, and MLX neither: no backend can run a model; "
                                           "reinstall Quire (`make run` sets up .venv)"))
    checks.append(_pyside_check())
    pypdf = _distribution_version("pypdf")
    checks.append(Check("pypdf", PASS, pypdf) if pypdf else Check("pypdf", FAIL, "not installed: PDFs cannot be read"))
    pdfium = _distribution_version("pypdfium2")
    if pdfium:
        checks.append(Check("pypdfium2", PASS, pdfium))
    if mlx:
        checks.append(Check("mlx", PASS, mlx))
    return checks


def _pyside_check() -> Check:
    # The wheels are PySide6-Essentials (+ pyside6-pdf); "PySide6" is the meta-package.
    try:
        module = importlib.import_module("PySide6")
    except ImportError as error:
        return Check("PySide6", FAIL, f"does not import ({error}): the app cannot open")
    pyside = getattr(module, "__version__", None) or _distribution_version("PySide6-Essentials", "PySide6") or "?"
    if importlib.util.find_spec("PySide6.QtPdf") is None:
        return Check("PySide6", WARN, f"{pyside}, without QtPdf: the source viewer cannot show pages "
                                      "(`pip install pyside6-pdf`)")
    return Check("PySide6", PASS, f"{pyside} (QtPdf present)")


def platform_check() -> Check:
    memory = ""
    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB memory"
    except (ValueError, OSError, AttributeError):
        pass  # not on Windows
    return Check("platform", PASS, f"{platform.platform()} ({platform.machine()}, {os.cpu_count()} CPUs{memory})")


def device_check(settings: AppSettings) -> Check:
    """The backend, device and dtype `app.service.LocalService` would load the model
    with, by the same functions, but without loading it."""
    from app.service import resolve_device

    try:
        backend, device = resolve_device(settings.device)
    except ValueError as error:
        return Check("device", FAIL, f"{error} (settings: device={settings.device})")
    except ImportError as error:
        return Check("device", FAIL, f"the backend does not import: {error}")
    try:
        module = importlib.import_module(f"engine.backends.{backend}")
        if backend == "mlx":
            dtype = f"{module.fastest_dtype()} activations, quantised weights (mx.quantized_matmul)"
        elif device == "cpu":
            # The dtype of activations, measured once per machine; a converted GGUF's
            # matrices stay quantised on the CPU (engine.backends.torch.load).
            dtype = f"{module.fastest_dtype()} activations, quantised weights"
        else:
            dtype = "bfloat16 (quantised weights where the bf16 form exceeds half the free GPU memory)"
    except ImportError as error:
        return Check("device", FAIL, f"the {backend} backend does not import: {error}")
    return Check("device", PASS, f"{backend} on {device}, {dtype} (settings: device={settings.device})")


def home_check(home: Path, fresh: bool) -> Check:
    if fresh:
        return Check("home", WARN, f"{home} does not exist (a fresh install): `quire models install` creates it, "
                                   "`quire add PATH` fills the library")
    free = shutil.disk_usage(home).free
    source = "QUIRE_HOME" if os.environ.get("QUIRE_HOME") else "the platform's data directory"
    detail = f"{home} ({source}), {free / 2**30:.1f} GiB free"
    if free < 2**30:
        return Check("home", WARN, detail + ": under 1 GiB left for the cache and models")
    return Check("home", PASS, detail)


# -- models ------------------------------------------------------------------------


def model_checks(home: Path, settings: AppSettings, progress: Progress) -> list[Check]:
    """The model the settings choose (missing: FAIL), the other default models
    (missing: WARN, the app does not need them), and every installed model folder
    against its recorded checksum."""
    from engine.install import DEFAULT_MODELS, pinned_models
    from engine.model_store import model_folders

    folders = model_folders() if (home / "models").is_dir() else []
    installed = {folder.name for folder in folders}
    pinned = {model.name: model.sha256 for model in pinned_models()}  # a bigger reader's too
    wanted = settings.model_spec()
    checks: list[Check] = []
    wanted_path = Path(wanted).expanduser()
    if wanted_path.exists():
        checks.append(Check("model (settings)", PASS, f"{wanted_path}"))
    elif wanted not in installed:
        fix = "run `quire models install`" if wanted in pinned else "install it or choose another model in Settings"
        checks.append(Check(f"model {wanted}", FAIL, f"not installed (the model the app uses): {fix}"))
    for model in DEFAULT_MODELS:
        if model.name not in installed and model.name != wanted:
            checks.append(Check(f"model {model.name}", WARN,
                                "not installed (a default the app does not need): `quire models install` installs it"))
    checks += [verify_model(folder, pinned.get(folder.name), progress) for folder in folders]
    return checks


def verify_model(folder: Path, pinned_sha256: str | None, progress: Progress) -> Check:
    """A model folder against what was recorded when it was made: the GGUF it was
    converted from (sha256 in source.json, and the pinned one of a default model),
    and its safetensors files complete."""
    from engine.model_store import LAYOUT, SOURCE_FILE, WEIGHTS_FILE

    name = f"model {folder.name}"
    again = ("run `quire models install`" if pinned_sha256 else "open its GGUF again (`quire generate --model FILE`)")
    source_path = folder / SOURCE_FILE
    if not source_path.is_file():  # a Hugging Face folder, used as it is
        weights = sorted(folder.glob("*.safetensors"))
        broken = [path.name for path in weights if not safetensors_complete(path)]
        if broken:
            return Check(name, FAIL, f"truncated or unreadable weights: {', '.join(broken)}")
        return Check(name, PASS, f"Hugging Face folder, {len(weights)} safetensors file(s) complete; "
                                 "no recorded checksum to verify")
    try:
        source = json.loads(source_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return Check(name, FAIL, f"{source_path} unreadable ({error}): delete {folder} and {again}")
    if source.get("layout") != LAYOUT:
        return Check(name, WARN, f"weights in an older, larger layout: {again} to convert it again")
    weights = folder / WEIGHTS_FILE
    if not safetensors_complete(weights):
        return Check(name, FAIL, f"{weights} is truncated or unreadable: delete {folder} and {again}")
    recorded = str(source.get("sha256", ""))
    if pinned_sha256 and recorded != pinned_sha256:
        return Check(name, FAIL, f"converted from a GGUF with sha256 {recorded[:16]}…, not the pinned "
                                 f"{pinned_sha256[:16]}…: delete {folder} and {again}")
    gguf = Path(str(source.get("path", "")))
    if not source.get("path") or not gguf.is_file():
        return Check(name, WARN, f"its GGUF ({gguf}) is gone, so the weights cannot be checked against a recorded "
                                 "checksum (safetensors carry none); float dtypes need the GGUF")
    size = gguf.stat().st_size
    if size != source.get("size"):
        return Check(name, FAIL, f"checksum mismatch: {gguf} is {size} bytes, recorded {source.get('size')}: "
                                 f"delete it and {folder}, then {again}")
    actual = sha256_with_progress(gguf, progress)
    if actual != recorded:
        return Check(name, FAIL, f"checksum mismatch: {gguf} has sha256 {actual[:16]}…, recorded {recorded[:16]}…: "
                                 f"delete it and {folder}, then {again}")
    pinned = ", the pinned one" if pinned_sha256 else ""
    return Check(name, PASS, f"sha256 of {gguf.name} ({size / 1e6:.0f} MB) matches{pinned}; "
                             f"{WEIGHTS_FILE} ({weights.stat().st_size / 1e6:.0f} MB) complete")


def sha256_with_progress(path: Path, progress: Progress) -> str:
    size = path.stat().st_size
    slow = size >= _SLOW_BYTES
    if slow:
        progress(f"hashing {path.name} ({size / 1e6:.0f} MB)…")
    digest = hashlib.sha256()
    done, shown = 0, time.monotonic()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if slow and time.monotonic() - shown > _PROGRESS_EVERY_S:
                progress(f"  {path.name}: {done / size:.0%}")
                shown = time.monotonic()
    return digest.hexdigest()


def safetensors_complete(path: Path) -> bool:
    """Whether a safetensors file is as long as its header says (u64 little-endian
    header length, JSON header with each tensor's data_offsets, then the data)."""
    try:
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        return path.stat().st_size == 8 + header_len + end
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False


# -- cache -------------------------------------------------------------------------


def cache_check(root: Path, progress: Progress) -> Check:
    """Bytes on disk under the cache root, and every segment checked whole against
    its CRCs (`Segment.verify`, which reads the file)."""
    from engine.corpus.store import SegmentStore
    from engine.errors import CorruptCacheError

    if not root.is_dir():
        return Check("cache", PASS, f"empty ({root} does not exist yet)")
    total = _bytes_under(root)
    stores = [SegmentStore(folder) for folder in sorted(root.iterdir()) if (folder / "segments").is_dir()]
    segments = [(store, key) for store in stores for key in store.keys()]
    segment_bytes = sum(store.total_bytes() for store in stores)
    slow = segment_bytes >= _SLOW_BYTES
    if slow:
        progress(f"verifying {len(segments)} cache segments ({segment_bytes / 2**20:.0f} MiB)…")
    damaged: list[Path] = []
    shown = time.monotonic()
    for index, (store, key) in enumerate(segments):
        try:
            with store.open(key) as segment:
                good = segment.verify()
        except (CorruptCacheError, OSError):
            good = False
        if not good:
            damaged.append(store.path_for(key))
        if slow and time.monotonic() - shown > _PROGRESS_EVERY_S:
            progress(f"  cache: {index + 1}/{len(segments)} segments")
            shown = time.monotonic()
    detail = f"{total / 2**20:.1f} MiB in {root}, {len(segments)} segment(s) of {len(stores)} model(s)"
    if damaged:
        named = ", ".join(str(path) for path in damaged[:3]) + (" …" if len(damaged) > 3 else "")
        return Check("cache", FAIL, f"{detail}; {len(damaged)} fail their checksum ({named}): delete them, "
                                    "`quire cache build` builds them again")
    return Check("cache", PASS, f"{detail}, all pass their checksums")


def _bytes_under(root: Path) -> int:
    total = 0
    for path in root.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except FileNotFoundError:
            continue  # collected by a running app meanwhile
    return total


# -- library, OCR ------------------------------------------------------------------


def library_checks(path: Path) -> list[Check]:
    """Documents by status, the database's own consistency check, and documents whose
    ingest failed or was left unfinished."""
    from ingest.errors import IngestError
    from ingest.library import UNFINISHED_STATUSES, Library
    from ingest.schema import DOCUMENT_STATUSES

    if not path.is_file():
        return [Check("library", WARN, f"no library yet ({path}): `quire add PATH` adds documents")]
    try:
        with Library(path) as library:
            documents = library.documents()
            problems = library.check()
    except (IngestError, sqlite3.DatabaseError) as error:
        return [Check("library", FAIL, f"{error}: move {path} aside and `quire add` the documents again")]
    counts = Counter(document.status for document in documents)
    by_status = ", ".join(f"{counts[status]} {status}" for status in DOCUMENT_STATUSES if counts[status])
    ocr_pages = {d.id: len(d.report.needs_ocr) for d in documents if d.status == "ready" and d.report.needs_ocr}
    detail = f"{len(documents)} document(s)" + (f": {by_status}" if documents else "") + f" ({path})"
    if ocr_pages:
        detail += f"; {sum(ocr_pages.values())} page(s) of {len(ocr_pages)} document(s) have no text layer"
    if problems:
        checks = [Check("library", FAIL, f"{detail}; inconsistent: {'; '.join(problems[:3])}")]
    else:
        checks = [Check("library", PASS, detail)]
    unfinished = sum(counts[status] for status in UNFINISHED_STATUSES)
    if unfinished:
        checks.append(Check("library unfinished", WARN,
                            f"{unfinished} document(s) left unfinished by an interrupted run: `quire add` them again"))
    failed = [d for d in documents if d.status == "failed"]
    for document in failed[:_FAILURES_SHOWN]:
        checks.append(Check(f"library document {document.id}", WARN, f"{document.path}: {document.error}"))
    if len(failed) > _FAILURES_SHOWN:
        checks.append(Check("library documents", WARN,
                            f"{len(failed) - _FAILURES_SHOWN} more failed (`quire list` shows them)"))
    return checks


def ocr_check() -> Check:
    engines = ocr_engines()
    return Check("ocr", PASS, ", ".join(engines)) if engines else Check("ocr", WARN, NO_OCR)


# -- command -----------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = run_checks(progress=lambda message: print(message, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps([asdict(check) for check in checks], indent=2))
    else:
        for check in checks:
            print(check.line())
    return 1 if any(check.status == FAIL for check in checks) else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    doctor = subparsers.add_parser("doctor", help="check the installation: versions, device, models, cache, "
                                                  "library, OCR (exit 1 on any FAIL)")
    doctor.add_argument("--json", action="store_true", help="a list of {check, status, detail}")
    doctor.set_defaults(func=cmd_doctor)
