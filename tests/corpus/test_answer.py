"""The answer path: passages and their lexical index, rank fusion, the grounded
prompt's citations, the repetition guard, and Answerer.ask end to end with a real
model over a real cache."""

from __future__ import annotations

import numpy as np
import pytest

from engine.corpus.answer import (
    Source,
    Turn,
    attribute,
    citations,
    context_text,
    grounded_messages,
    recent_turns,
    says_not_found,
)
from engine.corpus.passages import PassageIndex, word_spans
from engine.generate import RepeatGuard, SamplingParams, generate


def test_word_spans_overlap_and_cover_every_word():
    text = " ".join(f"w{i}" for i in range(250))
    spans = word_spans(text, words=100, overlap=20)
    assert [text[s:e].split()[0] for s, e in spans] == ["w0", "w80", "w160"]
    assert text[spans[-1][0] : spans[-1][1]].split()[-1] == "w249"
    assert all(len(text[s:e].split()) == 100 for s, e in spans[:-1])
    with pytest.raises(ValueError):
        word_spans(text, words=10, overlap=10)


def test_bm25_ranks_the_passage_with_the_rare_words_first():
    filler = " ".join(["the river ran past the mill"] * 40)
    fact = "The psqlrc start-up file is skipped with the option --no-psqlrc in every session."
    index = PassageIndex([filler, filler + " " + fact + " " + filler], words=60, overlap=10)
    best = int(np.argmax(index.bm25("Which option skips the psqlrc file?")))
    assert "--no-psqlrc" in index.text(best) and index.passages[best].entry == 1


def test_a_passage_across_pages_is_cited_by_the_page_with_the_questions_rare_words():
    from engine.corpus.build import CorpusDocument
    from engine.corpus.retriever import _page_of

    first = "the harbour was quiet and the boats were in. " * 12
    second = "the lighthouse keeper on marrow island was elspeth. "
    text = first + second + "the end of the tale. " * 3
    document = CorpusDocument("d", text, pages=[(0, "i"), (len(first), "ii")])
    index = PassageIndex([text, "the harbour and the boats. " * 30], words=400, overlap=0)
    asked = index.weights("Who was the lighthouse keeper on Marrow Island?")
    assert asked["the"] < asked["lighthous"] and all(w >= 0 for w in asked.values())
    # Page i holds most of the characters; page ii the question's rare words.
    assert _page_of(document, 0, len(text), asked, index.analyse) == (1, "ii")
    assert _page_of(document, 0, len(first) - 5, asked, index.analyse) == (0, "i")
    assert _page_of(CorpusDocument("e", text), 0, 10, asked, index.analyse) == (None, None)


def test_a_question_in_two_parts_reads_each_parts_best_passage():
    from engine.corpus.build import CorpusDocument
    from engine.corpus.retriever import Retriever, question_parts

    assert question_parts("Who keeps the lighthouse?") == []
    assert question_parts("Who keeps the lighthouse on Skarvholm, and which boat brings the mail?") == [
        "Who keeps the lighthouse on Skarvholm", "which boat brings the mail?"]
    # The first part's words are in six passages, eight times each; the boat's in one
    # passage, once: BM25 of the whole question ranks the six first.
    filler = "ferries kept harbour timetables quietly through winter months. "  # 8 words
    block = "skarvholm lighthouse keeps " * 8 + filler * 20  # 24 + 160 words
    first = block * 6
    second = filler * 200 + "a mail boat sails. " + filler * 200
    documents = [CorpusDocument("a", first, title="Log"), CorpusDocument("b", second, title="Harbour")]
    question = "Who keeps the lighthouse on Skarvholm, and which boat brings the mail?"
    plain = Retriever()
    index = plain.passage_index(documents)
    top5 = [int(i) for i in np.argsort(-index.bm25(question), kind="stable")[:5]]
    boat = next(i for i in range(len(index)) if "mail boat" in index.text(i))
    assert boat not in top5  # BM25 of the whole question alone misses it
    sources = plain.choose_sources(documents, question)
    assert len(sources) == 6 and "mail boat" in sources[-1].text and sources[-1].title == "Harbour"
    assert [s.number for s in sources] == [1, 2, 3, 4, 5, 6]
    # One part, five passages; a part whose words no passage weighs adds none.
    assert len(plain.choose_sources(documents, "Who keeps the lighthouse on Skarvholm?")) == 5
    assert len(plain.choose_sources(documents[::-1], "Who keeps the lighthouse on Skarvholm, and what is the zyzzyva?")) == 5


