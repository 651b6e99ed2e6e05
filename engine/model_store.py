"""The converted-model store: GGUF files repacked once into safetensors folders, and
Hugging Face model folders used as they are.

A converted folder (under `engine.paths.models_dir()`) holds:
- `model.safetensors` — the weights under Hugging Face transformers names, quantised
  matrices kept quantised (engine/quant.py: NAME.q4/.q4_scale/.q4_zero for GGUF's
  4-bit types, NAME.q8/.q8_scale for the others, an untied embedding table in its
  GGUF blocks as NAME.gguf_blocks/.gguf_kind) and float32 for everything else;
- `quire_config.json` — `ModelConfig.to_dict()`;
- `gguf_tokenizer.json` — every `tokenizer.*` GGUF metadata key, plus
  `general.architecture`, as plain JSON values;
- `chat_template.jinja` — the GGUF's `tokenizer.chat_template`, when it has one (the
  same file name transformers uses, so both kinds of folder read it the same way);
- `source.json` — the GGUF it came from (path, size, mtime, sha256) and the layout of
  the weights (`LAYOUT`). It is written last, so a folder without it is an interrupted
  conversion and is converted again; one of an older layout (session 19 and before:
  every tensor dequantised to float32, 5x the GGUF; session 26 and before: the
  embedding table requantised to int8) is converted again from its GGUF.

Every file is written to a temporary name in the same folder, fsynced and renamed, so a
crash never leaves a half-written file under the final name. The safetensors format
(https://github.com/huggingface/safetensors) starts with a little-endian u64 header
length and a JSON header of dtype/shape/offsets, which is all `parameter_count` reads.
The converter writes that header itself, from the GGUF's tensor table, and then each
tensor as it is repacked, so converting never holds more than one tensor (the result
reads back with `safetensors.safe_open` like any other file).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from engine.config import ModelConfig
from engine.errors import Cancelled, ModelFileError, ModelNotInstalledError
from engine.gguf_loader import GGUF_MAGIC, read_gguf
from engine.paths import models_dir, write_atomic
from engine.quant import SAFETENSORS_DTYPES, LazyState, base_name

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quire_config.json"
TOKENIZER_FILE = "gguf_tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SOURCE_FILE = "source.json"
# The weights' layout, recorded in source.json: 2 keeps quantised matrices quantised;
# 3 also keeps an untied model's embedding table in its GGUF blocks (engine/quant.py
# `Blocks`: Qwen2.5-Coder-0.5B 613 -> 570 MB, 1.25x -> 1.16x its GGUF).
LAYOUT = 3

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]

_HASH_CHUNK = 8 << 20


@dataclass
class ModelFolder:
    """A model ready for a backend to load: config, safetensors files, tokenizer."""

    path: Path
    config: ModelConfig
    weight_files: list[Path]
    # gguf_tokenizer.json for a converted GGUF, tokenizer.json for an HF folder.
    tokenizer_source: Path | None
    chat_template: str | None
    name: str
    # The GGUF a converted folder came from, while it is still where it was: float
    # dtypes read it (exact), the quantised default reads `weight_files`.
    source_gguf: Path | None = None
    _parameters: int | None = field(default=None, repr=False, compare=False)

    def parameter_count(self) -> int:
        """Total number of weights, read from the safetensors headers (no tensor data)."""
        if self._parameters is None:
            self._parameters = sum(_safetensors_numel(path) for path in self.weight_files)
        return self._parameters


def sha256_file(path: Path, cancel: CancelFn | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            if cancel is not None and cancel():
                raise Cancelled("hashing cancelled")
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(
    gguf_path: str | Path,
    dest_dir: str | Path,
    progress: ProgressFn | None = None,
    *,
    cancel: CancelFn | None = None,
    sha256: str | None = None,
) -> ModelFolder:
    """Repack a GGUF into a converted folder at `dest_dir` and return it.

    `progress(done, total)` is called once per tensor. `cancel()` is checked between
    tensors and raises Cancelled. `sha256`, when the caller already verified the file,
    saves hashing it again.
    """
    gguf_path = Path(gguf_path).resolve()
    dest = Path(dest_dir)
    contents = read_gguf(gguf_path)
    dest.mkdir(parents=True, exist_ok=True)
    # One conversion of a folder at a time (the app and the CLI, or two threads): a
    # second caller waits, then finds the first one's result.
    with _folder_lock(dest):
        if is_converted(dest) and _came_from(_read_source(dest), gguf_path, same_path=True):
            return _open_converted(dest)
        return _convert_locked(contents, gguf_path, dest, progress, cancel, sha256)


@contextmanager
def _folder_lock(dest: Path):
    import fcntl

    # Beside the folder, not in it: the folder's files are all the model's.
    with (dest.parent / f".{dest.name}.convert.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_locked(
    contents, gguf_path: Path, dest: Path, progress: ProgressFn | None, cancel: CancelFn | None, sha256: str | None
) -> ModelFolder:
    # Invalidate first: an interrupted reconversion must not look complete.
    (dest / SOURCE_FILE).unlink(missing_ok=True)

    entries = contents.weight_entries()
    total = len(contents.tensor_names)
    if progress is not None:
        progress(0, total)
    # A quantised matrix is several arrays; progress counts tensors, at each one's last.
    last_of_tensor = [i + 1 == len(entries) or base_name(entries[i + 1][0]) != base_name(name) for i, (name, _, _) in enumerate(entries)]

    def write_weights(tmp: Path) -> None:
        done = 0
        with tmp.open("wb") as out:
            _write_safetensors_header(out, entries)
            for index, ((name, values), (expected_name, dtype, shape)) in enumerate(zip(contents.iter_weights(), entries)):
                if cancel is not None and cancel():
                    raise Cancelled("conversion cancelled")
                expected = np.dtype(SAFETENSORS_DTYPES[dtype]).newbyteorder("<")
                assert name == expected_name and values.shape == shape and values.dtype == expected, (
                    name,
                    values.shape,
                    values.dtype,
                    shape,
                    dtype,
                )
                out.write(memoryview(np.ascontiguousarray(values)).cast("B"))
                if last_of_tensor[index]:
                    done += 1
                    if progress is not None:
                        progress(done, total)

    write_atomic(dest / WEIGHTS_FILE, write_weights)
    # Loaded forms of the old weights (the torch backend's prepared copies) are stale.
    shutil.rmtree(dest / "quire-prepared", ignore_errors=True)

    _write_json(dest / CONFIG_FILE, contents.config.to_dict())
    _write_json(dest / TOKENIZER_FILE, contents.tokenizer_meta)
    template = contents.tokenizer_meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        write_atomic(dest / CHAT_TEMPLATE_FILE, lambda tmp: tmp.write_text(template, encoding="utf-8"))
    else:
        (dest / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)

    stat = gguf_path.stat()
    source = {
        "path": str(gguf_path.resolve()),
        "size": stat.st_size,
        "mtime": stat.st_mtime,
        "sha256": sha256 or sha256_file(gguf_path, cancel),
        "layout": LAYOUT,
    }
    _write_json(dest / SOURCE_FILE, source)
    log.info("converted %s into %s (%d tensors)", gguf_path.name, dest, total)
    return _open_converted(dest)


def open_model(spec: str | Path) -> ModelFolder:
    """Find a model by installed name, GGUF file path, or model folder path.

    A GGUF file is converted once into `models_dir()/<file stem>/` and reused while its
    size and mtime match what `source.json` recorded; the GGUF itself stays where it is
    (another tool's store: engine.model_discovery). A file is taken as a GGUF by its
    magic, not only its suffix: Ollama names its blobs by their sha256. A GGUF that is
    gone still opens its conversion.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            return _open_folder(path)
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return _open_gguf(path)
        raise ModelFileError(f"not a model: {path} (expected a .gguf file or a model folder)")
    if isinstance(spec, str) and _looks_like_name(spec):
        installed = models_dir() / spec
        if installed.is_dir():
            return _open_folder(installed)
        names = ", ".join(sorted(p.name for p in _model_folders())) or "none"
        raise ModelNotInstalledError(f"model '{spec}' is not installed (installed: {names}){_install_hint(spec)}")
    converted = _converted_from(path)
    if converted is not None:
        # The tool that kept the GGUF removed it (`ollama rm`); its conversion still loads.
        return _open_folder(converted)
    raise ModelFileError(f"model file not found: {path}")


def is_converted(folder: Path, sha256: str | None = None) -> bool:
    """True when `folder` holds a complete conversion (of the GGUF with this sha256)."""
    source = _read_source(folder)
    if source is None or not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        return False
    if source.get("layout") != LAYOUT:
        return False
    return sha256 is None or source.get("sha256") == sha256


def _outdated(folder: Path) -> bool:
    """A complete conversion in an older layout (see LAYOUT)."""
    source = _read_source(folder)
    return source is not None and source.get("layout") != LAYOUT and (folder / WEIGHTS_FILE).is_file()


def model_folders() -> list[Path]:
    """Folders under models_dir() that hold a usable model (converted or HF)."""
    return _model_folders()


def _install_hint(name: str) -> str:
    """How to install `name` where it is a model Quire can fetch, else nothing."""
    from engine.install import find_default  # engine.install builds on this module

    try:
        find_default(name)
    except ModelNotInstalledError:
        return ""
    return f": `quire models install {name}` fetches it"


def _looks_like_name(spec: str) -> bool:
    return bool(spec) and "/" not in spec and os.sep not in spec and not spec.lower().endswith(".gguf")


def _model_folders() -> list[Path]:
    root = models_dir()
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and (is_converted(p) or _outdated(p) or (p / "config.json").is_file())
    )


