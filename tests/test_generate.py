"""The backend-agnostic generation loop, driven by a scripted model."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import Cancelled
from engine.generate import (
    GenerationStats,
    Sampler,
    SamplingParams,
    StopStringFilter,
    generate,
    prefill,
)

VOCAB = ["<eos>", "a", "b", "c", "STOP", " ", "é"]


class ScriptedModel:
    """Emits a fixed script: after n tokens of context, the next token is script[n - prompt]."""

    def __init__(self, script: list[int], prompt_len: int) -> None:
        self.script = script
        self.prompt_len = prompt_len
        self.calls: list[int] = []

    def new_cache(self, capacity: int) -> dict:
        return {"length": 0, "capacity": capacity}

    def forward(self, tokens, cache, *, last_only=True, on_layer=None):
        self.calls.append(len(tokens))
        for done in range(1, 3):  # a two-layer model, as far as progress can tell
            if on_layer is not None:
                on_layer(done, 2)
        cache["length"] += len(tokens)
        assert cache["length"] <= cache["capacity"]
        index = max(cache["length"] - self.prompt_len, 0)
        logits = np.full((1, len(VOCAB)), -10.0, dtype=np.float32)
        logits[0, self.script[min(index, len(self.script) - 1)]] = 10.0
        return logits


class CharDecoder:
    def feed(self, token_id: int) -> str:
        return VOCAB[token_id]

    def flush(self) -> str:
        return ""


def run(script, params, prompt=(1, 2, 3), **kwargs):
    model = ScriptedModel(script, len(prompt))
    stats = GenerationStats()
    out = list(generate(model, list(prompt), CharDecoder(), params, stats=stats, **kwargs))
    return "".join(t.text for t in out), stats, model


def test_greedy_until_length():
    text, stats, _ = run([1, 2, 3, 1, 2, 3], SamplingParams(max_new_tokens=4))
    assert text == "abca"
    assert stats.finish_reason == "length"
    assert stats.generated_tokens == 4


def test_stop_token_ends_without_emitting_it():
    text, stats, _ = run([1, 2, 0, 3], SamplingParams(max_new_tokens=10, stop_token_ids=(0,)))
    assert text == "ab"
    assert stats.finish_reason == "stop"
    assert stats.token_ids == [1, 2]


def test_stop_string_spanning_tokens_is_cut():
    # "a b STOP" → the stop string " STOP" spans tokens; nothing of it may leak out.
    text, stats, _ = run([1, 5, 2, 5, 4, 3, 3], SamplingParams(max_new_tokens=10, stop_strings=(" STOP",)))
    assert text == "a b"
    assert stats.finish_reason == "stop"


def test_held_back_prefix_is_released_when_it_is_not_a_stop():
    f = StopStringFilter(["abc"])
    assert f.push("xa") == "x"
    assert f.push("b") == ""
    assert f.push("d") == "abd"
    assert not f.stopped


def test_prefill_is_chunked_with_progress():
    model = ScriptedModel([1], prompt_len=10)
    seen = []
    prefill(model, list(range(10)), model.new_cache(10), chunk_size=4, on_progress=lambda d, t: seen.append((d, t)))
    assert model.calls == [4, 4, 2]
    assert seen == [(2, 10), (4, 10), (6, 10), (8, 10), (9, 10), (10, 10)]


def test_cancel_during_prefill_and_decode():
    model = ScriptedModel([1], prompt_len=10)
    with pytest.raises(Cancelled):
        prefill(model, list(range(10)), model.new_cache(10), chunk_size=4, cancel=lambda: True)
    flag = {"n": 0}

    def cancel_after_three():
        flag["n"] += 1
        return flag["n"] > 3 + 3  # three checks in prefill (chunk, two layers), then three decode steps

    text, stats, _ = run([1, 2, 3, 1, 2], SamplingParams(max_new_tokens=10), cancel=cancel_after_three)
    assert text == "abc"
    assert stats.finish_reason == "cancelled"


def test_sampler_top_k_and_top_p_restrict_choices():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    top1 = Sampler(SamplingParams(temperature=1.0, top_k=1, seed=0))
    assert {top1(logits) for _ in range(50)} == {0}
    nucleus = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=0))
    draws = [nucleus(logits) for _ in range(400)]
    assert set(draws) == {0, 1}
    # Renormalised 0.5 : 0.3 → 62.5% zeros; 400 draws put it well inside 0.5–0.75.
    assert 0.5 < draws.count(0) / 400 < 0.75
    free = Sampler(SamplingParams(temperature=1.0, seed=1))
    assert set(free(logits) for _ in range(400)) == {0, 1, 2, 3}


def test_sampling_is_reproducible_with_a_seed():
    logits = np.random.default_rng(0).normal(size=50).astype(np.float32)
    a = Sampler(SamplingParams(temperature=0.8, top_p=0.9, seed=7))
    b = Sampler(SamplingParams(temperature=0.8, top_p=0.9, seed=7))
    assert [a(logits) for _ in range(20)] == [b(logits) for _ in range(20)]