def test_bm25_meets_a_words_other_forms_and_ignores_the_commonest_words():
    # The answer says "installation", the question "installing": stems meet.
    filler = [f"part {n} of the manual is about the {n} tools of the system. " * 6 for n in range(8)]
    fact = "the installation of packages with the tool needs root. " * 2
    texts = filler[:4] + [fact] + filler[4:]
    index = PassageIndex(texts, words=80, overlap=0)
    assert int(index.entry[int(np.argmax(index.bm25("Installing packages: what is needed?")))]) == 4
    plain = PassageIndex(texts, words=80, overlap=0, stem=False, floor=0.25)
    assert plain.bm25("installing")[4] == 0.0 and index.bm25("installing")[4] > 0.0
    # "the" is in every passage: no weight here, a quarter of the average with floor=0.25.
    assert not index.bm25("the").any() and plain.bm25("the").all()


def sources() -> list[Source]:
    return [
        Source(1, 0, 0, 50, "psql", "12", "Use -X or --no-psqlrc to skip reading the startup file psqlrc.", 0.9),
        Source(2, 0, 60, 90, "psql", "40", "The history file is ~/.psql_history unless HISTFILE is set.", 0.5),
    ]


def test_the_context_numbers_passages_with_their_document_and_page():
    text = context_text(sources())
    # The best passage (number 1) is read last, next to the question.
    assert text.startswith("Passage 2 (psql, page 40):\nThe history") and "\n\nPassage 1 (psql, page 12):\nUse -X" in text
    messages = grounded_messages("Which option skips psqlrc?", sources())
    assert messages[0]["role"] == "system" and "numbered passages" in messages[0]["content"]
    assert messages[1]["content"].endswith("Question: Which option skips psqlrc?")


def test_earlier_turns_come_before_the_passages_without_their_citations():
    history = [Turn("Old question?", "Old answer [2]."), Turn("Which file holds the history?", "It is ~/.psql_history [2].")]
    kept = recent_turns(history, budget=10, count_tokens=lambda text: len(text.split()))
    assert kept == [Turn("Which file holds the history?", "It is ~/.psql_history.")]  # the oldest dropped first
    messages = grounded_messages("Which variable changes it?", sources(), kept)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "Which file holds the history?"
    assert messages[2]["content"] == "It is ~/.psql_history."
    assert messages[3]["content"].startswith("Passages:") and messages[3]["content"].endswith("Which variable changes it?")
    assert recent_turns(history, budget=100, count_tokens=lambda text: len(text.split()))[0].answer == "Old answer."


def test_a_follow_up_is_retrieved_with_the_turn_before_it():
    from engine.corpus.retriever import retrieval_scores

    filler = [f"chapter {n}: the {w} of the town changed that year, and it went on. " * 4
              for n, w in enumerate(["mill", "bridge", "school", "harbour", "market", "church"])]
    fact = "Irene Adler left London with her husband Godfrey Norton the next morning. " * 2
    texts = filler[:3] + [fact] + filler[3:]
    index = PassageIndex(texts, words=60, overlap=0)
    follow_up = "Where did she go afterwards?"  # no word of it in the passage that answers it
    assert not retrieval_scores(index, follow_up)[index.entry == 3].any()
    history = [Turn("Who is Irene Adler?", "Irene Adler is a singer who outwits Sherlock Holmes [1].")]
    assert int(index.entry[int(np.argmax(retrieval_scores(index, follow_up, history)))]) == 3


