"""Model configuration shared by every backend.

`ModelConfig` is a plain dataclass with Hugging Face-style field names, so a
`config.json` from a model folder maps onto it almost directly, and the GGUF loader
fills the same fields from GGUF metadata. Unknown keys are accepted and ignored
(the habit of mlx-lm's `BaseModelArgs.from_dict`), so newer config files still load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine.errors import UnsupportedModelError

# Family names Quire implements, and the architecture names that map onto them.
# The GGUF `general.architecture` and the HF `model_type` both go through this table.
FAMILY_ALIASES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "smollm": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}


def family_of(architecture: str) -> str:
    try:
        return FAMILY_ALIASES[architecture.lower()]
    except KeyError:
        supported = ", ".join(sorted(set(FAMILY_ALIASES.values())))
        raise UnsupportedModelError(
            f"unsupported model architecture '{architecture}' (Quire supports: {supported})"
        ) from None


@dataclass
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # RoPE base of the sliding-window layers (Gemma 3 uses a different one locally).
    rope_local_theta: float | None = None
    # HF-style rope scaling dict (e.g. Llama 3.1's {"rope_type": "llama3", ...}) or None.
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # Per layer: "full_attention" or "sliding_attention". Empty means all full.
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int | None = None
    # Gemma 3 scales queries by query_pre_attn_scalar**-0.5 instead of head_dim**-0.5.
    query_pre_attn_scalar: float | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        self.family = family_of(self.family)
        if not self.layer_types:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise UnsupportedModelError(
                f"config lists {len(self.layer_types)} layer types for {self.num_hidden_layers} layers"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"{self.num_attention_heads} attention heads do not divide into "
                f"{self.num_key_value_heads} key/value heads"
            )

    @property
    def attention_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return float(base) ** -0.5

    @property
    def global_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == "full_attention"]

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Dense KV cache bytes per token of context (keys and values, all layers)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * bytes_per_value

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """Build from our own saved dict, ignoring keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_hf_dict(cls, hf: dict) -> ModelConfig:
        """Build from a Hugging Face `config.json` (transformers 4.x or 5.x layout)."""
        if "text_config" in hf and "model_type" in hf.get("text_config", {}):
            hf = {**hf["text_config"]}
        family = family_of(hf.get("model_type", ""))
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope_theta, rope_local, rope_scaling = _hf_rope(hf, family)
        eos = hf.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        layer_types = list(hf.get("layer_types") or [])
        sliding = hf.get("sliding_window")
        if family == "gemma3" and not layer_types:
            pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
            layer_types = [
                "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(hf["num_hidden_layers"])
            ]
        if family != "gemma3" and not hf.get("use_sliding_window", False):
            # Qwen configs carry a sliding_window value that is off unless use_sliding_window.
            layer_types = ["full_attention"] * hf["num_hidden_layers"]
            sliding = None
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_local_theta=rope_local,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", family == "gemma3")),
            attention_bias=bool(hf.get("attention_bias", family == "qwen2")),
            layer_types=layer_types,
            sliding_window=sliding,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if family == "gemma3" else None,
            hidden_act=act,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=hf.get("_name_or_path", ""),
        )


def _hf_rope(hf: dict, family: str) -> tuple[float, float | None, dict | None]:
    """(global theta, local theta, scaling) from either transformers 4 or 5 layouts."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        full = params["full_attention"]
        local = params.get("sliding_attention", {})
        scaling = full if full.get("rope_type", "default") != "default" else None
        return float(full.get("rope_theta", 10000.0)), float(local.get("rope_theta", 10000.0)), scaling
    if isinstance(params, dict) and params:
        scaling = params if params.get("rope_type", "default") != "default" else None
        local = float(hf.get("rope_local_base_freq", 10000.0)) if family == "gemma3" else None
        return float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), local, scaling
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    local = float(hf.get("rope_local_base_freq", 10000.0)) if family == "gemma3" else None
    return float(hf.get("rope_theta", 10000.0)), local, scaling
