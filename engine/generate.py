"""The generation loop, shared by every backend.

A backend model only has to offer `new_cache(capacity)` and
`forward(tokens, cache, last_only=True)` returning logits that numpy can read;
prefill chunking, progress, sampling (greedy, temperature, top-k, top-p), stop
tokens, stop strings, cancel and timing all live here, once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engine.errors import Cancelled

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


class BackendModel(Protocol):
    def new_cache(self, capacity: int) -> object: ...

    def forward(
        self,
        tokens: Sequence[int],
        cache: object,
        *,
        last_only: bool = True,
        on_layer: Callable[[int, int], None] | None = None,
    ) -> object: ...


class TokenDecoder(Protocol):
    def feed(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # The repetition guard: never generate an n-gram of this many tokens a second
    # time (0: off). A loop ("She is married to Norton. She is married to ...")
    # repeats every n-gram of its period, so it is cut off after its first round.
    no_repeat_ngram: int = 0
    # The soft repetition guard (0: off): a token that would carry on a run of at
    # least RUN_PENALTY_FROM tokens already generated in that order loses
    # run_penalty * RUN_PENALTY_GROWTH ** (run - RUN_PENALTY_FROM) of its logit, so a
    # loop that changes a word each round ("round about there", "round around
    # there", ...) and slips past no_repeat_ngram still ends. The "DRY" sampler of
    # text-generation-webui and llama.cpp works this way. Local models only: a remote
    # reader's server decodes with its own settings.
    run_penalty: float = 0.0
    # The loop stop (0: off): the text ends where it would say the same run of this
    # many words a LOOP_TIMES-th time (`LoopStop`). The guards above make a loop less
    # likely; a 0.5B reader still wrote a run a third time with a word changed around
    # it ("rounds ... to the nearest integer", three times), and banning the run's
    # last token made it misspell its way round the ban. Stopping ends the answer
    # where it would start over. A remote reader's text is stopped alike (engine/reader.py).
    loop_words: int = 0


@dataclass
class Token:
    """One generated token and the text it completed (may be empty mid-character)."""

    token_id: int
    text: str


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0
    finish_reason: str = ""  # "stop", "length", "repeat" (LoopStop), "cancelled"
    token_ids: list[int] = field(default_factory=list)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.generated_tokens - 1  # the first token comes out of prefill
        return steps / self.decode_seconds if self.decode_seconds and steps > 0 else 0.0


def prefill(
    model: BackendModel,
    tokens: Sequence[int],
    cache: object,
    *,
    chunk_size: int = 8192,
    on_progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> np.ndarray:
    """Run the prompt through the model in chunks; returns the last token's logits (V,).

    Chunks are large because a chunk that follows another needs a masked attention
    pass, which torch's fused kernel runs slower than a causal one (8K prompts: 4K
    chunks measured 15–25% slower than one pass; a CUDA GPU still uses it, the CPU's
    blocked attention serves both alike). Progress and cancel still come after every
    layer, so a long chunk stays responsive.
    """
    if not tokens:
        raise ValueError("cannot prefill an empty prompt")
    logits = None
    total = len(tokens)
    for start in range(0, total, chunk_size):
        if cancel is not None and cancel():
            raise Cancelled("prefill cancelled")
        chunk = tokens[start : start + chunk_size]

        def on_layer(done: int, layers: int, start: int = start, size: int = len(chunk)) -> None:
            if cancel is not None and cancel():
                raise Cancelled("prefill cancelled")
            if on_progress is not None and done < layers:
                on_progress(start + size * done // layers, total)

        logits = model.forward(chunk, cache, on_layer=on_layer)
        if on_progress is not None:
            on_progress(start + len(chunk), total)
    return np.asarray(logits)[-1]


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature <= 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / p.temperature
        candidates = np.arange(scaled.shape[0])
        if p.top_k and p.top_k < scaled.shape[0]:
            candidates = np.argpartition(scaled, -p.top_k)[-p.top_k :]
        order = candidates[np.argsort(scaled[candidates])[::-1]]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])


# The soft guard's shape (SamplingParams.run_penalty): runs shorter than this are
# free (a name or a phrase said twice), and each token longer multiplies the penalty.
RUN_PENALTY_FROM = 3
RUN_PENALTY_GROWTH = 1.75
# Runs are measured back at most this far (the penalty is past any logit by then).
_RUN_LONGEST = 48


class RepeatGuard:
    """The answer's two repetition guards over the tokens generated so far.

    Hard (`n`): bans the tokens that would complete an n-gram already generated (the
    "no repeat n-gram" rule of beam-search decoders), from a table of each (n-1)-gram
    seen to the tokens that followed it: O(1) a step.

    Soft (`run_penalty`): for each earlier place where the last token was generated,
    the run of tokens before it that matches the run before the last one is measured;
    the token that followed that place is penalised by the run's length (see
    SamplingParams.run_penalty). The places come from a table of token → positions,
    so a step costs the number of earlier places of the last token.
    """

    def __init__(self, n: int, run_penalty: float = 0.0) -> None:
        self.n = n
        self.run_penalty = run_penalty
        self.tokens: list[int] = []
        self.followers: dict[tuple[int, ...], set[int]] = {}
        self.places: dict[int, list[int]] = {}

    def mask(self, logits: np.ndarray) -> np.ndarray:
        penalties = self._run_penalties()
        banned = None
        if self.n > 0 and len(self.tokens) >= self.n - 1:
            banned = self.followers.get(tuple(self.tokens[len(self.tokens) - self.n + 1 :]))
        if not banned and not penalties:
            return logits
        logits = np.array(logits, dtype=np.float32, copy=True)
        for token, penalty in penalties.items():
            logits[token] -= penalty
        if banned:
            logits[list(banned)] = -np.inf
        return logits

    def _run_penalties(self) -> dict[int, float]:
        if self.run_penalty <= 0 or len(self.tokens) < RUN_PENALTY_FROM:
            return {}
        tokens, last = self.tokens, len(self.tokens) - 1
        penalties: dict[int, float] = {}
        for place in self.places.get(tokens[last], ()):
            if place >= last:
                continue
            run = 1
            while run < _RUN_LONGEST and run <= place and tokens[place - run] == tokens[last - run]:
                run += 1
            if run >= RUN_PENALTY_FROM:
                follower = tokens[place + 1]
                penalty = self.run_penalty * RUN_PENALTY_GROWTH ** (run - RUN_PENALTY_FROM)
                penalties[follower] = max(penalties.get(follower, 0.0), penalty)
        return penalties

    def push(self, token: int) -> None:
        if self.n <= 0 and self.run_penalty <= 0:
            return
        self.tokens.append(token)
        if self.run_penalty > 0:
            self.places.setdefault(token, []).append(len(self.tokens) - 1)
        if self.n > 0 and len(self.tokens) >= self.n:
            key = tuple(self.tokens[-self.n : -1])
            self.followers.setdefault(key, set()).add(token)


# A run of SamplingParams.loop_words words may be said this many times less one.
LOOP_TIMES = 3
_WORD = re.compile(r"\w+")


class LoopStop:
    """Streams text until it would say the same run of `words` words (lowercased,
    `\\w+`) a `times`-th time, and ends it before that run's first word.

    As StopStringFilter holds back a possible stop string, this holds back the words
    that could begin a run already said `times` - 1 times, so nothing of the run's
    last round is given out; other text passes at once. `stopped` says it ended.
    """

    def __init__(self, words: int, times: int = LOOP_TIMES) -> None:
        self.n = words
        self.times = times
        self.text = ""
        self.given = 0  # characters of `text` given out
        self.words: list[tuple[str, int, int]] = []  # complete words: (lowercase, start, end)
        self.counts: dict[tuple[str, ...], int] = {}
        # For each beginning of a run said times - 1 times, the words that carry it on.
        self.next_words: dict[tuple[str, ...], set[str]] = {}
        self.stopped = False

    def push(self, text: str) -> str:
        if self.n <= 0:
            return text
        if self.stopped:
            return ""
        self.text += text
        partial = None
        for match in _WORD.finditer(self.text, self.words[-1][2] if self.words else 0):
            if match.end() == len(self.text):  # the word may go on in the next piece
                partial = match
                break
            self.words.append((match.group().lower(), match.start(), match.end()))
            cut = self._count()
            if cut is not None:
                self.stopped = True
                out = self.text[self.given : max(cut, self.given)].rstrip()
                self.given = len(self.text)
                return out
        hold = self._hold(partial)
        out = self.text[self.given : hold]
        self.given = max(self.given, hold)
        return out

    def flush(self) -> str:
        """The text held back: the end of a text that stopped for another reason."""
        if self.stopped:
            return ""
        out = self.text[self.given :]
        self.given = len(self.text)
        return out

    def _count(self) -> int | None:
        """Counts the run the newest word ends; where the text must end, if it must."""
        if len(self.words) < self.n:
            return None
        run = tuple(w for w, _, _ in self.words[-self.n :])
        count = self.counts[run] = self.counts.get(run, 0) + 1
        if count >= self.times:
            return self.words[-self.n][1]
        if count == self.times - 1:
            for k in range(self.n):
                self.next_words.setdefault(run[:k], set()).add(run[k])
        return None

    def _hold(self, partial: re.Match | None) -> int:
        """Where the text that may be given out ends: before the longest tail of
        words (and the word in progress) that could begin a run's last round."""
        if not self.next_words:
            return len(self.text)
        ahead = partial.group().lower() if partial is not None else None
        for k in range(min(self.n - 1, len(self.words)), -1, -1):
            tail = self.words[len(self.words) - k :]  # only the last k words, not all said
            following = self.next_words.get(tuple(w for w, _, _ in tail))
            if not following:
                continue
            if ahead is None:
                if k:
                    return tail[0][1]
            elif any(w.startswith(ahead) for w in following):
                return tail[0][1] if k else partial.start()
        return len(self.text)