def _open_gguf(gguf_path: Path) -> ModelFolder:
    # An installed default model was converted from this very file under its own
    # name: reuse that conversion rather than making a second copy.
    for folder in _model_folders():
        known = _read_source(folder)
        if _came_from(known, gguf_path, same_path=True):
            if _outdated(folder):
                log.info("converting %s again into the quantised layout", gguf_path.name)
                return convert_gguf(gguf_path, folder, sha256=known.get("sha256"))
            return _open_folder(folder)
    dest = _conversion_folder(gguf_path)
    if is_converted(dest) and _came_from(_read_source(dest), gguf_path, same_path=False):
        return _open_converted(dest)
    log.info("converting %s into %s", gguf_path, dest)
    return convert_gguf(gguf_path, dest)


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def _converted_from(gguf_path: Path) -> Path | None:
    """The folder converted from the GGUF at this path, which is no longer there."""
    wanted = str(gguf_path.resolve())
    for folder in _model_folders():
        source = _read_source(folder)
        if source is not None and source.get("path") == wanted:
            return folder
    return None


def _conversion_folder(gguf_path: Path) -> Path:
    """Where a GGUF opened by path is converted: `models_dir()/<file stem>`, or, for a
    file not named .gguf (an Ollama blob), the name its metadata gives it. A folder of
    that name converted from another GGUF is left alone (it loads without its GGUF):
    the next free `<name>-2`, `-3`... is used (LM Studio and the HF cache hold files of
    the same name)."""
    from engine.model_discovery import conventional_name, read_header

    base = gguf_path.stem
    if gguf_path.suffix.lower() != ".gguf":
        base = conventional_name(read_header(gguf_path)) or f"gguf-{gguf_path.name}"
    for number in itertools.count(1):
        dest = models_dir() / (base if number == 1 else f"{base}-{number}")
        source = _read_source(dest)
        if source is None:
            if not (dest / "config.json").is_file():  # free, or an interrupted conversion
                return dest
            continue  # a Hugging Face model folder of that name
        if source.get("path") == str(gguf_path.resolve()) or _came_from(source, gguf_path, same_path=False):
            return dest
    raise AssertionError("unreachable")


