"""GGUF models other local-model tools have already downloaded, found where they keep
them and used in place (never copied).

Where each tool keeps its files:
- Ollama (https://github.com/ollama/ollama, docs/faq.md "Where are models stored?"):
  `$OLLAMA_MODELS`, else `~/.ollama/models`, and `/usr/share/ollama/.ollama/models` for
  the Linux system service. `manifests/<host>/<namespace>/<model>/<tag>` is an OCI
  image manifest (JSON) whose `layers` list one of mediaType
  `application/vnd.ollama.image.model` with `digest` "sha256:<hex>": that GGUF is
  `blobs/sha256-<hex>` (older versions wrote `sha256:<hex>`). Its name is what
  `ollama list` shows: "<model>:<tag>", with the default host and the `library`
  namespace left out.
- LM Studio: `~/.lmstudio/models/<publisher>/<repo>/*.gguf` (before 0.3:
  `~/.cache/lm-studio/models`).
- The Hugging Face hub cache (huggingface_hub's file-system layout):
  `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`;
  `models--<org>--<name>/snapshots/<revision>/*.gguf` are symlinks into `blobs/`.

Only each file's header is read (`read_header`: metadata and tensor table, no tensor
data). gguf-py's GGUFReader is not used for this: it builds a numpy view per element
of every array, and a 150K-token vocabulary made it take 6-10 s per file (measured on
the default models), where this reader skips the arrays in milliseconds. Whether Quire
can load a file is decided by the loader's own rules (engine.config.family_of, the
tensor names and required tensors of engine.gguf_loader, and gguf-py's
dequantisation for every tensor type); the conversion (engine.model_store) still
checks the rest of the metadata when the model is first loaded.

Vision projectors (`general.type` "mmproj", architecture "clip") and the second and
later parts of a split GGUF (`split.no` > 0) are not models of their own: skipped.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

from engine.config import family_of
from engine.errors import ModelFileError, UnsupportedModelError

# The loader's own tensor rules, so that "loadable" here means what loading checks.
from engine.gguf_loader import GGUF_MAGIC, _check_required, _hf_name, _SKIPPED_TENSORS

log = logging.getLogger(__name__)

OLLAMA = "ollama"
LM_STUDIO = "lm studio"
HUGGING_FACE = "hugging face"

OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_DEFAULT_HOST = "registry.ollama.ai"
OLLAMA_DEFAULT_NAMESPACE = "library"
# Where the Linux install script's `ollama` service user keeps its models.
OLLAMA_SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/ollama/.ollama/models"),)


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF's scalar metadata (arrays are skipped: only their lengths are kept) and
    its tensor table: (name, dims innermost first, ggml type id)."""

    metadata: dict[str, object]
    array_lengths: dict[str, int]
    tensors: list[tuple[str, tuple[int, ...], int]]

    def get_str(self, key: str) -> str:
        value = self.metadata.get(key)
        return value if isinstance(value, str) else ""

    def get_int(self, key: str) -> int | None:
        value = self.metadata.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class FoundModel:
    """One GGUF another tool downloaded. `path` is the file as that tool keeps it (an
    Ollama blob, an HF snapshot symlink); it is what the settings' `model` names."""

    path: Path
    source: str  # OLLAMA, LM_STUDIO or HUGGING_FACE
    name: str
    size: int
    architecture: str
    family: str  # Quire's family; "" when Quire does not implement the architecture
    parameters: int
    size_label: str  # general.size_label ("0.5B"), else the parameter count rounded
    quantisation: str  # "Q4_K_M", from general.file_type or the weights' commonest type
    loadable: bool
    reason: str  # why Quire cannot load it; "" when it can

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


def find_models() -> list[FoundModel]:
    """Every GGUF model the known tools keep on this machine, each file once, sorted by
    source then name."""
    found: list[FoundModel] = []
    seen: set[Path] = set()
    for source, path, name in _candidates():
        try:
            real = path.resolve(strict=True)
        except OSError:
            continue  # a dangling symlink: an interrupted download
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        model = describe(path, source, name)
        if model is not None:
            found.append(model)
    return sorted(found, key=lambda m: (m.source, m.name.lower()))


def describe(path: Path, source: str, name: str) -> FoundModel | None:
    """What `path` holds and whether Quire can load it; None for a vision projector or
    a later part of a split model."""
    size = path.stat().st_size
    try:
        header = read_header(path)
    except ModelFileError as err:
        return FoundModel(path, source, name, size, "", "", 0, "", "", False, str(err))
    architecture = header.get_str("general.architecture")
    if header.get_str("general.type") == "mmproj" or architecture == "clip":
        return None
    if (header.get_int("split.no") or 0) > 0:
        return None
    try:
        family = family_of(architecture)
    except UnsupportedModelError:
        family = ""
    parameters = sum(math.prod(dims) for _, dims, _ in header.tensors)
    return FoundModel(
        path=path,
        source=source,
        name=name,
        size=size,
        architecture=architecture,
        family=family,
        parameters=parameters,
        size_label=header.get_str("general.size_label") or _round_count(parameters),
        quantisation=quantisation_of(header),
        loadable=not (reason := why_not_loadable(header, path)),
        reason=reason,
    )


