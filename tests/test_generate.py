"""The backend-agnostic generation loop, driven by a scripted model."""

from __future__ import annotations

import numpy as np
import pytest

from bench.qa_data import has_loop
from engine.errors import Cancelled
from engine.generate import (
    GenerationStats,
    LoopStop,
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


def _loop_stop(pieces, words=6):
    stop = LoopStop(words)
    given = [stop.push(piece) for piece in pieces]
    return given, stop


def _said_twice_at_most(text):
    """A 6-word run said twice, none three times (bench qa's loop detector)."""
    return has_loop(text, times=2) and not has_loop(text)


LOOPING = ("Octave rounds the result to the nearest integer. Python rounds the result to the nearest "
           "integer too. Then it rounds the result to the nearest integer again, and so on.")


def test_loop_stop_ends_before_a_runs_third_round():
    # Fed three characters at a time, as tokens come: the text given out is the text
    # up to the third "rounds the result to the nearest integer", never past it.
    given, stop = _loop_stop([LOOPING[i : i + 3] for i in range(0, len(LOOPING), 3)])
    text = "".join(given)
    assert stop.stopped
    assert text.rstrip() == "Octave rounds the result to the nearest integer. Python rounds the result to the nearest integer too. Then it"
    assert LOOPING.startswith(text)
    assert _said_twice_at_most(text)
    assert stop.push("more") == "" and stop.flush() == ""


def test_loop_stop_passes_a_run_said_twice_and_releases_what_it_held():
    text = "a b c d e f. a b c d e f. a b c d e g. done"
    pieces = [text[i : i + 2] for i in range(0, len(text), 2)]
    given, stop = _loop_stop(pieces)
    assert not stop.stopped
    assert "".join(given) + stop.flush() == text
    # "a b c d e" could have begun the third round: held until "g" broke the run.
    before_g = next(i for i, piece in enumerate(pieces) if "g" in piece)
    assert "".join(given[:before_g]) == "a b c d e f. a b c d e f. "
    assert given[before_g] == "a b c d e g."


def test_loop_stop_holds_nothing_back_without_a_repeated_run():
    # Text with no run said twice streams as it comes (the answer's first token is not delayed).
    pieces = ["One", " two", " three", " four", " five", " six", " seven."]
    given, stop = _loop_stop(pieces)
    assert given == pieces and stop.flush() == ""
    assert LoopStop(0).push("a a a a a a a a a a a a a a a a a a a a") == "a a a a a a a a a a a a a a a a a a a a"


def test_generate_ends_a_loop_with_finish_reason_repeat():
    # "a b c" over and over as single-letter words with spaces: a run of 6 words said a
    # third time ends the answer; the guards are off, so only the loop stop ends it.
    script = [1, 5, 2, 5, 3, 5] * 10
    text, stats, _ = run(script, SamplingParams(max_new_tokens=60, loop_words=6))
    assert stats.finish_reason == "repeat"
    assert _said_twice_at_most(text)
    assert text.rstrip() == "a b c a b c a b c"[: len(text.rstrip())] and len(text.split()) < 20
    plain, plain_stats, _ = run(script, SamplingParams(max_new_tokens=60))
    assert plain_stats.finish_reason == "length" and has_loop(plain, times=4)


def test_generate_releases_held_words_at_the_stop_token():
    # "a b c a b c a b c a b" then the end: the held "a b" (the start of a possible
    # third round of "a b c a b c") is the answer's end, not lost.
    script = [1, 5, 2, 5, 3, 5] * 3 + [1, 5, 2, 0]
    text, stats, _ = run(script, SamplingParams(max_new_tokens=60, loop_words=6, stop_token_ids=(0,)))
    assert stats.finish_reason == "stop"
    assert text == "a b c a b c a b c a b"
