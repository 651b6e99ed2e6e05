"""engine/quant.py and the torch backend's QuantDense: GGUF blocks repacked against
gguf-py's own dequantisation, torch's int4 layout, and the kernels against a float
matmul of the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from engine import quant
from engine.backends.torch.qdense import QuantDense, _pack_int4

RNG = np.random.default_rng(7)


def weights(n: int, k: int) -> np.ndarray:
    # Rows of different scales, as in real layers, so a per-row scale matters.
    return (RNG.standard_normal((n, k)) * RNG.uniform(0.005, 0.05, (n, 1))).astype(np.float32)


def q4_k_blocks(n: int, k: int) -> np.ndarray:
    """Random but valid Q4_K data (gguf-py cannot quantise to it): small positive f16
    d and dmin, random 6-bit scales and mins, random nibbles."""
    count = n * k // 256
    blocks = RNG.integers(0, 256, (count, 144), dtype=np.uint8)
    blocks[:, 0:2] = RNG.uniform(1e-4, 1e-2, (count, 1)).astype(np.float16).view(np.uint8)
    blocks[:, 2:4] = RNG.uniform(1e-4, 1e-2, (count, 1)).astype(np.float16).view(np.uint8)
    return blocks


@pytest.mark.parametrize("kind", [T.Q4_0, T.Q4_1, T.Q4_K])
def test_four_bit_types_repack_exactly(kind: T) -> None:
    n, k = 96, 512
    raw = q4_k_blocks(n, k) if kind == T.Q4_K else quantize(weights(n, k), kind)
    reference = dequantize(raw, kind).reshape(n, k)
    packed = quant.from_blocks(kind, raw, n, k)
    assert isinstance(packed, quant.Int4) and packed.shape == (n, k)
    # The GGUF's nibbles are kept and scale and zero are products of its fields, so
    # only float32 rounding (another order of the same operations) tells them apart.
    atol = 4 * np.finfo(np.float32).eps * np.abs(reference).max()
    np.testing.assert_allclose(packed.dequantize(), reference, rtol=0, atol=atol)
    # On disk scale and zero are float16: at most ~2^-11 of a group's range.
    stored = quant.from_arrays(quant.to_arrays("w", packed))["w"]
    error = np.abs(stored.dequantize() - reference).max()
    assert error <= 2.0**-10 * np.abs(reference).max()  # exact for Q4_0 (d is f16)


@pytest.mark.parametrize("kind", [T.Q5_0, T.Q8_0])
def test_other_types_requantise_to_int8_within_half_a_step(kind: T) -> None:
    n, k = 64, 256
    raw = quantize(weights(n, k), kind)
    reference = dequantize(raw, kind).reshape(n, k)
    packed = quant.from_blocks(kind, raw, n, k)
    assert isinstance(packed, quant.Int8)
    step = np.abs(reference).max(axis=1, keepdims=True) / 127
    error = np.abs(packed.dequantize() - reference)
    assert np.all(error <= step / 2 * 1.0001)
    assert error.max() > 0  # lossy, and said so in engine/quant.py
    # Relative to the weights, the loss is about 1% (measured on Qwen2.5-0.5B's
    # Q5_0/Q6_K/Q8_0 matrices: 0.8-1.5%).
    assert np.linalg.norm(packed.dequantize() - reference) / np.linalg.norm(reference) < 0.02


def test_int4_layout_is_torch_packers() -> None:
    values = torch.randint(0, 16, (192, 96), dtype=torch.uint8)
    assert torch.equal(_pack_int4(values), torch._convert_weight_to_int4pack_for_cpu(values.int(), 1))


def _int4(n: int, k: int) -> quant.Int4:
    return quant.Int4(
        quant.pack_nibbles(RNG.integers(0, 16, (n, k))),
        RNG.uniform(1e-3, 1e-2, (n, k // 32)).astype(np.float32),
        RNG.uniform(-1e-2, 1e-2, (n, k // 32)).astype(np.float32),
    )


@pytest.mark.parametrize("rows", [1, 40])  # the kernel, and dequantise-then-matmul
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quant_dense_matches_float_matmul(kind: str, rows: int) -> None:
    n, k = 200, 128  # 200 rows: not a multiple of the int4 kernel's 64-row blocks
    weight = _int4(n, k) if kind == "int4" else quant.quantise_int8(weights(n, k))
    w = torch.from_numpy(weight.dequantize())
    bias = torch.randn(n)
    x = torch.randn(1, rows, k)
    expected = x @ w.T + bias
    exact = QuantDense(weight, bias, torch.float32)
    assert exact.kind == kind
    torch.testing.assert_close(exact(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(exact.dequantize(70, 130), w[70:130], rtol=0, atol=1e-6)
    # bf16 activations: the same product within bf16 rounding.
    fast = QuantDense(weight, bias.bfloat16(), torch.bfloat16)
    got = fast(x.bfloat16()).float()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2


def test_int4_repacked_and_dequantised_in_slices_as_whole(monkeypatch) -> None:
    """A matrix packed and dequantised a slice of rows at a time (as a 7B's are, to
    bound the transient memory) gives the same layout and product as in one piece."""
    import engine.backends.torch.qdense as qdense

    weight = _int4(200, 128)  # 200 rows: three whole slices of 64 and one padded
    whole = QuantDense(weight, None, torch.float32)
    x = torch.randn(40, 128)
    monkeypatch.setattr(qdense, "PACK_ROWS", 64)
    monkeypatch.setattr(qdense, "DEQUANT_VALUES", 64 * 128)  # slices of 64 rows
    sliced = QuantDense(weight, None, torch.float32)
    assert torch.equal(sliced.q, whole.q)
    torch.testing.assert_close(sliced(x), whole(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sliced(x), x @ torch.from_numpy(weight.dequantize()).T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantised_embedding_rows(kind: str) -> None:
    weight = _int4(256, 64) if kind == "int4" else quant.quantise_int8(weights(256, 64))
    table = torch.from_numpy(weight.dequantize())
    ids = torch.tensor([[0, 31, 32, 63, 64, 200, 255, 5]])
    got = QuantDense(weight, None, torch.float32).embedding(ids)
    torch.testing.assert_close(got, table[ids], rtol=0, atol=1e-6)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


@needs_cuda
@pytest.mark.parametrize("rows", [1, 40, 600])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quant_dense_on_cuda_matches_float_matmul(kind: str, rows: int) -> None:
    """The CUDA layout (tinygemm int4; int8 kernel or cast) gives the float product."""
    n, k = 200, 256
    weight = _int4(n, k) if kind == "int4" else quant.quantise_int8(weights(n, k))
    w = torch.from_numpy(weight.dequantize())
    bias = torch.randn(n)
    x = torch.randn(1, rows, k)
    expected = x @ w.T + bias
    dense = QuantDense(weight, bias.bfloat16(), torch.bfloat16).to("cuda")
    got = dense(x.bfloat16().cuda()).float().cpu()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2


@needs_cuda
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantised_embedding_rows_on_cuda(kind: str) -> None:
    weight = _int4(256, 64) if kind == "int4" else quant.quantise_int8(weights(256, 64))
    table = torch.from_numpy(weight.dequantize())
    ids = torch.tensor([[0, 31, 32, 63, 64, 200, 255, 5]])
    dense = QuantDense(weight, None, torch.bfloat16).to("cuda", table=True)
    got = dense.embedding(ids.cuda())
    assert got.is_cuda
    torch.testing.assert_close(got.float().cpu(), table[ids], rtol=1e-2, atol=1e-3)


def test_quant_dense_moves_only_to_cuda() -> None:
    dense = QuantDense(_int4(64, 64), None, torch.bfloat16)
    assert dense.to("cpu") is dense
    with pytest.raises(ValueError, match="CPU or a CUDA GPU"):
        dense.to("meta")


def test_concat_rows_mixed_kinds_become_int8() -> None:
    four, eight = _int4(64, 64), quant.quantise_int8(weights(32, 64))
    both = quant.concat_rows([four, eight])
    assert isinstance(both, quant.Int8) and both.shape == (96, 64)
    np.testing.assert_allclose(both.dequantize()[64:], eight.dequantize(), rtol=1e-6, atol=1e-7)
    step = np.abs(four.dequantize()).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(both.dequantize()[:64] - four.dequantize()) <= step / 2 * 1.0001)
    assert isinstance(quant.concat_rows([four, _int4(32, 64)]), quant.Int4)


def _write_quantised_tiny(path, *, output_head: bool = False) -> None:
    """The tiny llama of tests/test_gguf_loader.py with its matrices stored as a
    mixed GGUF would: Q4_0 attention and gate/up, Q8_0 ffn_down and embeddings. With
    `output_head`, an output matrix of its own (Q8_0) and a Q5_0 embedding table, as
    Qwen2.5-Coder-0.5B's Q4_K_M file has."""
    from tests.test_gguf_loader import FFN, HEADS, HIDDEN, KV_HEADS, LAYERS, llama_cpp_permute, tiny_llama_tensors, tiny_writer

    t = tiny_llama_tensors(3)
    writer = tiny_writer(path, "llama", "tiny quantised")

    def add(name: str, values: np.ndarray, kind: T | None = None) -> None:
        if kind is None:
            writer.add_tensor(name, values)
        else:
            raw = quantize(values, kind)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)

    add("token_embd.weight", t["model.embed_tokens.weight"], T.Q5_0 if output_head else T.Q8_0)
    if output_head:
        add("output.weight", weights(*t["model.embed_tokens.weight"].shape), T.Q8_0)
    add("output_norm.weight", t["model.norm.weight"])
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_q.weight", llama_cpp_permute(t[p + "self_attn.q_proj.weight"], HEADS), T.Q4_0)
        add(f"blk.{i}.attn_k.weight", llama_cpp_permute(t[p + "self_attn.k_proj.weight"], KV_HEADS), T.Q4_0)
        add(f"blk.{i}.attn_v.weight", t[p + "self_attn.v_proj.weight"], T.Q4_0)
        add(f"blk.{i}.attn_output.weight", t[p + "self_attn.o_proj.weight"], T.Q4_1)
        add(f"blk.{i}.ffn_gate.weight", t[p + "mlp.gate_proj.weight"], T.Q4_0)
        add(f"blk.{i}.ffn_up.weight", t[p + "mlp.up_proj.weight"], T.Q4_0)
        add(f"blk.{i}.ffn_down.weight", weights(HIDDEN, FFN), T.Q8_0)  # not in tiny_llama_tensors
        add(f"blk.{i}.attn_norm.weight", t[p + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_quantised_model_against_its_weights_dequantised(tmp_path, monkeypatch) -> None:
    """A whole model loaded quantised (the default) against the same converted weights
    dequantised into a float32 model: float32 activations, so only the kernels and
    float32 rounding tell them apart. (What the repacking itself loses is measured
    per type above, and on the real model in docs/lab/quantised-weights.md.)"""
    import engine.backends.torch as torch_backend
    from engine.backends.torch.qdense import QuantDense
    from engine.model_store import open_model

    monkeypatch.setenv("QUIRE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch_backend, "_measured_dtype", "float32")
    path = tmp_path / "tiny-q.gguf"
    _write_quantised_tiny(path)
    folder = open_model(path)  # converted: quantised matrices stay quantised
    assert folder.source_gguf == path.resolve()  # what a named float dtype reads
    assert quant.LazyState(folder.weight_files).parameter_count() == folder.parameter_count()
    model = torch_backend.load(folder.config, folder.weight_files, device="cpu")
    reference = torch_backend.load(folder.config, folder.weight_files, dtype="float32", device="cpu")
    assert model.quantised and isinstance(model.embed, QuantDense) and model.lm_head is model.embed
    assert (model.layers[0].qkv.kind, model.layers[0].gate_up.kind, model.layers[0].down.kind) == ("int4", "int4", "int8")
    assert model.layers[0].out.kind == "int4"  # Q4_1
    assert not reference.quantised
    assert torch_backend.load(folder.config, folder.weight_files, dtype="quantised", device="cpu").quantised
    ids = list(range(3, 40)) * 2
    for rows in (ids, ids[:1]):  # prefill (dequantised matmuls) and one token (kernels)
        got = model.forward(rows, model.new_cache(128), last_only=False)
        expected = reference.forward(rows, reference.new_cache(128), last_only=False)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item())
    # The GGUF itself, dequantised by gguf-py, is what float dtypes load by name.
    exact = torch_backend.load(folder.config, [folder.source_gguf], dtype="float32", device="cpu")
    assert not exact.quantised
    torch.testing.assert_close(exact.layers[1].gate_up.weight, reference.layers[1].gate_up.weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", [T.Q5_0, T.Q5_1, T.Q8_0])
def test_a_table_keeps_its_blocks_and_looks_rows_up_exactly(kind: T) -> None:
    n, k = 96, 256
    raw = quantize(weights(n, k), kind)
    reference = dequantize(raw, kind).reshape(n, k)
    assert quant.kind_of(_tensor(raw, kind, n, k)) == "int8"  # a matrix to multiply
    table = quant.from_gguf(_tensor(raw, kind, n, k), table=True)
    assert isinstance(table, quant.Blocks) and table.shape == (n, k) and table.data.nbytes == raw.nbytes
    ids = np.array([[5, 0], [95, 5]])
    np.testing.assert_array_equal(table.dequantize(ids), reference[ids])
    np.testing.assert_array_equal(table.dequantize(), reference)
    arrays = quant.to_arrays("model.embed_tokens.weight", table)
    assert set(arrays) == {"model.embed_tokens.weight.gguf_blocks", "model.embed_tokens.weight.gguf_kind"}
    back = quant.from_arrays(arrays)["model.embed_tokens.weight"]
    np.testing.assert_array_equal(back.dequantize(np.array([7])), reference[[7]])
    # A four-bit table maps onto Int4 as any matrix does.
    assert quant.kind_of(_tensor(quantize(weights(n, k), T.Q4_0), T.Q4_0, n, k), table=True) == "int4"


def _tensor(raw: np.ndarray, kind: T, n: int, k: int):
    """The parts of a gguf ReaderTensor that engine/quant.py reads."""
    from types import SimpleNamespace

    return SimpleNamespace(tensor_type=kind, shape=np.array([k, n]), data=raw, n_bytes=raw.nbytes)


def test_an_untied_models_table_stays_in_its_gguf_blocks(tmp_path, monkeypatch) -> None:
    """With an output head of its own, the embedding table is only looked up: it is
    stored in the GGUF's Q5_0 blocks (not requantised to int8, which is larger and
    rounds), its rows dequantised exactly as tokens look them up."""
    import engine.backends.torch as torch_backend
    from engine.backends.torch.qdense import BlockTable, QuantDense
    from engine.model_store import open_model
    from gguf import GGUFReader

    monkeypatch.setenv("QUIRE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch_backend, "_measured_dtype", "float32")
    path = tmp_path / "tiny-untied.gguf"
    _write_quantised_tiny(path, output_head=True)
    folder = open_model(path)
    state = quant.LazyState(folder.weight_files)
    assert state.parameter_count() == folder.parameter_count()
    assert folder.parameter_count() == sum(int(t.n_elements) for t in GGUFReader(path).tensors)  # the GGUF's own count
    assert "model.embed_tokens.weight" in state and state.quantised
    model = torch_backend.load(folder.config, folder.weight_files, device="cpu")
    reference = torch_backend.load(folder.config, folder.weight_files, dtype="float32", device="cpu")
    assert isinstance(model.embed, BlockTable) and isinstance(model.lm_head, QuantDense) and model.quantised
    table = next(t for t in GGUFReader(path).tensors if t.name == "token_embd.weight")
    exact = dequantize(np.asarray(table.data), T.Q5_0).reshape(-1, int(table.shape[0]))
    ids = torch.tensor([[3, 9, 3]])
    np.testing.assert_array_equal(model.embed_tokens(ids).numpy(), exact[[[3, 9, 3]]])
    np.testing.assert_array_equal(reference.embed_tokens(ids).numpy(), exact[[[3, 9, 3]]])
    rows = list(range(3, 40))
    got = model.forward(rows, model.new_cache(64), last_only=False)
    expected = reference.forward(rows, reference.new_cache(64), last_only=False)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item())


@needs_cuda
def test_quantised_model_on_cuda_against_cpu(tmp_path, monkeypatch) -> None:
    """The quantised weights on CUDA (bf16 activations) against float32 on the CPU: no
    further off than bf16 itself is (float weights in bf16 on the CPU; this tiny
    random model amplifies rounding, ~12% over a prompt's rows, ~1% on one token)."""
    import engine.backends.torch as torch_backend
    from engine.model_store import open_model

    monkeypatch.setenv("QUIRE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch_backend, "_measured_dtype", "float32")
    path = tmp_path / "tiny-q.gguf"
    _write_quantised_tiny(path)
    folder = open_model(path)
    gpu = torch_backend.load(folder.config, folder.weight_files, dtype="quantised", device="cuda")
    roomy = torch_backend.load(folder.config, folder.weight_files, device="cuda")
    assert not roomy.quantised  # "auto" on a GPU with room for bf16: dequantised
    cpu = torch_backend.load(folder.config, folder.weight_files, device="cpu")
    bf16 = torch_backend.load(folder.config, folder.weight_files, dtype="bfloat16", device="cpu")
    assert gpu.quantised and gpu.layers[0].qkv.q.is_cuda and not bf16.quantised

    def error(model, rows) -> float:
        got = model.forward(rows, model.new_cache(128), last_only=False).float().cpu()
        expected = cpu.forward(rows, cpu.new_cache(128), last_only=False)
        return ((got - expected).norm() / expected.norm()).item()

    ids = list(range(3, 40)) * 2
    for rows in (ids, ids[:1]):
        assert error(gpu, rows) <= 2 * error(bf16, rows) + 0.01