def why_not_loadable(header: GGUFHeader, path: Path) -> str:
    """"" when Quire can load this GGUF, else a short reason a person can read."""
    parts = header.get_int("split.count") or 1
    if parts > 1:
        return f"split into {parts} files; Quire reads a GGUF that is one file"
    architecture = header.get_str("general.architecture")
    try:
        family = family_of(architecture or "(none)")
    except UnsupportedModelError as err:
        return str(err)
    names = {name for name, _, _ in header.tensors}
    for name in sorted(names - _SKIPPED_TENSORS):
        if _hf_name(name, family) is None:
            return f"tensor '{name}' has no place in Quire's {family} model"
    layers = header.get_int(f"{architecture}.block_count")
    if layers is None:
        return f"GGUF metadata lacks '{architecture}.block_count'"
    try:
        _check_required(dict.fromkeys(names), family, layers, path)
    except ModelFileError as err:
        return str(err).removeprefix(f"{path.name}: ")
    unreadable = sorted({_type_name(kind) for _, _, kind in header.tensors if not _dequantisable(kind)})
    if unreadable:
        return f"tensor type {', '.join(unreadable)} cannot be read (gguf {_gguf_version()})"
    return ""


def quantisation_of(header: GGUFHeader) -> str:
    file_type = header.get_int("general.file_type")
    if file_type is not None:
        try:
            return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    # No file type recorded: the type holding most of the matrices' weights.
    weights: Counter[int] = Counter()
    for _, dims, kind in header.tensors:
        if len(dims) >= 2:
            weights[kind] += math.prod(dims)
    return _type_name(weights.most_common(1)[0][0]) if weights else ""


# --- where the tools keep their files ----------------------------------------------


def ollama_roots() -> list[Path]:
    roots = []
    if os.environ.get("OLLAMA_MODELS"):
        roots.append(Path(os.environ["OLLAMA_MODELS"]).expanduser())
    roots.append(Path.home() / ".ollama" / "models")
    roots.extend(OLLAMA_SYSTEM_DIRS)
    return _existing(roots)


def lm_studio_roots() -> list[Path]:
    return _existing([Path.home() / ".lmstudio" / "models", Path.home() / ".cache" / "lm-studio" / "models"])


def hf_hub_root() -> Path:
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _existing(roots: list[Path]) -> list[Path]:
    unique: list[Path] = []
    for root in roots:
        if root.is_dir() and root.resolve() not in {r.resolve() for r in unique}:
            unique.append(root)
    return unique


def _candidates() -> Iterator[tuple[str, Path, str]]:
    for root in ollama_roots():
        yield from _ollama_models(root)
    for root in lm_studio_roots():
        for path in sorted(root.rglob("*.gguf")):
            relative = path.relative_to(root).parts
            yield LM_STUDIO, path, f"{relative[0]}/{path.stem}" if len(relative) > 1 else path.stem
    hub = hf_hub_root()
    if hub.is_dir():
        for repo in sorted(hub.glob("models--*")):
            owner = repo.name.removeprefix("models--").split("--")[0]
            for path in sorted((repo / "snapshots").glob("*/**/*.gguf")):
                yield HUGGING_FACE, path, f"{owner}/{path.stem}"


def _ollama_models(root: Path) -> Iterator[tuple[str, Path, str]]:
    manifests = root / "manifests"
    if not manifests.is_dir():
        return
    for manifest in sorted(manifests.glob("*/*/*/*")):
        if not manifest.is_file():
            continue
        host, namespace, model, tag = manifest.relative_to(manifests).parts
        try:
            layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers", [])
        except (OSError, ValueError, AttributeError) as err:
            log.warning("skipping unreadable Ollama manifest %s: %s", manifest, err)
            continue
        name = f"{model}:{tag}"
        if namespace != OLLAMA_DEFAULT_NAMESPACE or host != OLLAMA_DEFAULT_HOST:
            name = f"{namespace}/{name}"
        if host != OLLAMA_DEFAULT_HOST:
            name = f"{host}/{name}"
        for layer in layers:
            digest = layer.get("digest", "") if isinstance(layer, dict) else ""
            if layer.get("mediaType") != OLLAMA_MODEL_LAYER or not digest.startswith("sha256:"):
                continue
            for blob in (root / "blobs" / digest.replace(":", "-"), root / "blobs" / digest):
                if blob.is_file():
                    yield OLLAMA, blob, name
                    break


# --- the header ------------------------------------------------------------------

# struct formats of GGUF's scalar value types (little-endian; "<" is replaced for a
# big-endian file).
_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}


