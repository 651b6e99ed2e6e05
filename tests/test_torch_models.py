"""Each torch family against transformers on tiny random-weight models.

One shared check per family (the habit of mlx-lm's tests/test_models.py): build a
small random model with transformers, save it as safetensors, load it with Quire's
backend, and compare logits for a whole sequence, for chunked prefill with a KV
cache, and for token-by-token decode.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.backends.torch import load  # noqa: E402
from engine.config import ModelConfig  # noqa: E402

TOLERANCE = 1e-4  # fp32, max abs logit difference


def tiny_config(family: str):
    common = dict(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if family == "llama":
        return transformers.LlamaConfig(**common, head_dim=16, rope_theta=500000.0)
    if family == "llama3-scaled":
        return transformers.LlamaConfig(
            **common,
            head_dim=16,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if family == "qwen2":
        return transformers.Qwen2Config(**common, rope_theta=1000000.0)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32, rope_theta=1000000.0)
    if family == "gemma3":
        cfg = dict(common, tie_word_embeddings=True, num_hidden_layers=6)
        return transformers.Gemma3TextConfig(
            **cfg,
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        )
    raise AssertionError(family)


FAMILIES = ["llama", "llama3-scaled", "qwen2", "qwen3", "gemma3"]


def tiny_model_pair(family: str, folder):
    """A random transformers model of `family` and Quire's fp32 load of the same weights."""
    torch.manual_seed(0)
    hf_config = tiny_config(family)
    reference = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    # Random init leaves norms at 1 and biases at 0: perturb every tensor so a
    # wrong norm offset, a missing bias or a swapped projection shows up.
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference.eval()
    reference.save_pretrained(folder, safe_serialization=True)
    config = ModelConfig.from_hf_dict(json.loads((folder / "config.json").read_text()))
    ours = load(config, sorted(folder.glob("*.safetensors")), dtype="float32")
    ours.folder = folder
    return reference, ours


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    reference, ours = tiny_model_pair(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, reference, ours


def reference_logits(reference, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].float()


def test_full_sequence_logits_match(pair):
    family, reference, ours = pair
    ids = torch.randint(0, 211, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = reference_logits(reference, ids)
    got = ours.forward(ids, ours.new_cache(64), last_only=False)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOLERANCE, family


def test_chunked_prefill_and_decode_match(pair):
    family, reference, ours = pair
    ids = torch.randint(0, 211, (37,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = reference_logits(reference, ids)
    cache = ours.new_cache(64)
    pieces = [ours.forward(ids[0:13], cache, last_only=False), ours.forward(ids[13:30], cache, last_only=False)]
    pieces += [ours.forward([token], cache) for token in ids[30:]]
    got = torch.cat(pieces)
    assert cache.length == len(ids)
    assert (got - expected).abs().max().item() < TOLERANCE, family


def test_greedy_generation_matches(pair):
    family, reference, ours = pair
    prompt = [5, 17, 99, 3, 150, 42, 7]
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    expected = out[0, len(prompt) :].tolist()
    cache = ours.new_cache(64)
    logits = ours.forward(prompt, cache)
    got = []
    for _ in range(20):
        token = int(logits[-1].argmax())
        got.append(token)
        logits = ours.forward([token], cache)
    assert got == expected, family


def test_bfloat16_tracks_float32(pair):
    """The bf16 path (the default where bf16 matmuls are faster) stays close to fp32."""
    family, reference, ours = pair
    folder = ours.folder
    config = ModelConfig.from_hf_dict(json.loads((folder / "config.json").read_text()))
    half = load(config, sorted(folder.glob("*.safetensors")), dtype="bfloat16")
    ids = torch.randint(0, 211, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = reference_logits(reference, ids)
    got = half.forward(ids, half.new_cache(64), last_only=False)
    assert got.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: logits of O(1) move by a few hundredths, not more.
    assert (got - expected).abs().max().item() < 0.15, family
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agreement >= 0.9, (family, agreement)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prepared_weights_reload_identically_and_survive_damage(tmp_path, dtype):
    torch.manual_seed(4)
    reference = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen2"))
    reference.save_pretrained(tmp_path, safe_serialization=True)
    config = ModelConfig.from_hf_dict(json.loads((tmp_path / "config.json").read_text()))
    weights = sorted(tmp_path.glob("*.safetensors"))
    ids = list(range(10, 30))
    first = load(config, weights, dtype=dtype)
    prepared = tmp_path / "quire-prepared" / f"v1-{dtype}.safetensors"
    assert prepared.is_file()
    assert sorted(tmp_path.glob("*.safetensors")) == weights  # not mistaken for weights
    second = load(config, weights, dtype=dtype)
    a = first.forward(ids, first.new_cache(32), last_only=False)
    b = second.forward(ids, second.new_cache(32), last_only=False)
    assert torch.equal(a, b)
    prepared.write_bytes(prepared.read_bytes()[:1000])  # truncated: must be rebuilt, not used
    third = load(config, weights, dtype=dtype)
    assert torch.equal(third.forward(ids, third.new_cache(32), last_only=False), a)
    assert prepared.stat().st_size > 1000


def test_cancel_inside_a_chunk_leaves_the_cache_consistent(pair):
    from engine.errors import Cancelled
    from engine.generate import prefill

    family, _, ours = pair
    ids = torch.randint(0, 211, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    fresh = prefill(ours, ids, ours.new_cache(64))
    cache = ours.new_cache(64)
    prefill(ours, ids[:10], cache)
    checks = {"n": 0}

    def cancel_mid_chunk() -> bool:
        checks["n"] += 1
        return checks["n"] > 2  # the chunk check, one layer, then stop inside the chunk

    with pytest.raises(Cancelled):
        prefill(ours, ids[10:], cache, cancel=cancel_mid_chunk)
    assert cache.length == 10
    resumed = prefill(ours, ids[10:], cache)
    assert abs(resumed - fresh).max() < 1e-4, family


def test_sequences_decoded_together_match_each_alone(pair):
    """Three prompts of different lengths, prefilled apart and decoded as one batch
    (the rows' own positions; Gemma 3's sliding window of 8 is passed), give each
    prompt's reference logits; a row dropped midway leaves the others exact."""
    family, reference, ours = pair
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 211, (n,), generator=generator).tolist() for n in (5, 19, 11)]
    steps = 6
    continuations = [torch.randint(0, 211, (steps,), generator=generator).tolist() for _ in prompts]
    expected = [reference_logits(reference, p + c)[len(p) - 1 :] for p, c in zip(prompts, continuations)]
    caches = [ours.new_cache(len(p)) for p in prompts]
    got = [[ours.forward(p, cache)[-1]] for p, cache in zip(prompts, caches)]
    batch = ours.batch_cache(caches, steps)
    rows = [0, 1, 2]
    for step in range(steps):
        if step == 3:  # the second sequence is done
            batch.keep([0, 2])
            rows = [0, 2]
        logits = ours.forward([continuations[r][step] for r in rows], batch, last_only=False)
        assert logits.shape[0] == len(rows)
        for row, r in enumerate(rows):
            got[r].append(logits[row])
    for r in range(3):
        want = expected[r][: len(got[r])]
        assert (torch.stack(got[r]) - want).abs().max().item() < TOLERANCE, (family, r)
    assert batch.lengths.tolist() == [len(prompts[0]) + steps, len(prompts[2]) + steps]


def test_generate_batch_gives_each_prompt_what_generate_gives_it(pair):
    """Greedy, with a stop token that ends some sequences early (rows are dropped)."""
    from engine.generate import GenerationStats, SamplingParams, generate, generate_batch

    family, _, ours = pair

    class Ids:
        def feed(self, token_id: int) -> str:
            return f"{token_id} "

        def flush(self) -> str:
            return ""

    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 211, (n,), generator=generator).tolist() for n in (9, 4, 14, 7)]
    alone = [list(generate(ours, p, Ids(), SamplingParams(max_new_tokens=12))) for p in prompts]
    # A stop token that the first sequence meets early: the batch must drop its row.
    stop = alone[0][2].token_id
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(stop,))
    expected = ["".join(t.text for t in generate(ours, p, Ids(), params)) for p in prompts]
    stats = [GenerationStats() for _ in prompts]
    got = generate_batch(ours, prompts, [Ids() for _ in prompts], params, stats=stats)
    assert got == expected, family
    assert stats[0].finish_reason == "stop"
    assert stats[0].generated_tokens == [t.token_id for t in alone[0]].index(stop) <= 2
    assert [s.generated_tokens for s in stats] == [len(t.split()) for t in expected]


@pytest.mark.parametrize("window", [None, 50, 300])
@pytest.mark.parametrize("past", [0, 70])
def test_blocked_attention_matches_torchs_fused_kernel(past, window):
    """The CPU's attention (query blocks of 64, each over the keys it can see) against
    torch's fused kernel with an explicit causal mask, over several blocks and a
    block that ends mid-way, with and without earlier tokens in the cache, and with
    a sliding window shorter than a block, and longer."""
    from engine.backends.torch.layers import ATTENTION_BLOCK, attend

    generator = torch.Generator().manual_seed(7)
    T, H, Hkv, D = 2 * ATTENTION_BLOCK + 23, 6, 2, 16
    q = torch.randn(1, H, T, D, generator=generator)
    k = torch.randn(1, Hkv, past + T, D, generator=generator)
    v = torch.randn(1, Hkv, past + T, D, generator=generator)
    got = attend(q, k, v, past=past, scale=0.3, window=window)
    keys, queries = torch.arange(past + T).view(1, -1), torch.arange(past, past + T).view(-1, 1)
    allowed = (keys <= queries) & (queries - keys < (window or past + T))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1), attn_mask=allowed, scale=0.3
    )
    assert (got - expected).abs().max().item() < 1e-5
    # A query sees no later key: changing the last key moves only the last query's output.
    k2 = k.clone()
    k2[:, :, -1] += 5.0
    moved = (attend(q, k2, v, past=past, scale=0.3, window=window) - got).abs().amax(dim=(0, 1, 3))
    assert moved[:-1].max().item() == 0.0 and moved[-1].item() > 0.0


