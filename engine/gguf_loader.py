"""Read a GGUF model file into a `ModelConfig`, tokenizer metadata and fp32 tensors
with Hugging Face transformers names.

GGUF (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is a single file:
magic `GGUF`, version, a key/value metadata table, a tensor-info table, then aligned
tensor data, many of them block-quantised. `gguf.GGUFReader` memory-maps the file and
`gguf.quants.dequantize` turns each tensor back into floats, so the whole model is never
held in memory at once: `GGUFContents.iter_tensors()` dequantises one tensor at a time.

llama.cpp's converter (convert_hf_to_gguf.py) changed two kinds of tensors on the way
in, and both are undone here so the tensors equal the Hugging Face originals:
- llama-family `attn_q`/`attn_k` rows were permuted from the "rotate half" RoPE layout
  of HF to llama.cpp's interleaved layout (per head: (2, d/2) -> (d/2, 2));
- Gemma 3 RMSNorm weights were stored as (w + 1), because Gemma's norm multiplies by
  (1 + w); the stored value is what ggml multiplies by.

Tokenizer metadata (every `tokenizer.*` key) is returned as plain Python values. GGUF
strings are UTF-8; a token that is not valid UTF-8 is decoded with `surrogateescape`,
so `s.encode("utf-8", "surrogateescape")` gives its exact bytes back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderField, ReaderTensor
from gguf.quants import dequantize

from engine import quant
from engine.config import ModelConfig, family_of
from engine.errors import ModelFileError, UnsupportedModelError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

# GGUF per-layer tensor stem -> HF module path inside `model.layers.N.`. The FFN norm is
# family dependent (see _layer_map): in llama/qwen it is the norm before the MLP, which
# HF calls post_attention_layernorm; Gemma 3 has four norms per layer.
_COMMON_LAYER_MAP: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_LLAMA_LAYER_MAP: dict[str, str] = {**_COMMON_LAYER_MAP, "ffn_norm": "post_attention_layernorm"}
_GEMMA3_LAYER_MAP: dict[str, str] = {
    **_COMMON_LAYER_MAP,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_MAP: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp adds that have no HF counterpart. `rope_freqs` carries Llama 3.1's
# per-frequency RoPE divisors, which HF derives from config.rope_scaling instead.
_SKIPPED_TENSORS = {"rope_freqs.weight"}

# Layer tensors every supported family must have, per family extras below.
_REQUIRED_LAYER_STEMS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm"]
_REQUIRED_EXTRA: dict[str, list[str]] = {
    "llama": ["ffn_norm"],
    "qwen2": ["ffn_norm"],
    "qwen3": ["ffn_norm", "attn_q_norm", "attn_k_norm"],
    "gemma3": ["post_attention_norm", "ffn_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm"],
}
# Families whose GGUF q/k weights were permuted for interleaved RoPE by llama.cpp.
_PERMUTED_QK_FAMILIES = {"llama"}
# Families whose GGUF norm weights hold (w + 1).
_NORM_PLUS_ONE_FAMILIES = {"gemma3"}

# Gemma 3: local (sliding-window) layers use RoPE base 10000, and every 6th layer is global.
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
_GEMMA3_GLOBAL_EVERY = 6

# Rows dequantised per call for large quantised tensors (bounds temporary memory).
_DEQUANT_ROWS = 8192


@dataclass
class _TensorPlan:
    gguf: ReaderTensor
    hf_name: str


@dataclass
class GGUFContents:
    """What a GGUF file holds, mapped to Quire/HF conventions.

    The reader memory-maps the file; tensors are dequantised lazily by `iter_tensors`.
    """

    path: Path
    config: ModelConfig
    tokenizer_meta: dict
    _reader: GGUFReader = field(repr=False)
    _plan: list[_TensorPlan] = field(repr=False)

    @property
    def tensor_names(self) -> list[str]:
        """HF names of the tensors `iter_tensors` yields, in file order."""
        return [item.hf_name for item in self._plan]

    @property
    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(HF name, HF shape) of every tensor, known without dequantising anything."""
        return [(item.hf_name, _tensor_shape(item.gguf)) for item in self._plan]

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (HF name, float32 array in HF shape), one tensor dequantised at a time."""
        for item in self._plan:
            yield item.hf_name, self._read(item, keep_quantised=False)

    def weight_entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(safetensors name, dtype, shape) of every array `iter_weights` yields, in
        order, known from the tensor table alone: what a streaming writer needs."""
        entries: list[tuple[str, str, tuple[int, ...]]] = []
        for item in self._plan:
            shape = _tensor_shape(item.gguf)
            kind = quant.kind_of(item.gguf, table=self._table(item))
            if kind == "blocks":
                entries += [
                    (item.hf_name + ".gguf_blocks", "U8", (shape[0], int(item.gguf.n_bytes) // shape[0])),
                    (item.hf_name + ".gguf_kind", "I32", (2,)),
                ]
            elif kind == "int4":
                N, K = shape
                entries += [
                    (item.hf_name + ".q4", "U8", (N, K // 2)),
                    (item.hf_name + ".q4_scale", "F16", (N, K // quant.GROUP)),
                    (item.hf_name + ".q4_zero", "F16", (N, K // quant.GROUP)),
                ]
            elif kind == "int8":
                entries += [(item.hf_name + ".q8", "I8", shape), (item.hf_name + ".q8_scale", "F32", (shape[0],))]
            else:
                entries.append((item.hf_name, "F32", shape))
        return entries

    def iter_weights(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield the arrays of `weight_entries`, one tensor at a time: quantised GGUF
        matrices kept quantised (engine/quant.py), everything else as float32."""
        for item in self._plan:
            weight = self._read(item, keep_quantised=True)
            if isinstance(weight, np.ndarray):
                yield item.hf_name, weight
            else:
                yield from quant.to_arrays(item.hf_name, weight).items()

    def _table(self, item: _TensorPlan) -> bool:
        """Whether `item` is an embedding table that is only looked up: the model has an
        output head of its own (engine/quant.py `Blocks`)."""
        return item.hf_name == "model.embed_tokens.weight" and any(p.hf_name == "lm_head.weight" for p in self._plan)

    def _read(self, item: _TensorPlan, *, keep_quantised: bool) -> np.ndarray | quant.Quantised:
        """One tensor in HF form: float32, or kept quantised where engine/quant.py can."""
        family = self.config.family
        try:
            weight = quant.from_gguf(item.gguf, table=self._table(item)) if keep_quantised else None
            values = _dequantize(item.gguf) if weight is None else weight
        except (ValueError, NotImplementedError) as err:
            raise ModelFileError(
                f"{self.path.name}: cannot read tensor '{item.gguf.name}' "
                f"({item.gguf.tensor_type.name}): {_one_line(err)}"
            ) from None
        stem = item.gguf.name.split(".")
        if family in _PERMUTED_QK_FAMILIES and len(stem) == 4 and stem[2] in ("attn_q", "attn_k"):
            heads = self.config.num_attention_heads if stem[2] == "attn_q" else self.config.num_key_value_heads
            if isinstance(values, np.ndarray):
                values = unpermute_rotary(values, heads)
            else:  # the same row order, taken from the quantised rows
                values = values.rows(unpermute_rotary(np.arange(values.shape[0]), heads))
        if not isinstance(values, np.ndarray):
            return values
        if family in _NORM_PLUS_ONE_FAMILIES and item.gguf.name.endswith("norm.weight"):
            values = values - np.float32(1.0)
        return np.ascontiguousarray(values, dtype=np.float32)


def unpermute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for interleaved RoPE.

    llama.cpp viewed the rows of each head as (2, head_dim/2) (HF's rotate-half halves)
    and transposed them to (head_dim/2, 2) so rotation pairs are adjacent. Viewing the
    stored rows as (head_dim/2, 2) and transposing back restores HF's order. Works for
    weights (rows, in_features) and biases (rows,).
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ModelFileError(f"cannot split {rows} q/k rows into {n_head} heads of even size")
    half = rows // n_head // 2
    # (n_head, half, 2, *rest) -> (n_head, 2, half, *rest)
    grouped = weight.reshape(n_head, half, 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def read_gguf(path: str | Path) -> GGUFContents:
    """Open a GGUF file, check it is a complete model of a supported family, and map it.

    Raises ModelFileError for a missing, empty, non-GGUF, truncated or incomplete file and
    UnsupportedModelError for an architecture Quire does not implement.
    """
    path = Path(path)
    reader = _open_reader(path)
    meta = _Metadata(reader, path)
    architecture = meta.get_str("general.architecture")
    try:
        family = family_of(architecture)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{path.name}: {err}") from None

    tensors = {t.name: t for t in reader.tensors}
    plan = _plan_tensors(tensors, family, path)
    config = _build_config(meta, architecture, family, tensors, path)
    _check_required(tensors, family, config.num_hidden_layers, path)
    tokenizer_meta = {k: _field_value(f) for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tokenizer_meta["general.architecture"] = architecture
    return GGUFContents(path=path, config=config, tokenizer_meta=tokenizer_meta, _reader=reader, _plan=plan)


def _open_reader(path: Path) -> GGUFReader:
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(f"{path.name}: file is empty (0 bytes)")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{path.name}: not a GGUF file (bad magic)")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OverflowError, UnicodeDecodeError, OSError) as err:
        # GGUFReader indexes the memory map without bounds checks, so a short file shows
        # up as a numpy reshape/index error somewhere in the header or tensor table.
        log.debug("GGUFReader failed on %s: %r", path, err)
        raise ModelFileError(
            f"{path.name}: GGUF file is truncated or corrupt ({size} bytes; its header or tensor table cannot be read)"
        ) from None
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ModelFileError(f"{path.name}: GGUF file is truncated (tensor '{tensor.name}' runs past the end)")
    return reader


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


class _Metadata:
    """Typed access to GGUF metadata with errors that name the file and key."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self._fields = reader.fields
        self._path = path

    def has(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default: object = None) -> object:
        found = self._fields.get(key)
        return default if found is None else _field_value(found)

    def require(self, key: str) -> object:
        if key not in self._fields:
            raise ModelFileError(f"{self._path.name}: GGUF metadata lacks '{key}'")
        return _field_value(self._fields[key])

    def get_str(self, key: str) -> str:
        value = self.require(key)
        if not isinstance(value, str):
            raise ModelFileError(f"{self._path.name}: GGUF metadata '{key}' is not a string")
        return value

    def get_int(self, key: str, default: int | None = None) -> int:
        value = self.get(key, default) if default is not None else self.require(key)
        if isinstance(value, list):
            # Some architectures store per-layer arrays (e.g. head_count_kv); Quire's
            # families use one value for all layers.
            if len(set(value)) != 1:
                raise UnsupportedModelError(f"{self._path.name}: '{key}' varies per layer ({sorted(set(value))})")
            value = value[0]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ModelFileError(f"{self._path.name}: GGUF metadata '{key}' is not a number")
        return int(value)

    def get_float(self, key: str, default: float) -> float:
        value = self.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ModelFileError(f"{self._path.name}: GGUF metadata '{key}' is not a number")
        # GGUF stores float32; round-trip through its decimal repr so 1e-5 reads as 1e-5,
        # not 9.999999747378752e-06.
        return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _decode(raw: np.ndarray) -> str:
    return raw.tobytes().decode("utf-8", errors="surrogateescape")


def _scalar(part: np.ndarray, kind: GGUFValueType) -> object:
    value = part.tolist()[0]
    if kind == GGUFValueType.BOOL:
        return bool(value)
    return value


def _field_value(found: ReaderField) -> object:
    """A metadata field as a plain Python value (str, int, float, bool or list)."""
    kind = found.types[0]
    if kind == GGUFValueType.ARRAY:
        item_kind = found.types[-1] if len(found.types) > 1 else None
        if item_kind is None:
            return []
        if item_kind == GGUFValueType.STRING:
            return [_decode(found.parts[i]) for i in found.data]
        if item_kind == GGUFValueType.ARRAY:
            raise ModelFileError(f"nested GGUF arrays are not supported (key '{found.name}')")
        if not found.data:
            return []
        # Numeric arrays are stored as one part per element; concatenate once.
        values = np.concatenate([found.parts[i] for i in found.data]).tolist()
        if item_kind == GGUFValueType.BOOL:
            return [bool(v) for v in values]
        return values
    if kind == GGUFValueType.STRING:
        return _decode(found.parts[-1])
    return _scalar(found.parts[-1], kind)


def _layer_map(family: str) -> dict[str, str]:
    return _GEMMA3_LAYER_MAP if family == "gemma3" else _LLAMA_LAYER_MAP


def _hf_name(gguf_name: str, family: str) -> str | None:
    if gguf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] in ("weight", "bias"):
        module = _layer_map(family).get(parts[2])
        if module is not None:
            return f"model.layers.{int(parts[1])}.{module}.{parts[3]}"
    return None


def _plan_tensors(tensors: dict[str, ReaderTensor], family: str, path: Path) -> list[_TensorPlan]:
    plan: list[_TensorPlan] = []
    for name, tensor in tensors.items():
        if name in _SKIPPED_TENSORS:
            log.info("%s: skipping GGUF-only tensor %s", path.name, name)
            continue
        hf_name = _hf_name(name, family)
        if hf_name is None:
            raise UnsupportedModelError(
                f"{path.name}: tensor '{name}' has no place in Quire's {family} model"
            )
        plan.append(_TensorPlan(gguf=tensor, hf_name=hf_name))
    return plan


def _check_required(tensors: dict[str, ReaderTensor], family: str, layers: int, path: Path) -> None:
    required = ["token_embd.weight", "output_norm.weight"]
    stems = _REQUIRED_LAYER_STEMS + _REQUIRED_EXTRA[family]
    required += [f"blk.{i}.{stem}.weight" for i in range(layers) for stem in stems]
    for name in required:
        if name not in tensors:
            raise ModelFileError(f"{path.name}: GGUF file lacks required tensor '{name}' ({_hf_name(name, family)})")


def _tensor_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """Shape in numpy/HF order; GGUF lists dimensions innermost first."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _dequantize(tensor: ReaderTensor) -> np.ndarray:
    shape = _tensor_shape(tensor)
    raw = tensor.data
    if tensor.tensor_type == GGMLQuantizationType.F32:
        # A view of the read-only memory map; copy so callers may modify it.
        return np.array(raw, dtype=np.float32).reshape(shape)
    if raw.ndim == 2 and raw.shape[0] > _DEQUANT_ROWS:
        # gguf-py's block dequantisers make several full-size temporaries; going by row
        # chunks keeps the peak near the fp32 result (a 262k-row embedding is 670 MB).
        out = np.empty(shape, dtype=np.float32)
        flat = out.reshape(raw.shape[0], -1)
        for start in range(0, raw.shape[0], _DEQUANT_ROWS):
            stop = start + _DEQUANT_ROWS
            flat[start:stop] = dequantize(raw[start:stop], tensor.tensor_type)
        return out
    return dequantize(raw, tensor.tensor_type).reshape(shape).astype(np.float32, copy=False)


def _rope_scaling(meta: _Metadata, arch: str) -> dict | None:
    """HF-style rope_scaling from `{arch}.rope.scaling.*`, or None when absent/none."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    if not isinstance(kind, str) or kind in ("", "none"):
        return None
    scaling: dict = {"rope_type": kind}
    renames = {
        "factor": "factor",
        "original_context_length": "original_max_position_embeddings",
        "attn_factor": "attention_factor",
        "yarn_beta_fast": "beta_fast",
        "yarn_beta_slow": "beta_slow",
        "yarn_log_multiplier": "mscale_all_dim",
    }
    for gguf_key, hf_key in renames.items():
        value = meta.get(f"{arch}.rope.scaling.{gguf_key}")
        if value is not None:
            scaling[hf_key] = value
    return scaling


def _gemma3_layer_types(meta: _Metadata, arch: str, layers: int, path: Path) -> list[str]:
    """Sliding/full pattern: `attention.sliding_window_pattern` when the file has it
    (an int period, or one bool per layer with True = sliding), else every 6th is full."""
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise ModelFileError(f"{path.name}: sliding_window_pattern lists {len(pattern)} layers, not {layers}")
        return ["sliding_attention" if bool(swa) else "full_attention" for swa in pattern]
    period = pattern if isinstance(pattern, int) and pattern > 0 else _GEMMA3_GLOBAL_EVERY
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(layers)]


def _build_config(
    meta: _Metadata, arch: str, family: str, tensors: dict[str, ReaderTensor], path: Path
) -> ModelConfig:
    hidden = meta.get_int(f"{arch}.embedding_length")
    heads = meta.get_int(f"{arch}.attention.head_count")
    kv_heads = meta.get_int(f"{arch}.attention.head_count_kv", heads)
    head_dim = meta.get_int(f"{arch}.attention.key_length", hidden // heads)
    layers = meta.get_int(f"{arch}.block_count")

    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelFileError(f"{path.name}: GGUF metadata lacks the token list (tokenizer.ggml.tokens)")
    vocab_size = len(tokens)
    embed = tensors.get("token_embd.weight")
    if embed is not None:
        rows = _tensor_shape(embed)[0]
        if rows != vocab_size:
            # The weights decide the logits' width; a padded embedding has extra rows.
            log.warning("%s: %d tokens but %d embedding rows; using the embedding rows", path.name, vocab_size, rows)
            vocab_size = rows

    eos_ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        value = meta.get(key)
        if isinstance(value, int) and value not in eos_ids:
            eos_ids.append(value)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    name = meta.get("general.name", "")

    gemma = family == "gemma3"
    layer_types: list[str] = []
    sliding_window: int | None = None
    rope_local: float | None = None
    if gemma:
        layer_types = _gemma3_layer_types(meta, arch, layers, path)
        sliding_window = meta.get_int(f"{arch}.attention.sliding_window", 512)
        # Newer converters record the local base; older files (like the default
        # gemma-3-270m) rely on llama.cpp's built-in 10000.
        rope_local = meta.get_float(f"{arch}.rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE)
    elif meta.has(f"{arch}.attention.sliding_window"):
        log.info("%s: ignoring %s.attention.sliding_window for family %s", path.name, arch, family)

    return ModelConfig(
        family=family,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=meta.get_int(f"{arch}.feed_forward_length"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=meta.get_int(f"{arch}.context_length"),
        rms_norm_eps=meta.get_float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=meta.get_float(f"{arch}.rope.freq_base", 10000.0),
        rope_local_theta=rope_local,
        rope_scaling=_rope_scaling(meta, arch),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        layer_types=layer_types,
        sliding_window=sliding_window,
        query_pre_attn_scalar=float(head_dim) if gemma else None,
        hidden_act="gelu_pytorch_tanh" if gemma else "silu",
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=eos_ids,
        name=name if isinstance(name, str) else "",
    )
