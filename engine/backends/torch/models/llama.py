"""Llama family (Llama 2/3, SmolLM2, Mistral without sliding window): pre-norm
decoder, RoPE, grouped-query attention, SwiGLU MLP.

This module also holds `DecoderModel`, the shared skeleton the other families
subclass: each overrides only what its architecture changes (biases, q/k norms,
extra norms, sliding layers), never the generation loop or the cache.

Reference: Touvron et al. 2023, "Llama 2"; the Llama 3 herd paper for RoPE scaling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.backends.torch.kv_cache import BatchKVCache, DenseKVCache
from engine.backends.torch.layers import (
    Dense,
    Rotary,
    gated_mlp,
    interleave_rotary_rows,
    rms_norm,
    rotary_row_order,
)
from engine.backends.torch.qdense import BlockTable, QuantDense
from engine.config import ModelConfig
from engine.errors import ModelFileError
from engine.quant import Blocks, Int4, Int8, Quantised, concat_rows, quantise_int8

Linear = Dense | QuantDense


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear  # hidden → Hq*D + 2*Hkv*D: q, k, v projections fused
    out: Linear  # Hq*D → hidden
    post_attention_norm: torch.Tensor
    gate_up: Linear  # hidden → 2*I: gate and up fused
    down: Linear  # I → hidden
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    pre_feedforward_norm: torch.Tensor | None = None
    post_feedforward_norm: torch.Tensor | None = None


DENSE_FIELDS = ("qkv", "out", "gate_up", "down")
REQUIRED_NORMS = ("input_norm", "post_attention_norm")


class WeightSource:
    """Pops named tensors from a loaded state dict, failing with a clear line.

    A matrix may be quantised (engine/quant.py's Int4/Int8); `take_matrix` hands it
    over as it is, `take` dequantises it.
    """

    def __init__(self, tensors: dict[str, torch.Tensor | Quantised], dtype: torch.dtype) -> None:
        self.tensors = tensors
        self.dtype = dtype

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take_matrix(self, name: str) -> torch.Tensor | Quantised:
        try:
            tensor = self.tensors.pop(name)
        except KeyError:
            raise ModelFileError(f"model weights lack tensor '{name}'") from None
        if isinstance(tensor, Int4 | Int8 | Blocks):
            return tensor
        return tensor.to(self.dtype).contiguous()

    def take(self, name: str) -> torch.Tensor:
        return self.as_float(self.take_matrix(name))

    def as_float(self, tensor: torch.Tensor | Quantised) -> torch.Tensor:
        if isinstance(tensor, Int4 | Int8 | Blocks):
            return torch.from_numpy(tensor.dequantize()).to(self.dtype)
        return tensor

    def take_optional(self, name: str) -> torch.Tensor | None:
        return self.take(name) if name in self.tensors else None


class DecoderModel:
    """A decoder-only transformer over a dense KV cache, batch size 1.

    `forward(tokens, cache)` runs T new tokens at positions [cache.length,
    cache.length + T) and returns fp32 logits, (T, vocab) or (1, vocab).
    """

    # Gemma stores norm weights as an offset from 1; Llama stores them directly.
    norm_offset = 0.0
    # Where the weights live; `to(device)` moves them. Caches follow the model.
    device = torch.device("cpu")

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.config = config
        self.dtype = dtype
        source = WeightSource(tensors, dtype)
        embed = source.take_matrix("model.embed_tokens.weight")  # (V, hidden)
        tied = config.tie_word_embeddings or not source.has("lm_head.weight")
        if isinstance(embed, Blocks) and tied:  # the table is the output head too: it must multiply
            embed = quantise_int8(embed.dequantize())
        # A quantised table stays quantised: rows are dequantised as tokens look them up.
        if isinstance(embed, Blocks):
            self.embed = BlockTable(embed, dtype)
        else:
            self.embed = embed if isinstance(embed, torch.Tensor) else QuantDense(embed, None, dtype)
        # The GGUF's own table, once repacked, must not live on through the layers' load:
        # a 7B's is 325 MiB, which was most of its peak over the loaded model.
        del embed
        self.final_norm = self._norm_weight(source.take("model.norm.weight"))
        if tied:
            self.lm_head = self.embed if isinstance(self.embed, QuantDense) else Dense(self.embed)
        else:
            self.lm_head = self._linear(source.take_matrix("lm_head.weight"))
        self.layers = [self._load_layer(source, i) for i in range(config.num_hidden_layers)]
        self._setup()

    def _setup(self) -> None:
        """Everything derived from the config rather than loaded (both load paths)."""
        c = self.config
        self.rotary = Rotary(c.head_dim, c.rope_theta, c.rope_scaling)
        self.q_size = c.num_attention_heads * c.head_dim
        self.kv_size = c.num_key_value_heads * c.head_dim

    # -- prepared weights: the loaded form, saved so the next load is a plain read --

    @property
    def quantised(self) -> bool:
        """Whether any matrix is held quantised (such a model is never prepared)."""
        heads = (self.embed, self.lm_head)
        return any(isinstance(m, QuantDense | BlockTable) for m in heads) or any(
            isinstance(getattr(layer, name), QuantDense) for layer in self.layers for name in DENSE_FIELDS
        )

    def prepared_tensors(self) -> dict[str, torch.Tensor]:
        """Every weight in its final dtype and layout, under flat names."""
        out = {"embed": self.embed, "final_norm": self.final_norm}
        if self.lm_head.weight is not self.embed:
            out["lm_head.weight"] = self.lm_head.weight
        for i, layer in enumerate(self.layers):
            for f in dataclasses.fields(layer):
                value = getattr(layer, f.name)
                if isinstance(value, Dense):
                    out[f"layers.{i}.{f.name}.weight"] = value.weight
                    if value.bias is not None:
                        out[f"layers.{i}.{f.name}.bias"] = value.bias
                elif value is not None:
                    out[f"layers.{i}.{f.name}"] = value
        return out

    @classmethod
    def from_prepared(cls, config: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> DecoderModel:
        """Rebuild from `prepared_tensors()` output; KeyError if a tensor is missing."""
        model = cls.__new__(cls)
        model.config, model.dtype = config, dtype
        model.embed = tensors["embed"]
        model.final_norm = tensors["final_norm"]
        head = tensors.get("lm_head.weight")
        model.lm_head = Dense.laid_out(head) if head is not None else Dense(model.embed)
        model.layers = []
        for i in range(config.num_hidden_layers):
            values: dict[str, object] = {}
            for f in dataclasses.fields(LayerWeights):
                key = f"layers.{i}.{f.name}"
                if f.name in DENSE_FIELDS:
                    values[f.name] = Dense.laid_out(tensors[key + ".weight"], tensors.get(key + ".bias"))
                elif f.name in REQUIRED_NORMS:
                    values[f.name] = tensors[key]
                else:
                    values[f.name] = tensors.get(key)
            model.layers.append(LayerWeights(**values))
        model._setup()
        return model

    # -- loading -------------------------------------------------------------

    def _norm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight.float() + self.norm_offset).to(self.dtype) if self.norm_offset else weight

    def _linear(self, weight: torch.Tensor | Quantised, bias: torch.Tensor | None = None) -> Linear:
        return Dense(weight, bias) if isinstance(weight, torch.Tensor) else QuantDense(weight, bias, self.dtype)

    def _fused(
        self, source: WeightSource, parts: list[torch.Tensor | Quantised], bias: torch.Tensor | None = None
    ) -> Linear:
        """One matrix of `parts` stacked by rows; quantised when they all are."""
        if all(isinstance(part, Int4 | Int8) for part in parts):
            return QuantDense(concat_rows(parts), bias, self.dtype)
        return Dense(torch.cat([source.as_float(p) for p in parts], dim=0), bias)

    def _load_layer(self, source: WeightSource, i: int) -> LayerWeights:
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        D = self.config.head_dim
        q, k, v = (source.take_matrix(attn + f"{n}_proj.weight") for n in "qkv")
        # Queries and keys move to the interleaved RoPE layout once, here (see layers).
        q, k = (
            interleave_rotary_rows(w, D) if isinstance(w, torch.Tensor) else w.rows(rotary_row_order(w.shape[0], D).numpy())
            for w in (q, k)
        )
        biases = [source.take_optional(attn + f"{n}_proj.bias") for n in "qkv"]
        qkv_bias = None
        if all(b is not None for b in biases):
            qkv_bias = torch.cat([interleave_rotary_rows(biases[0], D), interleave_rotary_rows(biases[1], D), biases[2]])
        gate_up = [source.take_matrix(p + "mlp.gate_proj.weight"), source.take_matrix(p + "mlp.up_proj.weight")]
        optional = {
            "q_norm": source.take_optional(attn + "q_norm.weight"),
            "k_norm": source.take_optional(attn + "k_norm.weight"),
            "pre_feedforward_norm": source.take_optional(p + "pre_feedforward_layernorm.weight"),
            "post_feedforward_norm": source.take_optional(p + "post_feedforward_layernorm.weight"),
        }
        for name in ("q_norm", "k_norm"):
            if optional[name] is not None:
                optional[name] = interleave_rotary_rows(optional[name], D)
        optional = {k: (self._norm_weight(v) if v is not None else None) for k, v in optional.items()}
        return LayerWeights(
            input_norm=self._norm_weight(source.take(p + "input_layernorm.weight")),
            qkv=self._fused(source, [q, k, v], qkv_bias),
            out=self._linear(source.take_matrix(attn + "o_proj.weight")),
            post_attention_norm=self._norm_weight(source.take(p + "post_attention_layernorm.weight")),
            gate_up=self._fused(source, gate_up),
            down=self._linear(source.take_matrix(p + "mlp.down_proj.weight")),
            **optional,
        )

    def to(self, device: torch.device | str) -> DecoderModel:
        """Move every weight and rotation table to `device` ("cpu", "cuda"); a tied
        output head stays tied (one tensor)."""
        device = torch.device(device)
        if device == self.device:
            return self
        if self.quantised and device.type != "cuda":
            raise ValueError("a model with quantised weights runs on the CPU or a CUDA GPU; load it dequantised for another device")
        tied = self.lm_head is self.embed or getattr(self.lm_head, "weight", None) is self.embed

        def move(value: object) -> object:
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, QuantDense | BlockTable) and value is self.embed:
                return value.to(device, table=True)
            if isinstance(value, (Dense, Rotary, QuantDense)):
                return value.to(device)
            return value

        for name, value in list(vars(self).items()):
            if name == "layers":
                for layer in value:
                    for f in dataclasses.fields(layer):
                        setattr(layer, f.name, move(getattr(layer, f.name)))
            elif name != "lm_head":
                setattr(self, name, move(value))
        if tied:
            if isinstance(self.lm_head, Dense):
                self.lm_head.weight = self.embed
        else:
            self.lm_head.to(device)
        self.device = device
        return self

    # -- running -------------------------------------------------------------

    def new_cache(self, capacity: int) -> DenseKVCache:
        c = self.config
        return DenseKVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, capacity, self.dtype, self.device)

    def batch_cache(self, caches: list[DenseKVCache], room: int) -> BatchKVCache:
        """Prefilled sequences, decoded together from here (engine.generate.generate_batch)."""
        return BatchKVCache(caches, room)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed, QuantDense | BlockTable):
            return self.embed.embedding(ids)
        return F.embedding(ids, self.embed)

    def rotary_for(self, layer: int) -> Rotary:
        return self.rotary

    def window_for(self, layer: int) -> int | None:
        if self.config.layer_types[layer] == "sliding_attention":
            return self.config.sliding_window
        return None

    def project_qkv(self, layer: LayerWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (1, T, hidden) → q (1, T, Hq, D), k and v (1, T, Hkv, D), before RoPE;
        q and k in the interleaved pair layout."""
        c = self.config
        T = x.shape[1]
        qkv = layer.qkv(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(1, T, c.num_attention_heads, c.head_dim)
        k = k.view(1, T, c.num_key_value_heads, c.head_dim)
        v = v.view(1, T, c.num_key_value_heads, c.head_dim)
        return q, k, v

    def self_attention(self, index: int, layer: LayerWeights, x: torch.Tensor, cache: DenseKVCache) -> torch.Tensor:
        T = x.shape[1]
        q, k, v = self.project_qkv(layer, x)
        # The cache owns positions and attention: a dense cache rotates and attends
        # over everything it holds; the build's capture cache also keeps the keys.
        out = cache.attend_layer(
            index,
            q,
            k,
            v,
            rotary=self.rotary_for(index),
            scale=self.config.attention_scale,
            window=self.window_for(index),
        )  # (1, Hq, T, D)
        out = out.transpose(1, 2).reshape(1, T, self.q_size)  # (1, T, Hq*D)
        return layer.out(out)

    def decoder_layer(self, index: int, layer: LayerWeights, x: torch.Tensor, cache: DenseKVCache) -> torch.Tensor:
        eps = self.config.rms_norm_eps
        x = x + self.self_attention(index, layer, rms_norm(x, layer.input_norm, eps), cache)
        h = rms_norm(x, layer.post_attention_norm, eps)
        return x + gated_mlp(h, layer.gate_up, layer.down, self.config.hidden_act)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor | list[int],
        cache: DenseKVCache,
        *,
        last_only: bool = True,
        on_layer: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """`on_layer(done, total)` runs after each layer: progress inside a long chunk,
        and a place to cancel (raising there is safe: the cache only counts the new
        tokens once every layer has stored them)."""
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.device).view(1, -1)  # (1, T)
        T = ids.shape[1]
        x = self.embed_tokens(ids)  # (1, T, hidden)
        for index, layer in enumerate(self.layers):
            x = self.decoder_layer(index, layer, x, cache)
            if on_layer is not None:
                on_layer(index + 1, len(self.layers))
        cache.advance(T)
        if last_only:
            x = x[:, -1:]
        x = rms_norm(x, self.final_norm, self.config.rms_norm_eps)
        return self.lm_head(x[0]).float().cpu()  # (T or 1, V), where the sampler reads it


class LlamaModel(DecoderModel):
    """Llama: the skeleton as it is."""