def test_citations_are_checked_against_their_passages():
    answer = ("The option --no-psqlrc skips the startup file [1]. History goes to ~/.psql_history [1]. "
              "It also reads HISTFILE [2, 3].")
    found = [(c.number, c.supported) for c in citations(answer, sources())]
    assert found == [(1, True), (1, False), (2, True), (3, False)]


def test_an_answer_without_markers_is_attributed_by_shared_words():
    found = attribute("Use --no-psqlrc to skip the startup file. The history lives in ~/.psql_history. Goodbye.", sources())
    assert [(c.number, c.supported) for c in found] == [(1, True), (2, True), (1, False)]
    found = attribute("Zebras gallop quickly across savannas.", sources())
    assert [c.supported for c in found] == [False]


def test_not_found_is_recognised():
    assert says_not_found("Not found in these documents.")
    assert says_not_found("The passages do not mention a WebP terminal.")
    assert not says_not_found("Use --no-psqlrc [1].")


def test_an_answer_that_only_restates_the_question_is_recognised():
    from engine.corpus.answer import RESTATED, restates_question

    question = "Which psql meta-command lists the server configuration parameters set to non-default values?"
    # bench qa's answer, in the question's own words.
    assert restates_question("The psql meta-command lists the server configuration parameters that are set to "
                             "non-default values.", question)
    assert restates_question("", question) is False
    # A command, a number, a name with punctuation, a new word of four letters: an answer.
    assert not restates_question("The psql meta-command \\dconfig lists them.", question)
    assert not restates_question("It lists 12 parameters.", question)
    assert not restates_question("Use the server's configuration file.", question)
    assert not restates_question("No.", question)
    assert not restates_question("The arguments are `k` and `n`.", "Which arguments does it take?")
    # A question that offers a choice is answered with one of its own words.
    assert not restates_question("1000", "Is the default 1000 or 2000?")
    assert says_not_found(RESTATED)
    # A later turn sees the reader's words, not the note.
    from engine.corpus.answer import without_citations
    assert without_citations(f"Aunt Polly [1]\n\n{RESTATED}") == "Aunt Polly"


def test_the_repeat_guard_bans_completing_a_seen_ngram():
    guard = RepeatGuard(3)
    for token in [5, 6, 7, 5, 6]:
        guard.push(token)
    logits = np.zeros(10, dtype=np.float32)
    masked = guard.mask(logits)
    assert masked[7] == -np.inf and np.isfinite(np.delete(masked, 7)).all()
    assert np.isfinite(RepeatGuard(0).mask(logits)).all()


def test_the_soft_guard_penalises_carrying_on_a_run_by_its_length():
    from engine.generate import RUN_PENALTY_FROM, RUN_PENALTY_GROWTH

    assert RUN_PENALTY_FROM == 3
    guard = RepeatGuard(0, run_penalty=1.0)
    # 1 2 3 4 was followed by 9; now 1 2 3 4 again (a run of 4), and 3 4 once more
    # after 8 (a run of 2: free).
    for token in [1, 2, 3, 4, 9, 8, 3, 4, 5, 1, 2, 3, 4]:
        guard.push(token)
    masked = guard.mask(np.zeros(12, dtype=np.float32))
    assert masked[9] == pytest.approx(-RUN_PENALTY_GROWTH)  # run 4: 1.0 * 1.75 ** (4 - 3)
    assert masked[5] == 0.0  # followed "3 4" after 8: the run before it is "8 3 4" ≠ "2 3 4", so 2 long
    assert np.count_nonzero(masked) == 1
    # Off by default, and a short run costs nothing.
    plain = RepeatGuard(0)
    for token in [1, 2, 3, 4, 1, 2, 3, 4]:
        plain.push(token)
    assert not np.any(plain.mask(np.zeros(12, dtype=np.float32)))
    short = RepeatGuard(0, run_penalty=1.0)
    for token in [1, 2, 7, 1, 2]:
        short.push(token)
    assert not np.any(short.mask(np.zeros(12, dtype=np.float32)))