def _came_from(source: dict | None, gguf_path: Path, *, same_path: bool) -> bool:
    """Whether a folder's source.json names this GGUF as it is now (size and mtime,
    and its path when `same_path`)."""
    if source is None:
        return False
    stat = gguf_path.stat()
    if same_path and source.get("path") != str(gguf_path.resolve()):
        return False
    return source.get("size") == stat.st_size and source.get("mtime") == stat.st_mtime


def _open_folder(folder: Path) -> ModelFolder:
    if (folder / CONFIG_FILE).is_file():
        if _outdated(folder):
            # Still loads (float32 weights); converting again is the installer's job,
            # with progress (app: first-run dialog), or `open_model(the .gguf)`'s.
            log.info("%s holds weights of an older layout; open its GGUF to convert it again", folder.name)
            return _open_converted(folder)
        if not is_converted(folder):
            raise ModelFileError(f"{folder}: conversion is incomplete (no {SOURCE_FILE}); convert the GGUF again")
        return _open_converted(folder)
    if (folder / "config.json").is_file():
        return _open_hf(folder)
    raise ModelFileError(f"{folder}: not a model folder (no {CONFIG_FILE} or config.json)")


def _open_converted(folder: Path) -> ModelFolder:
    config = ModelConfig.from_dict(_read_json(folder / CONFIG_FILE))
    template_path = folder / CHAT_TEMPLATE_FILE
    source = _read_source(folder) or {}
    gguf_path = Path(str(source.get("path", "")))
    present = source.get("path") and gguf_path.is_file() and gguf_path.stat().st_size == source.get("size")
    return ModelFolder(
        source_gguf=gguf_path if present else None,
        path=folder,
        config=config,
        weight_files=[folder / WEIGHTS_FILE],
        tokenizer_source=folder / TOKENIZER_FILE,
        chat_template=template_path.read_text(encoding="utf-8") if template_path.is_file() else None,
        name=folder.name,
    )


