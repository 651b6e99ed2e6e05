"""The torch backend: dense decoder models for CPU and CUDA.

`load(config, weight_files)` returns a model object with `new_cache(capacity)` and
`forward(tokens, cache, last_only=True) -> logits`; engine/generate.py drives it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine import quant
from engine.backends.torch.models import FAMILIES, DecoderModel
from engine.config import ModelConfig
from engine.errors import ModelFileError, UnsupportedModelError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_measured_dtype: str | None = None


def fastest_dtype() -> str:
    """"bfloat16" where this CPU runs bf16 matmuls clearly faster than fp32, else "float32".

    Measured, not guessed from CPU flags: CPUs with AVX-512 BF16 or AMX run bf16
    several times faster than fp32, AVX2-only CPUs several times slower. The probe
    takes ~0.1 s and runs once per process.
    """
    global _measured_dtype
    if _measured_dtype is None:
        _measured_dtype = _remembered_dtype()
    if _measured_dtype is None:
        a32, b32 = torch.randn(512, 1024), torch.randn(1024, 1024)
        a16, b16 = a32.bfloat16(), b32.bfloat16()
        best = {"float32": float("inf"), "bfloat16": float("inf")}
        # Interleaved rounds and best-of timing, so a busy neighbour process slows
        # both candidates alike instead of deciding the answer.
        for _ in range(6):
            for name, (a, b) in (("float32", (a32, b32)), ("bfloat16", (a16, b16))):
                started = time.perf_counter()
                torch.mm(a, b)
                best[name] = min(best[name], time.perf_counter() - started)
        _measured_dtype = "bfloat16" if best["bfloat16"] * 1.3 < best["float32"] else "float32"
        log.info("fastest dtype on this CPU: %s", _measured_dtype)
        _remember_dtype(_measured_dtype)
    return _measured_dtype


def _dtype_record() -> tuple[Path, str]:
    """Where the measured choice is kept, and the machine it holds for: a choice
    that changed from one process to the next (a busy neighbour can sway the timing)
    would change the model's fingerprint and miss the corpus cache."""
    import platform

    from engine.paths import data_dir

    machine = f"{platform.machine()}|{platform.processor()}|{os.cpu_count()}|torch {torch.__version__}"
    return data_dir() / "torch-dtype.json", machine


def _remembered_dtype() -> str | None:
    path, machine = _dtype_record()
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("machine") == machine and record.get("dtype") in DTYPES:
        return record["dtype"]
    return None


def _remember_dtype(dtype: str) -> None:
    path, machine = _dtype_record()
    try:
        path.write_text(json.dumps({"machine": machine, "dtype": dtype}))
    except OSError as error:
        log.info("cannot remember the dtype choice: %s", error)


def resolve_device(device: str = "auto") -> str:
    """"auto" → $QUIRE_DEVICE when set, else "cuda" where torch sees a CUDA GPU,
    else "cpu"; a device named but not available here is an error."""
    if device == "auto":
        device = os.environ.get("QUIRE_DEVICE", "").strip() or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device_available(device.split(":")[0]):
        raise UnsupportedModelError(f"torch cannot use the device '{device}' on this machine")
    return device


def device_available(device: str) -> bool:
    """Whether torch can use `device` ("cpu", "cuda", "mps") on this machine."""
    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        return torch.backends.mps.is_available()
    return device == "cpu"


def load(
    config: ModelConfig,
    weight_files: list[Path],
    *,
    dtype: str = "auto",
    threads: int | None = None,
    device: str = "auto",
) -> DecoderModel:
    """Build the family's model from safetensors files with Hugging Face tensor names.

    dtype "auto" picks the faster of fp32 and bf16 on this CPU (`fastest_dtype`), and
    bf16 on a GPU; device "auto" a CUDA GPU where there is one (`resolve_device`).
    Quantised weights (a converted GGUF, engine/quant.py) stay quantised when dtype
    is "auto" on the CPU, and on a CUDA GPU where their bf16 form would not fit in
    half its free memory (measured on an H200: quantised decodes at 0.66x bf16 there,
    in 0.44x the memory, so a GPU with room gets bf16); dtype "quantised" keeps them
    so on either. A float dtype named dequantises them at load into that dtype.
    """
    device = resolve_device(device)
    on = device.split(":")[0]
    keep_quantised = dtype == "quantised" or (dtype == "auto" and on == "cpu")
    if dtype == "quantised" and on not in ("cpu", "cuda"):
        raise UnsupportedModelError(f"quantised weights run on the CPU or a CUDA GPU, not {on}")
    auto = dtype in ("auto", "quantised")
    if auto:
        dtype = fastest_dtype() if on == "cpu" else "bfloat16"
    if threads:
        torch.set_num_threads(threads)
    try:
        family = FAMILIES[config.family]
    except KeyError:
        raise UnsupportedModelError(f"the torch backend has no '{config.family}' family") from None
    started = time.perf_counter()
    if weight_files and weight_files[0].suffix.lower() == ".gguf":
        return _load_gguf(family, config, weight_files[0], DTYPES[dtype], device, started)
    try:
        state = quant.LazyState(weight_files)  # the headers only
    except (OSError, ValueError) as error:
        raise ModelFileError(f"cannot read weights {weight_files[0].name}: {error}") from None
    if state.quantised:
        if auto and on == "cuda" and not keep_quantised:
            free = torch.cuda.mem_get_info(torch.device(device))[0]
            keep_quantised = state.parameter_count() * 2 > free / 2
        model = family(config, _QuantisedSource(state, dequantise=not keep_quantised), DTYPES[dtype])
        model.to(device)
        _release_freed_memory()
        log.info(
            "loaded %s (%s, %s, quantised: %s) in %.2f s",
            config.name or config.family,
            dtype,
            device,
            model.quantised,
            time.perf_counter() - started,
        )
        return model
    prepared = _prepared_path(weight_files, dtype)
    model = _load_prepared(family, config, prepared, DTYPES[dtype]) if prepared else None
    if model is None:
        tensors: dict[str, torch.Tensor] = {}
        for path in weight_files:
            try:
                tensors.update(load_file(str(path)))
            except (OSError, RuntimeError, ValueError) as error:
                raise ModelFileError(f"cannot read weights {path.name}: {error}") from None
        model = family(config, tensors, DTYPES[dtype])
        if prepared:
            _save_prepared(model, prepared)
    model.to(device)
    log.info("loaded %s (%s, %s) in %.2f s", config.name or config.family, dtype, device, time.perf_counter() - started)
    return model