class LoopingModel:
    """Always prefers token (last + 1) % 4: greedy decoding loops 0 1 2 3 0 1 2 3 ..."""

    def new_cache(self, capacity):
        return {"last": 0}

    def forward(self, tokens, cache, *, last_only=True, on_layer=None):
        cache["last"] = tokens[-1]
        logits = np.zeros((1, 8), dtype=np.float32)
        logits[0, (tokens[-1] + 1) % 4] = 2.0
        logits[0, 4 + (tokens[-1] + 1) % 4] = 1.0  # the runner-up
        return logits


class Decoder:
    def feed(self, token_id):
        return str(token_id)

    def flush(self):
        return ""


def test_generation_with_the_guard_never_repeats_an_ngram():
    def run(n):
        out = [t.token_id for t in generate(LoopingModel(), [3], Decoder(), SamplingParams(max_new_tokens=24, no_repeat_ngram=n))]
        return out

    looping = run(0)
    assert looping[:8] == [0, 1, 2, 3, 0, 1, 2, 3]
    guarded = run(4)
    grams = [tuple(guarded[i : i + 4]) for i in range(len(guarded) - 3)]
    assert len(grams) == len(set(grams)) and len(guarded) == 24


def test_the_soft_guard_ends_a_loop_that_no_repeat_ngram_alone_lets_through():
    # LoopingModel's loop is 4 tokens long; a 6-gram ban lets it round once more than
    # a soft penalty growing from runs of 3 does, and greedy decoding then takes the
    # runner-up (4..7) instead.
    def run(**guards):
        return [t.token_id for t in generate(LoopingModel(), [3], Decoder(), SamplingParams(max_new_tokens=12, **guards))]

    banned_only = run(no_repeat_ngram=6)
    assert banned_only[:9] == [0, 1, 2, 3, 0, 1, 2, 3, 0]  # the sixth token of the second round is banned
    # "0 1 2" once more makes a run of 3: "3" loses 1.5 (2.0 → 0.5), the runner-up 7 wins.
    assert run(run_penalty=1.5)[:8] == [0, 1, 2, 3, 0, 1, 2, 7]


@pytest.mark.slow
def test_the_answerer_answers_from_numbered_passages_and_cites_them(tmp_path):
    from bench.niah import collect_answer
    from engine.corpus.answerer import Answerer
    from engine.paths import models_dir
    from engine.runtime import load_model
    from tests.corpus.test_cache import FACT, QUESTION, island_document

    name = "qwen2.5-coder-0.5b-instruct"
    if not (models_dir() / name).is_dir():
        pytest.skip(f"{name} is not installed (quire models install)")
    answerer = Answerer(load_model(name, threads=1), cache_root=tmp_path)
    document = island_document(sentences=60)
    # Not cached yet: the passages are prefilled.
    answer, evidence, stats = collect_answer(answerer.ask(QUESTION, [document], SamplingParams(max_new_tokens=40)))
    assert "Elspeth" in answer, answer
    assert stats.passages_from_cache == 0 and stats.memory_tokens == 0
    answerer.cache.build([document])
    # Cached, and asked to read from the cache: the same passages come from it.
    answerer.read_cached = True
    answer, evidence, stats = collect_answer(answerer.ask(QUESTION, [document], SamplingParams(max_new_tokens=40)))
    assert "Elspeth" in answer, answer
    assert stats.passages_from_cache == stats.passages_read == 5 and stats.memory_tokens > 500
    answerer.read_cached = False  # the default: prefilled
    answer, evidence, stats = collect_answer(answerer.ask(QUESTION, [document], SamplingParams(max_new_tokens=40)))
    assert stats.passages_from_cache == 0
    assert "Elspeth" in answer, answer
    assert [e.number for e in evidence] == list(range(1, len(evidence) + 1))
    holding = [e for e in evidence if FACT in e.text]
    assert holding and holding[0].page_label == "2"
    for e in evidence:
        assert document.text[e.char_start : e.char_end] == e.text
    assert stats.passages_read == len(evidence) and stats.context_tokens > 0 and not stats.not_found
    assert stats.retrieval_seconds <= stats.time_to_first_token


