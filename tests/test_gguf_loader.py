"""engine.gguf_loader: tiny GGUF files written here with gguf.GGUFWriter, bad inputs,
and (slow) the real default models against transformers' own GGUF loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from engine.errors import ModelFileError, UnsupportedModelError
from engine.gguf_loader import read_gguf, unpermute_rotary

# Tiny llama-family model: 2 layers, 4 query heads and 2 KV heads of 16, FFN 128.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, VOCAB = 64, 4, 2, 16, 128, 2, 40
Q8_BLOCK = 32


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf.py does to llama q/k rows (written independently here)."""
    rows = weight.shape[0]
    out = np.empty_like(weight)
    half = rows // n_head // 2
    for head in range(n_head):
        base = head * 2 * half
        for j in range(half):
            # HF rows (j, j + half) of a head become adjacent pair (2j, 2j + 1).
            out[base + 2 * j] = weight[base + j]
            out[base + 2 * j + 1] = weight[base + half + j]
    return out


def q8_0_bytes(scales: np.ndarray, quants: np.ndarray) -> np.ndarray:
    """Pack Q8_0 rows: per block of 32 values, fp16 scale d then 32 int8 q; value = d*q.

    scales: (rows, cols/32) float16, quants: (rows, cols) int8 -> (rows, cols/32*34) uint8.
    """
    rows, cols = quants.shape
    blocks = quants.reshape(rows, cols // Q8_BLOCK, Q8_BLOCK)
    d = scales.astype("<f2").reshape(rows, cols // Q8_BLOCK, 1).view(np.uint8)  # (rows, nb, 2)
    packed = np.concatenate([d, blocks.view(np.uint8)], axis=-1)  # (rows, nb, 34)
    return packed.reshape(rows, -1)


def tiny_llama_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named fp32 tensors of the tiny model (q/k in HF layout)."""
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    tensors = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": rand(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = rand(HEADS * HEAD_DIM, HIDDEN)
        tensors[p + "self_attn.k_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
        tensors[p + "self_attn.v_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
        tensors[p + "self_attn.o_proj.weight"] = rand(HIDDEN, HEADS * HEAD_DIM)
        tensors[p + "mlp.gate_proj.weight"] = rand(FFN, HIDDEN)
        tensors[p + "mlp.up_proj.weight"] = rand(FFN, HIDDEN)
        tensors[p + "input_layernorm.weight"] = rand(HIDDEN)
        tensors[p + "post_attention_layernorm.weight"] = rand(HIDDEN)
    return tensors


def tiny_writer(path: Path, arch: str, name: str) -> GGUFWriter:
    """A GGUFWriter with the tiny model's metadata and tokenizer; tensors to add."""
    writer = GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(50000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(VOCAB)])
    writer.add_token_types([1] * VOCAB)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    return writer


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    skip: tuple[str, ...] = (),
    with_output: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a tiny random model; return the HF-named fp32 tensors a reader must give.

    F32 tensors for most weights, Q8_0 for every ffn_down (built byte by byte here).
    """
    expected = tiny_llama_tensors(seed)
    rng = np.random.default_rng(seed + 1)
    writer = tiny_writer(path, arch, "tiny test model")
    writer.add_chat_template("{{ messages }}")

    def add(gguf_name: str, values: np.ndarray) -> None:
        if gguf_name not in skip:
            writer.add_tensor(gguf_name, values)

    add("token_embd.weight", expected["model.embed_tokens.weight"])
    add("output_norm.weight", expected["model.norm.weight"])
    if with_output:
        expected["lm_head.weight"] = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
        add("output.weight", expected["lm_head.weight"])
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_q.weight", llama_cpp_permute(expected[p + "self_attn.q_proj.weight"], HEADS))
        add(f"blk.{i}.attn_k.weight", llama_cpp_permute(expected[p + "self_attn.k_proj.weight"], KV_HEADS))
        add(f"blk.{i}.attn_v.weight", expected[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", expected[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_gate.weight", expected[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", expected[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.attn_norm.weight", expected[p + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", expected[p + "post_attention_layernorm.weight"])
        # ffn_down (HIDDEN, FFN) as Q8_0 with known scales and int8 values.
        scales = rng.uniform(0.01, 0.1, (HIDDEN, FFN // Q8_BLOCK)).astype(np.float16)
        quants = rng.integers(-127, 128, (HIDDEN, FFN), dtype=np.int8)
        expected[p + "mlp.down_proj.weight"] = (
            scales.astype(np.float32).repeat(Q8_BLOCK, axis=1) * quants.astype(np.float32)
        )
        if f"blk.{i}.ffn_down.weight" not in skip:
            writer.add_tensor(
                f"blk.{i}.ffn_down.weight", q8_0_bytes(scales, quants), raw_dtype=GGMLQuantizationType.Q8_0
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_config_from_metadata(tiny_gguf: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = tiny_gguf
    config = read_gguf(path).config
    assert config.family == "llama"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (HIDDEN, FFN, LAYERS)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert config.vocab_size == VOCAB
    assert config.max_position_embeddings == 256
    assert config.rms_norm_eps == 1e-5
    assert config.rope_theta == 50000.0
    assert config.rope_scaling is None
    assert config.tie_word_embeddings is True
    assert config.attention_bias is False
    assert config.bos_token_id == 1 and config.eos_token_ids == [2]
    assert config.layer_types == ["full_attention"] * LAYERS
    assert config.name == "tiny test model"


def test_tokenizer_meta_is_plain_python(tiny_gguf: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = tiny_gguf
    meta = read_gguf(path).tokenizer_meta
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.tokens"] == [f"tok{i}" for i in range(VOCAB)]
    assert meta["tokenizer.ggml.token_type"] == [1] * VOCAB
    assert type(meta["tokenizer.ggml.token_type"][0]) is int
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and type(meta["tokenizer.ggml.bos_token_id"]) is int
    assert meta["tokenizer.chat_template"] == "{{ messages }}"
    assert not any(k.startswith("llama.") for k in meta)


def test_tensors_match_originals(tiny_gguf: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, expected = tiny_gguf
    got = dict(read_gguf(path).iter_tensors())
    assert set(got) == set(expected)
    for name, values in got.items():
        assert values.dtype == np.float32, name
        assert values.shape == expected[name].shape, name
        # F32 tensors (q/k after un-permuting) are exact; Q8_0 is d*q, exact in fp32.
        np.testing.assert_array_equal(values, expected[name], err_msg=name)


def test_untied_output_and_writable_arrays(tmp_path: Path) -> None:
    path = tmp_path / "untied.gguf"
    expected = write_tiny_gguf(path, with_output=True)
    contents = read_gguf(path)
    assert contents.config.tie_word_embeddings is False
    got = dict(contents.iter_tensors())
    np.testing.assert_array_equal(got["lm_head.weight"], expected["lm_head.weight"])
    got["model.norm.weight"][0] = 0.0  # copies, not views of the read-only memory map


def test_chunked_dequantisation(tiny_gguf: tuple[Path, dict[str, np.ndarray]], monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.gguf_loader as loader

    path, expected = tiny_gguf
    monkeypatch.setattr(loader, "_DEQUANT_ROWS", 24)  # ffn_down has 64 rows: 24 + 24 + 16
    got = dict(read_gguf(path).iter_tensors())
    for i in range(LAYERS):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        np.testing.assert_array_equal(got[name], expected[name])


def test_unpermute_rotary_known_order() -> None:
    # One head of 8: llama.cpp stores HF rows in the order 0,4,1,5,2,6,3,7.
    stored = np.array([0, 4, 1, 5, 2, 6, 3, 7], dtype=np.float32)
    np.testing.assert_array_equal(unpermute_rotary(stored, 1), np.arange(8, dtype=np.float32))
    # Two heads of 4, with columns: per head 0,2,1,3.
    weight = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    stored = weight[[0, 2, 1, 3, 4, 6, 5, 7]]
    np.testing.assert_array_equal(unpermute_rotary(stored, 2), weight)
    np.testing.assert_array_equal(unpermute_rotary(llama_cpp_permute(weight, 2), 2), weight)


# ---- bad inputs: each gives the named error with a one-line message ----


def _one_line_error(error_class: type[Exception], path: Path) -> str:
    with pytest.raises(error_class) as caught:
        read_gguf(path)
    message = str(caught.value)
    assert "\n" not in message and message.strip() == message and message
    return message


def test_missing_file(tmp_path: Path) -> None:
    message = _one_line_error(ModelFileError, tmp_path / "absent.gguf")
    assert "not found" in message


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert "empty" in _one_line_error(ModelFileError, path)


def test_wrong_magic(tmp_path: Path, tiny_gguf: tuple[Path, dict[str, np.ndarray]]) -> None:
    path = tmp_path / "bad.gguf"
    data = bytearray(tiny_gguf[0].read_bytes())
    data[:4] = b"GGML"
    path.write_bytes(bytes(data))
    assert "not a GGUF file (bad magic)" in _one_line_error(ModelFileError, path)


@pytest.mark.parametrize("keep", [0.5, 0.98, 200, 7])
def test_truncated_file(tmp_path: Path, tiny_gguf: tuple[Path, dict[str, np.ndarray]], keep: float) -> None:
    data = tiny_gguf[0].read_bytes()
    size = int(len(data) * keep) if keep < 1 else int(keep)
    path = tmp_path / "short.gguf"
    path.write_bytes(data[:size])
    message = _one_line_error(ModelFileError, path)
    assert "truncated" in message or "empty" in message


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_unsupported_architecture(tmp_path: Path, arch: str) -> None:
    path = tmp_path / f"{arch}.gguf"
    write_tiny_gguf(path, arch=arch)
    message = _one_line_error(UnsupportedModelError, path)
    assert f"'{arch}'" in message
    for family in ("llama", "qwen2", "qwen3", "gemma3"):
        assert family in message


def test_missing_tensor(tmp_path: Path) -> None:
    path = tmp_path / "holey.gguf"
    write_tiny_gguf(path, skip=("blk.1.ffn_down.weight",))
    message = _one_line_error(ModelFileError, path)
    assert "blk.1.ffn_down.weight" in message
    assert "model.layers.1.mlp.down_proj.weight" in message


# ---- slow: the real default models against transformers ----

REAL_MODELS = [
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "gemma-3-270m-q4_k_m.gguf",
]


def _transformers_tensors(path: Path) -> dict:
    """transformers' own GGUF load (gguf-py dequantisation + its un-permute / norm shift)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_config = dict(load_gguf_checkpoint(str(path))["config"])
    model_type = hf_config.pop("model_type")
    # A weight-less skeleton tells transformers which HF names exist (gguf -> HF map).
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf_config))
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]