def _load_gguf(
    family: type[DecoderModel], config: ModelConfig, path: Path, dtype: torch.dtype, device: str, started: float
) -> DecoderModel:
    """Float weights straight from a GGUF (gguf-py's dequantisation); the loaded form
    is kept beside it, named after it, so the next load is a plain read."""
    from engine.gguf_loader import read_gguf

    name = str(dtype).rsplit(".", 1)[-1]
    prepared = path.parent / "quire-prepared" / f"{path.stem}-v{PREPARED_LAYOUT}-{name}.safetensors"
    model = _load_prepared(family, config, prepared, dtype)
    if model is None:
        tensors = {n: torch.from_numpy(v) for n, v in read_gguf(path).iter_tensors()}
        model = family(config, tensors, dtype)
        _save_prepared(model, prepared)
    model.to(device)
    log.info("loaded %s (%s, %s, from %s) in %.2f s", config.name or config.family, name, device, path.name, time.perf_counter() - started)
    return model


def _release_freed_memory() -> None:
    """Hand the heap that loading freed (read buffers, repacking temporaries) back to
    the system: glibc keeps it otherwise, and a 7B model measured 5.8 GB resident
    after loading against 5.4 GB after this. A no-op where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# Bytes of weights read between two `_release_freed_memory` calls while loading.
RELEASE_EVERY = 16 << 20


def _nbytes(value) -> int:
    if isinstance(value, quant.Int4 | quant.Int8):
        return sum(getattr(value, f).nbytes for f in ("q", "scale", "zero") if hasattr(value, f))
    if isinstance(value, quant.Blocks):
        return value.data.nbytes
    return int(getattr(value, "nbytes", 0))


class _QuantisedSource:
    """A converted model's tensors for `WeightSource`, read as they are taken:
    quantised matrices as engine/quant.py's Int4/Int8 (or dequantised, for a float
    load), everything else as torch tensors."""

    def __init__(self, state: quant.LazyState, *, dequantise: bool) -> None:
        self.state = state
        self.dequantise = dequantise
        self._read_since_release = 0

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def pop(self, name: str):
        # The heap left by repacking the matrices taken so far goes back to the system
        # every RELEASE_EVERY bytes read: glibc kept it (each 7B layer left ~260 MiB),
        # and a 7B's resident size rose to 6,188 MiB while loading against 5,456 MiB
        # once loaded.
        if self._read_since_release >= RELEASE_EVERY:
            _release_freed_memory()
            self._read_since_release = 0
        value = self.state.pop(name)
        self._read_since_release += _nbytes(value)
        if isinstance(value, quant.Int4 | quant.Int8 | quant.Blocks):
            return torch.from_numpy(value.dequantize()) if self.dequantise else value
        return torch.from_numpy(value)


# Bump when the prepared layout changes (fused projections, RoPE pair order,
# transposition rule): older prepared files are then ignored and rebuilt.
PREPARED_LAYOUT = 1


def _prepared_path(weight_files: list[Path], dtype: str) -> Path | None:
    """Where the loaded form of these weights is kept: beside them, named by layout
    and dtype. None when the weights are missing (the normal path reports that)."""
    if not weight_files or not all(p.is_file() for p in weight_files):
        return None
    # A subfolder, so that globbing a model folder for *.safetensors never finds it.
    return weight_files[0].parent / "quire-prepared" / f"v{PREPARED_LAYOUT}-{dtype}.safetensors"


def _load_prepared(family: type[DecoderModel], config: ModelConfig, path: Path, dtype: torch.dtype) -> DecoderModel | None:
    if not path.is_file():
        return None
    try:
        return family.from_prepared(config, load_file(str(path)), dtype)
    except Exception as error:  # noqa: BLE001 — any failure of a cache means "rebuild it"
        # A damaged or stale prepared file is rebuilt from the weights, never used.
        log.warning("ignoring prepared weights %s: %s", path.name, error)
        path.unlink(missing_ok=True)
        return None


def _save_prepared(model: DecoderModel, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(exist_ok=True)
        save_file(model.prepared_tensors(), str(partial))
        os.replace(partial, path)
    except (OSError, RuntimeError, ValueError) as error:  # read-only folder, full disk: load slower next time
        log.info("cannot keep prepared weights in %s: %s", path.parent, error)
        partial.unlink(missing_ok=True)