def _open_hf(folder: Path) -> ModelFolder:
    config = ModelConfig.from_hf_dict(_read_json(folder / "config.json"))
    if not config.name:
        config.name = folder.name
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        weights = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelFileError(f"{folder}: no .safetensors weights in the model folder")
    for weight in weights:
        if not weight.is_file():
            raise ModelFileError(f"{folder}: weight file listed in the index is missing: {weight.name}")
    tokenizer = folder / "tokenizer.json"
    return ModelFolder(
        path=folder,
        config=config,
        weight_files=weights,
        tokenizer_source=tokenizer if tokenizer.is_file() else None,
        chat_template=_hf_chat_template(folder),
        name=folder.name,
    )


def _hf_chat_template(folder: Path) -> str | None:
    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tokenizer_config = folder / "tokenizer_config.json"
    if not tokenizer_config.is_file():
        return None
    template = _read_json(tokenizer_config).get("chat_template")
    if isinstance(template, list):
        # Older tokenizers store named templates; "default" is the chat one.
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _read_source(folder: Path) -> dict | None:
    path = folder / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        return _read_json(path)
    except ModelFileError:
        return None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelFileError(f"cannot read {path}: {' '.join(str(err).split())}") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    return value


def _write_json(path: Path, value: dict) -> None:
    # ensure_ascii keeps surrogate-escaped (non-UTF-8) tokens representable.
    text = json.dumps(value, ensure_ascii=True, indent=1)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_safetensors_header(out: BinaryIO, entries: list[tuple[str, str, tuple[int, ...]]]) -> None:
    """Write the safetensors prefix for (name, dtype, shape) tensors that follow back
    to back in order.

    Layout: u64 little-endian N | N bytes of JSON (space-padded so data starts 8-byte
    aligned) | tensor bytes. Each JSON entry gives dtype, shape and [begin, end) offsets
    relative to the start of the data. Writing the header first lets tensors be
    dequantised and written one at a time instead of collected in memory.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        size = np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-(8 + len(encoded)) % 8)
    out.write(struct.pack("<Q", len(encoded)))
    out.write(encoded)


def _safetensors_numel(path: Path) -> int:
    """Weights in one safetensors file, from its header (engine/quant.py `LazyState`
    counts them: a quantised matrix's values, not its scales or bytes)."""
    try:
        return LazyState([path]).parameter_count()
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelFileError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())})") from None