@pytest.mark.slow
@pytest.mark.parametrize("filename", REAL_MODELS)
def test_real_model_matches_transformers(real_gguf, filename: str) -> None:
    path = real_gguf(filename)
    reference = _transformers_tensors(path)
    contents = read_gguf(path)
    assert len(contents.tensor_names) == len(reference)
    for name, values in contents.iter_tensors():
        ref = reference.pop(name).float().numpy()  # pop: keep peak memory near one model
        assert values.shape == ref.shape, name
        assert float(np.abs(values - ref).max()) <= 1e-6, name
    assert not reference


@pytest.mark.slow
def test_real_model_configs(real_gguf) -> None:
    smol = read_gguf(real_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")).config
    assert (smol.family, smol.num_hidden_layers, smol.num_key_value_heads, smol.head_dim) == ("llama", 30, 3, 64)
    assert smol.max_position_embeddings == 8192 and smol.tie_word_embeddings and smol.rms_norm_eps == 1e-5
    qwen = read_gguf(real_gguf("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")).config
    assert (qwen.family, qwen.num_hidden_layers, qwen.num_key_value_heads, qwen.head_dim) == ("qwen2", 24, 2, 64)
    assert qwen.attention_bias and qwen.max_position_embeddings == 32768 and qwen.rope_theta == 1e6
    gemma = read_gguf(real_gguf("gemma-3-270m-q4_k_m.gguf")).config
    assert (gemma.family, gemma.num_hidden_layers, gemma.head_dim, gemma.sliding_window) == ("gemma3", 18, 256, 512)
    assert gemma.global_layers == [5, 11, 17]
    assert gemma.rope_local_theta == 10000.0 and gemma.rope_theta == 1e6
    assert gemma.query_pre_attn_scalar == 256 and gemma.hidden_act == "gelu_pytorch_tanh"
    assert gemma.tie_word_embeddings and gemma.vocab_size == 262144