@pytest.mark.slow
def test_passages_read_from_the_cache_match_prefilling_them(tmp_path):
    """The reference is dense attention: the shared prefix and a segment's tokens
    prefilled as one prompt, then a question. Reading the same tokens' keys and values
    from the corpus cache (int8, keys re-rotated) must give the question nearly the
    same next-token distribution."""
    import torch

    from engine.corpus.answerer import Answerer
    from engine.corpus.settings import CacheSettings
    from engine.generate import prefill
    from tests.corpus.test_cache import island_document

    model = _load_small()
    answerer = Answerer(model, cache_root=tmp_path, cache_settings=CacheSettings(segment_tokens=256, block_size=32))
    document = island_document(sentences=30)
    answerer.cache.build([document])
    manifest = answerer.cache.manifests.load(document.content_key)
    ids = model.tokenizer.encode(document.text)
    assert manifest.tokens == len(ids) and len(manifest.segments) > 1
    # Tokens 100..400 cross a segment edge (256): two segments are read.
    first, end = 100, 400
    question = model.tokenizer.encode(" Who kept the lighthouse?")
    M, layers = model.model, model.config.num_hidden_layers

    def after(fill) -> np.ndarray:
        cache = M.new_cache(len(answerer.prefix_ids) + end + len(question) + 1)
        prefill(M, answerer.prefix_ids, cache)
        fill(cache)
        return np.asarray(prefill(M, question, cache), dtype=np.float64)

    # Reference: each segment's tokens prefilled after the prefix, as the build did,
    # so both sides see the same context for every token; here the first segment's
    # tokens from `first` and the second's up to `end`, back to back.
    stored = answerer.cache.stored_kv(manifest, first, end, layers)
    got = after(lambda cache: answerer.cache.memory.append_stored(M, cache, stored))

    def dense(cache):
        # The same tokens prefilled, but each segment's part computed where the build
        # computed it (after the prefix and that segment's earlier tokens), then the
        # keys and values placed like the stored ones: exact-precision keys.
        for ref in manifest.segments:
            lo, hi = max(first, ref.start), min(end, ref.start + ref.tokens)
            if lo >= hi:
                continue
            scratch = M.new_cache(len(answerer.prefix_ids) + ref.tokens)
            prefill(M, answerer.prefix_ids + ids[ref.start : hi], scratch)
            at = len(answerer.prefix_ids) + (lo - ref.start)
            n = hi - lo
            for layer in range(layers):
                cache.keys[layer][:, :, cache.length : cache.length + n] = _rerotate(
                    M, layer, scratch.keys[layer][:, :, at : at + n], at, cache.length)
                cache.values[layer][:, :, cache.length : cache.length + n] = scratch.values[layer][:, :, at : at + n]
            cache.advance(n)

    want = after(dense)
    p, q = _softmax(want), _softmax(got)
    assert int(np.argmax(got)) == int(np.argmax(want))
    assert float(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)))) < 0.05  # KL, nats
    # And the keys were really moved: placed without re-rotation they read differently.
    unrotated = after(lambda cache: _place_unrotated(cache, stored, torch))
    assert float(np.abs(unrotated - want).max()) > 10 * float(np.abs(got - want).max())