@pytest.mark.parametrize("past", [0, 70])
def test_bf16_attention_stays_within_bf16_rounding_of_float32(past):
    """Prefill and decode attention in bf16 (scores scaled and the softmax written in
    bf16, summed in float32 inside) against torch's float32 kernel on the same
    inputs: within what bf16 inputs and outputs round to, for a prefill over several
    query blocks and for one decoded token over the whole cache."""
    from engine.backends.torch.layers import ATTENTION_BLOCK, attend

    generator = torch.Generator().manual_seed(11)
    T, H, Hkv, D = 2 * ATTENTION_BLOCK + 9, 8, 2, 64
    q = torch.randn(1, H, T, D, generator=generator).to(torch.bfloat16)
    k = torch.randn(1, Hkv, past + T, D, generator=generator).to(torch.bfloat16)
    v = torch.randn(1, Hkv, past + T, D, generator=generator).to(torch.bfloat16)
    scale = D**-0.5
    keys, queries = torch.arange(past + T).view(1, -1), torch.arange(past, past + T).view(-1, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(H // Hkv, 1), v.float().repeat_interleave(H // Hkv, 1),
        attn_mask=keys <= queries, scale=scale,
    )
    got = attend(q, k, v, past=past, scale=scale)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max().item() < 0.02
    last = attend(q[:, :, -1:], k, v, past=past + T - 1, scale=scale)  # one decoded token
    assert last.dtype == torch.bfloat16
    assert (last.float() - expected[:, :, -1:]).abs().max().item() < 0.02