class StopStringFilter:
    """Streams text but holds back any tail that could be the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        for stop in self.stops:
            at = self.pending.find(stop)
            if at >= 0:
                self.stopped = True
                out, self.pending = self.pending[:at], ""
                return out
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def generate(
    model: BackendModel,
    prompt_tokens: Sequence[int],
    decoder: TokenDecoder,
    params: SamplingParams,
    *,
    cache: object | None = None,
    chunk_size: int = 8192,
    on_progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    stats: GenerationStats | None = None,
    logits: np.ndarray | None = None,
) -> Iterator[Token]:
    """Yield tokens as they are generated. Fills `stats` (if given) as it goes.

    `logits` (the last prompt token's) says the caller has already prefilled
    `prompt_tokens` into `cache` (the corpus engine, which places passages read from
    the corpus cache between the prompt's pieces): decoding starts from them.

    Cancel is checked between prefill chunks and before every decode step; a
    cancelled generation ends quietly with finish_reason "cancelled".
    """
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_tokens)
    if cache is None:
        cache = model.new_cache(len(prompt_tokens) + params.max_new_tokens)
    started = time.perf_counter()
    if logits is None:
        try:
            logits = prefill(model, prompt_tokens, cache, chunk_size=chunk_size, on_progress=on_progress, cancel=cancel)
        except Cancelled:
            stats.finish_reason = "cancelled"
            return
    stats.prefill_seconds = time.perf_counter() - started
    decode_started = time.perf_counter()
    sequence = _Sequence(params, decoder, stats)
    for step in range(params.max_new_tokens):
        if cancel is not None and cancel():
            stats.finish_reason = "cancelled"
            break
        token = sequence.step(logits)
        if step == 0:
            stats.time_to_first_token = time.perf_counter() - started
            decode_started = time.perf_counter()
        if token is not None:
            yield token
        if sequence.done:
            break
        logits = np.asarray(model.forward([sequence.last], cache))[-1]
    stats.decode_seconds = time.perf_counter() - decode_started
    tail = sequence.tail()
    if tail:
        yield Token(-1, tail)


class _Sequence:
    """One sequence's decoding: sampling, the repetition guards, stop tokens, stop
    strings and the text; `generate` runs one, `generate_batch` several at once."""

    def __init__(self, params: SamplingParams, decoder: TokenDecoder, stats: GenerationStats) -> None:
        self.params = params
        self.decoder = decoder
        self.stats = stats
        self.sampler = Sampler(params)
        self.guard = RepeatGuard(params.no_repeat_ngram, params.run_penalty)
        self.stop_filter = StopStringFilter(params.stop_strings)
        self.loop_stop = LoopStop(params.loop_words)
        self.stop_ids = set(params.stop_token_ids)
        self.done = params.max_new_tokens <= 0
        self.last = -1
        stats.finish_reason = "length"

    def step(self, logits: np.ndarray) -> Token | None:
        """Choose the next token from `logits`; the Token to give out, if any. Sets
        `done` at a stop token, a stop string or the length limit."""
        token = self.sampler(self.guard.mask(logits))
        self.guard.push(token)
        self.last = token
        if token in self.stop_ids:
            self.stats.finish_reason = "stop"
            self.done = True
            held = self.loop_stop.flush()  # words held back for a run that did not come
            return Token(-1, held) if held else None
        self.stats.generated_tokens += 1
        self.stats.token_ids.append(token)
        text = self.loop_stop.push(self.stop_filter.push(self.decoder.feed(token)))
        if self.loop_stop.stopped:
            self.stats.finish_reason = "repeat"
        elif self.stop_filter.stopped:
            self.stats.finish_reason = "stop"
            text += self.loop_stop.flush()
        stopped = self.stop_filter.stopped or self.loop_stop.stopped
        self.done = stopped or self.stats.generated_tokens >= self.params.max_new_tokens
        return Token(token, text) if text or not stopped else None

    def tail(self) -> str:
        """The text held back at the end (none after a stop)."""
        if self.stats.finish_reason in ("stop", "repeat"):
            return ""
        text = self.loop_stop.push(self.stop_filter.push(self.decoder.flush()) + self.stop_filter.flush())
        return text if self.loop_stop.stopped else text + self.loop_stop.flush()


def generate_batch(
    model: BackendModel,
    prompts: Sequence[Sequence[int]],
    decoders: Sequence[TokenDecoder],
    params: SamplingParams,
    *,
    cancel: CancelCheck | None = None,
    stats: Sequence[GenerationStats] | None = None,
) -> list[str]:
    """The text generated for each prompt, decoded together where the model can
    (`batch_cache`, the torch backend): each prompt is prefilled on its own, then one
    forward pass a step takes the next token of every sequence not yet finished.
    Decode is bound by reading the weights, so this is several times the throughput
    of one sequence at a time (engine/backends/torch/kv_cache.py `BatchKVCache`).
    Elsewhere, or for one prompt, the prompts run one after another. Greedy
    decoding gives each sequence the tokens `generate` gives it, up to the rounding
    of a batched matmul. Cancelled: the text so far of each, finish_reason
    "cancelled" on those not finished."""
    stats = list(stats) if stats is not None else [GenerationStats() for _ in prompts]
    texts = [""] * len(prompts)
    if len(prompts) < 2 or not hasattr(model, "batch_cache"):
        for i, prompt in enumerate(prompts):
            if cancel is not None and cancel():
                stats[i].finish_reason = "cancelled"
                continue
            texts[i] = "".join(t.text for t in generate(model, prompt, decoders[i], params, cancel=cancel, stats=stats[i]))
        return texts
    started = time.perf_counter()
    caches, logits = [], []
    for i, prompt in enumerate(prompts):
        stats[i].prompt_tokens = len(prompt)
        cache = model.new_cache(len(prompt))
        try:
            logits.append(prefill(model, prompt, cache, cancel=cancel))
        except Cancelled:
            for s in stats:
                s.finish_reason = "cancelled"
            return texts
        caches.append(cache)
        stats[i].prefill_seconds = time.perf_counter() - started
    batch = model.batch_cache(caches, params.max_new_tokens)
    del caches
    sequences = [_Sequence(params, decoders[i], stats[i]) for i in range(len(prompts))]
    active = [i for i in range(len(prompts)) if not sequences[i].done]
    rows = list(logits)
    decode_started = time.perf_counter()
    first = True
    while active:
        if cancel is not None and cancel():
            for i in active:
                stats[i].finish_reason = "cancelled"
            break
        going = []
        for row, i in enumerate(active):
            token = sequences[i].step(rows[row])
            if token is not None:
                texts[i] += token.text
            if not sequences[i].done:
                going.append(row)
        if first:
            for i in active:
                stats[i].time_to_first_token = time.perf_counter() - started
            first = False
        if not going:
            break
        if len(going) < len(active):
            batch.keep(going)
            active = [active[row] for row in going]
        rows = list(np.asarray(model.forward([sequences[i].last for i in active], batch, last_only=False)))
    seconds = time.perf_counter() - decode_started
    for i, sequence in enumerate(sequences):
        stats[i].decode_seconds = seconds
        texts[i] += sequence.tail()
    return texts