def _load_small():
    from engine.paths import models_dir
    from engine.runtime import load_model
    from tests.corpus.test_cache import MODEL

    if not (models_dir() / MODEL).is_dir():
        pytest.skip(f"{MODEL} is not installed (quire models install)")
    return load_model(MODEL, threads=1)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _rerotate(M, layer, keys, old: int, new: int):
    """Keys (1, H, T, D) rotated for positions old.. moved to positions new..: RoPE
    composes, so rotate by the difference."""
    from engine.backends.torch.layers import apply_rope

    rotary = M.rotary_for(layer)
    T = keys.shape[2]
    if new >= old:
        shift = rotary.rotations(new - old, 1).expand(T, -1, -1)
    else:
        shift = rotary.rotations(old - new, 1).conj().expand(T, -1, -1)
    return apply_rope(keys.transpose(1, 2), shift).transpose(1, 2).to(keys.dtype)


def _place_unrotated(cache, stored, torch) -> None:
    start, T = cache.length, stored[0][0].shape[1]
    for layer, (k, v) in enumerate(stored):
        cache.keys[layer][:, :, start : start + T] = torch.from_numpy(k).unsqueeze(0).to(cache.keys[layer].dtype)
        cache.values[layer][:, :, start : start + T] = torch.from_numpy(v).unsqueeze(0).to(cache.values[layer].dtype)
    cache.advance(T)


def test_the_names_a_question_asks_about():
    from engine.corpus.answer import question_names

    assert question_names("How do I move a matrix to the GPU with gpuArray in Octave?") == ["GPU", "gpuArray", "Octave"]
    assert question_names("What kernel do I need for the os.RWF_APPEND flag?") == ["os.RWF_APPEND"]
    # The first word of a question or sentence is capitalised anyway; short words are not names.
    assert question_names("Which flag? Where is it set in R.") == []


def test_a_name_the_documents_never_mention_is_missing():
    from engine.corpus.answer import missing_names, not_mentioned, says_not_found

    texts = ["octave reads csv files with csvread. the sha family: sha-256. and md5.", "a second manual."]
    assert missing_names("Which Octave function reads an Apache Parquet file?", texts) == ["Apache", "Parquet"]
    # Found whole or by its parts, ignoring case.
    assert missing_names("Does Octave hash with SHA-family functions like MD5?", texts) == []
    assert missing_names("Can csvRead read it?", texts) == []
    answer = not_mentioned(["Parquet"])
    assert says_not_found(answer) and "“Parquet”" in answer
    # Where only some of the scope's documents were asked, the answer names them.
    answer = not_mentioned(["Parquet"], ["GNU Octave manual"])
    assert says_not_found(answer) and "(GNU Octave manual) never mention “Parquet”" in answer


@pytest.mark.slow
def test_a_question_about_an_unmentioned_name_says_so_with_the_closest_passages(tmp_path):
    from bench.niah import collect_answer
    from engine.corpus.answerer import Answerer
    from tests.corpus.test_cache import island_document

    answerer = Answerer(_load_small(), cache_root=tmp_path)
    document = island_document(sentences=40)
    answer, evidence, stats = collect_answer(answerer.ask("Who kept the lighthouse on Marrow Island for the Admiralty?", [document]))
    assert answer.startswith("Not found in these documents.") and "“Admiralty”" in answer
    assert stats.not_found and stats.passages_read == 0 and stats.generated_tokens == 0
    assert evidence and not any(e.cited for e in evidence)
    assert any("Marrow Island" in e.text for e in evidence)