def read_header(path: Path) -> GGUFHeader:
    """The metadata and tensor table of a GGUF (versions 2 and 3), nothing after them.

    Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian
    unless the version reads byte-swapped (a big-endian file):
        "GGUF" | u32 version | u64 tensor_count | u64 kv_count
        kv_count x     string key | u32 value_type | value
        tensor_count x string name | u32 n_dims | n_dims x u64 dim | u32 ggml_type | u64 offset
    where string = u64 length | UTF-8 bytes, and an array value =
    u32 element_type | u64 count | count x element.
    """
    try:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return _parse_header(view, path)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as err:
        raise ModelFileError(f"{path.name}: not a readable GGUF header ({' '.join(str(err).split())})") from None


def _parse_header(view: mmap.mmap, path: Path) -> GGUFHeader:
    if view[:4] != GGUF_MAGIC:
        raise ModelFileError(f"{path.name}: not a GGUF file (bad magic)")
    order = "<"
    (version,) = struct.unpack_from("<I", view, 4)
    if version & 0xFFFF == 0:  # a small number read with the wrong byte order
        order, version = ">", struct.unpack_from(">I", view, 4)[0]
    if version not in (2, 3):
        raise ModelFileError(f"{path.name}: GGUF version {version} is not supported")
    tensor_count, kv_count = struct.unpack_from(order + "QQ", view, 8)
    offset = 24

    def take(fmt: str) -> tuple:
        nonlocal offset
        values = struct.unpack_from(order + fmt, view, offset)
        offset += struct.calcsize(order + fmt)
        return values

    def string() -> str:
        nonlocal offset
        (length,) = take("Q")
        if offset + length > len(view):
            raise ValueError("a string runs past the end of the file")
        text = view[offset : offset + length].decode("utf-8", "surrogateescape")
        offset += length
        return text

    def skip(kind: int) -> None:
        nonlocal offset
        if kind == GGUFValueType.STRING:
            (length,) = take("Q")
            offset += length
        elif kind in _SCALARS:
            offset += struct.calcsize(_SCALARS[kind])
        elif kind == GGUFValueType.ARRAY:
            element, count = take("IQ")
            for _ in range(count):
                skip(element)
        else:
            raise ValueError(f"value type {kind} is not one GGUF defines")

    metadata: dict[str, object] = {}
    array_lengths: dict[str, int] = {}
    for _ in range(kv_count):
        key = string()
        (kind,) = take("I")
        if kind == GGUFValueType.ARRAY:
            element, count = take("IQ")
            array_lengths[key] = count
            if element in _SCALARS:
                offset += count * struct.calcsize(_SCALARS[element])
            elif element == GGUFValueType.STRING:  # a vocabulary: the one hot loop here
                length_at = struct.Struct(order + "Q").unpack_from
                for _ in range(count):
                    offset += 8 + length_at(view, offset)[0]
            else:
                for _ in range(count):
                    skip(element)
        elif kind == GGUFValueType.STRING:
            metadata[key] = string()
        elif kind in _SCALARS:
            (metadata[key],) = take(_SCALARS[kind])
        else:
            raise ValueError(f"value type {kind} of '{key}' is not one GGUF defines")
        if offset > len(view):
            raise ValueError("the metadata runs past the end of the file")
    tensors: list[tuple[str, tuple[int, ...], int]] = []
    for _ in range(tensor_count):
        name = string()
        (n_dims,) = take("I")
        dims = take("Q" * n_dims)
        kind, _data_offset = take("IQ")
        tensors.append((name, tuple(int(d) for d in dims), int(kind)))
    return GGUFHeader(metadata, array_lengths, tensors)


@cache
def _dequantisable(kind: int) -> bool:
    """Whether gguf-py (what the converter uses) dequantises this tensor type: asked
    of gguf-py itself with one zero block, so a newer gguf-py needs no change here."""
    try:
        qtype = GGMLQuantizationType(kind)
        block_bytes = GGML_QUANT_SIZES[qtype][1]
        dequantize(np.zeros(block_bytes, dtype=np.uint8), qtype)
    except (ValueError, KeyError, NotImplementedError):
        return False
    return True


def _type_name(kind: int) -> str:
    try:
        return GGMLQuantizationType(kind).name
    except ValueError:
        return f"type {kind}"


@cache
def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def _round_count(parameters: int) -> str:
    if parameters >= 1e9:
        return f"{parameters / 1e9:.1f}B"
    return f"{parameters / 1e6:.0f}M" if parameters >= 1e6 else str(parameters)


def conventional_name(header: GGUFHeader) -> str:
    """The file name llama.cpp's naming convention gives this GGUF, without ".gguf"
    ("Qwen2.5-Coder-0.5B-Instruct-Q4_K_M"): for a file whose own name says nothing (an
    Ollama blob is named by its sha256). "" when the metadata names nothing."""
    from gguf.utility import naming_convention

    def text(key: str) -> str | None:
        return header.get_str(key) or None

    if not (text("general.name") or text("general.basename")):
        return ""
    name = naming_convention(
        text("general.name"),
        text("general.basename"),
        text("general.finetune"),
        text("general.version"),
        text("general.size_label"),
        quantisation_of(header) or None,
    )
    # A folder name: no path separators or leading dots from odd metadata.
    return "".join(c if c.isalnum() or c in "-_.+" else "-" for c in name).strip(".-")
