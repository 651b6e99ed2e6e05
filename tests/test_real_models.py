"""The three default models from PyPI against transformers on the same GGUF.

transformers dequantises the GGUF with gguf-py and runs its own implementation;
Quire runs its converted safetensors through its own backend. Both in fp32:
logits must agree within a tolerance set by fp32 summation order, and greedy
decoding must agree token for token for 32 tokens.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.install import DEFAULT_MODELS  # noqa: E402
from engine.runtime import load_model  # noqa: E402

pytestmark = pytest.mark.slow

# Logits are O(10); fp32 sums in a different order across 24–30 layers drift by
# ~1e-4–1e-3 here. An error in any layer moves them by whole units.
LOGIT_TOLERANCE = 2e-2
GREEDY_TOKENS = 32

MESSAGES = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Name three rivers in Europe and say one fact about each."},
]


@pytest.fixture(scope="module", params=[m.name for m in DEFAULT_MODELS])
def models(request, real_gguf_module):
    spec = next(m for m in DEFAULT_MODELS if m.name == request.param)
    path = real_gguf_module(spec.filename)
    ours = load_model(path, dtype="float32")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    return spec.name, ours, reference


def test_logits_match_transformers(models):
    name, ours, reference = models
    ids = ours.encode_chat(MESSAGES)
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0].float()
    got = torch.as_tensor(ours.model.forward(ids, ours.model.new_cache(len(ids)), last_only=False)).float()
    assert got.shape == expected.shape
    difference = (got - expected).abs().max().item()
    assert difference < LOGIT_TOLERANCE, f"{name}: max |Δlogit| = {difference}"
    assert torch.equal(got.argmax(-1), expected.argmax(-1)), name


def test_greedy_generation_matches_transformers(models):
    name, ours, reference = models
    ids = ours.encode_chat(MESSAGES)
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=GREEDY_TOKENS,
            min_new_tokens=GREEDY_TOKENS,
            do_sample=False,
        )
    expected = out[0, len(ids) :].tolist()
    from engine.generate import SamplingParams, generate
    from engine.tokenizer import StreamDecoder

    # Stop tokens off, as min_new_tokens does for transformers: compare all 32.
    params = SamplingParams(max_new_tokens=GREEDY_TOKENS, stop_token_ids=(-1,))
    got = [t.token_id for t in generate(ours.model, ids, StreamDecoder(ours.tokenizer), params) if t.token_id >= 0]
    assert got == expected, f"{name}: {ours.tokenizer.decode(got)!r} vs {ours.tokenizer.decode(expected)!r}"