@pytest.mark.slow
def test_a_name_mentioned_only_in_a_document_the_question_does_not_match_is_still_not_found(tmp_path):
    """Over a library, some other book names the thing in passing ("The Admiralty
    printed its charts in London."): the question is asked of the documents its
    passages come from, which never mention it (bench qa: gnuplot's WebP, R's Excel)."""
    import random

    from bench.niah import collect_answer
    from engine.corpus.answerer import Answerer
    from engine.corpus.build import CorpusDocument
    from tests.corpus.test_cache import ENDINGS, OBJECTS, SUBJECTS, VERBS

    rng = random.Random(1)
    keepers = " ".join(f"In {1800 + i} the lighthouse on Marrow Island was kept by a keeper of the parish, "
                       "who logged every ship." for i in range(60))
    filler = " ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
                      for _ in range(600))
    almanac = filler.replace("every morning.", "every morning. The Admiralty printed its charts in London.", 1)
    assert almanac.count("Admiralty") == 1
    documents = [CorpusDocument("keepers", keepers, None, "Marrow Island keepers"),
                 CorpusDocument("almanac", almanac, None, "Harbour almanac")]
    answerer = Answerer(_load_small(), cache_root=tmp_path)
    question = "Who kept the lighthouse on Marrow Island for the Admiralty?"
    assert {s.entry for s in answerer.retriever.choose_sources(documents, question)} == {0}
    answer, evidence, stats = collect_answer(answerer.ask(question, documents))
    assert answer.startswith("Not found in these documents.")
    assert "(Marrow Island keepers) never mention “Admiralty”" in answer
    assert stats.not_found and stats.generated_tokens == 0
    # Asked of the almanac as well, the name is there and the reader answers.
    answer, _, stats = collect_answer(answerer.ask("Who printed charts in London for the Admiralty?", documents))
    assert stats.finish_reason != "not_mentioned" and stats.generated_tokens > 0
    assert "never mention" not in answer


@pytest.mark.slow
def test_an_answer_that_restates_the_question_says_not_found_and_cites_nothing(tmp_path, monkeypatch):
    from bench.niah import collect_answer
    from engine.corpus.answerer import Answerer
    from engine.corpus.answer import RESTATED
    from engine.generate import Token
    from tests.corpus.test_cache import QUESTION, island_document

    answerer = Answerer(_load_small(), cache_root=tmp_path)
    echo = "The lighthouse keeper on Marrow Island was the keeper."

    stopped = []

    def restating(messages, params, cancel=None, stats=None):
        yield from (Token(0, piece) for piece in echo.replace(" ", "\n ").split("\n"))
        stats.finish_reason = "cancelled" if stopped else "stop"

    monkeypatch.setattr(answerer.reader, "chat", restating)
    answer, evidence, stats = collect_answer(answerer.ask(QUESTION, [island_document(sentences=40)]))
    assert answer.endswith(RESTATED) and stats.not_found
    assert evidence and not any(e.cited for e in evidence)
    # Stopped by the user part way: left as it was stopped.
    stopped.append(True)
    answer, evidence, stats = collect_answer(answerer.ask(QUESTION, [island_document(sentences=40)]))
    assert answer == echo and not stats.not_found


@pytest.mark.slow
def test_an_answer_ended_by_the_loop_stop_is_marked_cut_short(tmp_path, monkeypatch):
    from bench.niah import collect_answer
    from engine.corpus.answerer import ANSWER_LOOP_WORDS, CUT_SHORT, Answerer
    from engine.generate import LoopStop, Token
    from tests.corpus.test_cache import QUESTION, island_document

    answerer = Answerer(_load_small(), cache_root=tmp_path)
    looping = ("The keeper of the Marrow Island light was Hale. The keeper of the Marrow Island light kept the log. "
               "The keeper of the Marrow Island light ")
    asked = []

    def reader(messages, params, cancel=None, stats=None):
        # The reader decodes with the loop stop on: what it gives is what LoopStop lets through.
        asked.append(params.loop_words)
        stop = LoopStop(params.loop_words)
        for word in looping.split(" "):
            text = stop.push(word + " ")
            if text:
                yield Token(0, text)
            if stop.stopped:
                break
        stats.finish_reason = "repeat" if stop.stopped else "stop"

    monkeypatch.setattr(answerer.reader, "chat", reader)
    answer, _, stats = collect_answer(answerer.ask(QUESTION, [island_document(sentences=40)]))
    assert asked == [ANSWER_LOOP_WORDS]
    assert stats.finish_reason == "repeat"
    # After the words given out (the last ends with a space), "…" with no second space.
    assert answer.endswith(" " + CUT_SHORT.lstrip()) and not answer.endswith("  " + CUT_SHORT.lstrip())
    assert answer.count("The keeper of the Marrow Island light") == 2
