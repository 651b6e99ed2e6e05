"""`quire bench qa`: real questions about real documents, answered by Quire and by
the retrieval-augmented prompts people use today, on the same model and text, in
the same run. This is the benchmark that decides how Quire answers
(docs/BENCHMARKS.md, "Answers on real documents (issue 23)"); `quire bench niah` is the regression check.

Methods:
- "quire": Answerer.ask, the default answer path (the five 200-word passages that
  Quire's BM25 (stemmed, common terms unweighted: engine/corpus/passages.py) ranks
  best over the whole scope, read as a numbered context with each passage's document
  and page; citations attributed after the answer).
- "quire-cache": the same passages, their keys and values read from the corpus cache
  instead of prefilled (Answerer.read_cached), where the documents are cached.
- "bm25": the way GPT4All's LocalDocs works: the top 5 chunks of 200 words by plain
  BM25 (lowercase words, rank-bm25's defaults) in the prompt before the question.
- "embed": the way AnythingLLM works: the top 4 chunks of 150 words by cosine
  similarity of all-MiniLM-L6-v2 sentence embeddings, in the prompt.
- "dense": the scope's whole text in the prompt, where it fits `dense_limit` tokens.
Follow-ups (resources/bench/qa/followups.jsonl; each names the question asked before
it): each method first answers that question, then the follow-up with the first
question and its own answer as the conversation so far. "quire" retrieves with the
turn before and shows it to the reader (Answerer.ask's history); "bm25" and "embed"
show it to the reader and retrieve for the follow-up alone, as the chat apps do;
"quire-alone" asks the follow-up with no conversation (Quire before multi-turn).

Scopes: "own" (the documents the question is about) and "library" (every document).

Per answer: the score (qa_data.score_answer), whether the sentences holding the
answer were among the passages the method read (evidence hit; for Quire, the passages
of its numbered context), whether the answer loops, the time to the first token, the
total time, and the tokens the reader's prompt held.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from bench.niah import collect_answer
from bench.qa_data import KINDS, QAQuestion, evidence_found, has_loop, score_answer
from engine.corpus.answer import Turn, says_not_found
from engine.corpus.build import CorpusDocument
from engine.corpus.answerer import ANSWER_LOOP_WORDS, ANSWER_NO_REPEAT_NGRAM, ANSWER_RUN_PENALTY, Answerer
from engine.corpus.passages import PassageIndex
from engine.generate import GenerationStats, SamplingParams

log = logging.getLogger(__name__)

METHODS = ("quire", "quire-alone", "quire-cache", "bm25", "embed", "dense")
SCOPES = ("own", "library")

# The baselines' chunking and depth, after the apps they stand for: GPT4All's
# LocalDocs puts a few BM25/embedding snippets before the question; the issue's own
# first measurement used 5 chunks of 200 words. AnythingLLM splits at about 1,000
# characters (~150 words) and puts the top 4 in its prompt.
BM25_WORDS, BM25_TOP = 200, 5
EMBED_WORDS, EMBED_TOP = 150, 4
CHUNK_OVERLAP = 20

# The baselines' prompts, in the spirit of the apps' own (not their text).
BM25_SYSTEM = "You are a helpful assistant. Use the excerpts from the user's documents to answer."
EMBED_SYSTEM = (
    "Answer the user's question using the context below from their documents. "
    "Reply with only the answer to the question."
)


@dataclass
class MethodResult:
    answer: str
    passages: list[tuple[str, str]]  # (document key, text) the reader was given
    ttft: float
    total: float
    prompt_tokens: int
    extra: dict = field(default_factory=dict)


class Embedder(Protocol):
    """What the embedding baseline needs: texts → unit vectors (n, d)."""

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class QARunner:
    """Answers the questions by each method over each scope."""

    def __init__(
        self,
        answerer: Answerer,
        documents: dict[str, CorpusDocument],
        *,
        max_tokens: int = 200,
        embedder: Embedder | None = None,
        dense_limit: int = 30000,
    ) -> None:
        self.answerer = answerer
        self.model = answerer.model
        self.documents = documents
        # The baselines decode as Quire's answers do: the same guards and loop stop.
        self.params = SamplingParams(max_new_tokens=max_tokens, no_repeat_ngram=ANSWER_NO_REPEAT_NGRAM,
                                     run_penalty=ANSWER_RUN_PENALTY, loop_words=ANSWER_LOOP_WORDS)
        self.embedder = embedder
        self.dense_limit = dense_limit
        self._indexes: dict[tuple, PassageIndex] = {}
        self._vectors: dict[tuple, np.ndarray] = {}
        self._tokens: dict[str, int] = {}

    def keys(self, question: QAQuestion, scope: str) -> list[str]:
        return list(question.docs) if scope == "own" else list(self.documents)

    def run(self, question: QAQuestion, method: str, scope: str, first: QAQuestion | None = None) -> dict | None:
        """One answer; for a follow-up, `first` is the question asked before it, answered
        first by the same method (its answer is the conversation the follow-up sees)."""
        keys = self.keys(question, scope)
        docs = [self.documents[k] for k in keys]
        if method == "dense" and sum(self.token_count(k) for k in keys) > self.dense_limit:
            return None
        if method == "embed" and self.embedder is None:
            return None
        history: list[Turn] = []
        extra = {}
        if first is not None and method != "quire-alone":
            before = self._method(method)(first.question, keys, docs, [])
            history = [Turn(first.question, before.answer)]
            extra = {"first_answer": before.answer, "first_score": round(score_answer(first, before.answer), 3)}
        result = self._method(method)(question.question, keys, docs, history)
        found = evidence_found(question, result.passages)
        return {
            **extra,
            "answer": result.answer,
            "score": round(score_answer(question, result.answer), 3),
            "evidence_hit": (sum(found) / len(found)) if found else None,
            "evidence_all": all(found) if found else None,
            "not_found": says_not_found(result.answer),
            "loop": has_loop(result.answer),
            "ttft": round(result.ttft, 3),
            "total": round(result.total, 3),
            "prompt_tokens": result.prompt_tokens,
            **result.extra,
        }

    def _method(self, method: str):
        return getattr(self, "_" + ("quire" if method == "quire-alone" else method).replace("-", "_"))

    def token_count(self, key: str) -> int:
        if key not in self._tokens:
            self._tokens[key] = len(self.model.tokenizer.encode(self.documents[key].text))
        return self._tokens[key]

    # -- methods ---------------------------------------------------------------

    def _quire_cache(self, question: str, keys: list[str], docs: list[CorpusDocument], history: list[Turn]) -> MethodResult:
        self.answerer.read_cached = True
        try:
            return self._quire(question, keys, docs, history)
        finally:
            self.answerer.read_cached = False

    def _quire(self, question: str, keys: list[str], docs: list[CorpusDocument], history: list[Turn]) -> MethodResult:
        started = time.perf_counter()
        answer, evidence, stats = collect_answer(self.answerer.ask(question, docs, replace(self.params), history=history))
        key_of = {self.documents[k].doc_id: k for k in keys}
        passages = [(key_of[e.doc_id], e.text) for e in evidence]
        total = time.perf_counter() - started
        extra = {}
        if stats is not None:
            extra = {
                "retrieval_seconds": round(stats.retrieval_seconds, 3),
                "passages_from_cache": stats.passages_from_cache,
                "citations": stats.citations,
                "unsupported_citations": stats.unsupported_citations,
            }
        return MethodResult(answer, passages, stats.time_to_first_token if stats else total, total,
                            stats.context_tokens if stats else 0, extra)

    def _index(self, keys: list[str], words: int) -> PassageIndex:
        name = (tuple(keys), words)
        if name not in self._indexes:
            self._indexes[name] = PassageIndex([self.documents[k].text for k in keys], words, CHUNK_OVERLAP,
                                               stem=False, floor=0.25)
        return self._indexes[name]

    def _bm25(self, question: str, keys: list[str], docs: list[CorpusDocument], history: list[Turn]) -> MethodResult:
        started = time.perf_counter()
        index = self._index(keys, BM25_WORDS)
        best = np.argsort(-index.bm25(question), kind="stable")[:BM25_TOP]
        return self._rag(question, keys, index, [int(i) for i in best], BM25_SYSTEM, started, history)

    def _embed(self, question: str, keys: list[str], docs: list[CorpusDocument], history: list[Turn]) -> MethodResult:
        started = time.perf_counter()
        index = self._index(keys, EMBED_WORDS)
        name = (tuple(keys), EMBED_WORDS)
        if name not in self._vectors:
            # Per document, so the whole-library scope reuses each document's vectors.
            parts = []
            for key in keys:
                own = self._index([key], EMBED_WORDS)
                if (key,) not in self._vectors:
                    self._vectors[(key,)] = self.embedder.encode([own.text(i) for i in range(len(own))])
                parts.append(self._vectors[(key,)])
            self._vectors[name] = np.concatenate(parts)
        query = self.embedder.encode([question])[0]
        best = np.argsort(-(self._vectors[name] @ query), kind="stable")[:EMBED_TOP]
        return self._rag(question, keys, index, [int(i) for i in best], EMBED_SYSTEM, started, history)

    def _rag(self, question, keys, index: PassageIndex, chosen: list[int], system: str, started: float,
             history: list[Turn]) -> MethodResult:
        texts = [index.text(i) for i in chosen]
        context = "\n\n".join(f"Excerpt {n}:\n{t.strip()}" for n, t in enumerate(texts, 1))
        messages = [{"role": "system", "content": system}]
        for turn in history:
            messages += [{"role": "user", "content": turn.question}, {"role": "assistant", "content": turn.answer}]
        messages.append({"role": "user", "content": f"{context}\n\nQuestion: {question}"})
        answer, ttft, prompt = self._chat(messages, started)
        passages = [(keys[index.passages[i].entry], t) for i, t in zip(chosen, texts)]
        return MethodResult(answer, passages, ttft, time.perf_counter() - started, prompt)

    def _dense(self, question: str, keys: list[str], docs: list[CorpusDocument], history: list[Turn]) -> MethodResult:
        started = time.perf_counter()
        text = "\n\n".join(d.text for d in docs)
        messages = []
        for turn in history:
            messages += [{"role": "user", "content": turn.question}, {"role": "assistant", "content": turn.answer}]
        messages.append({"role": "user", "content": f"{text}\n\nQuestion: {question}"})
        answer, ttft, prompt = self._chat(messages, started)
        return MethodResult(answer, [(k, d.text) for k, d in zip(keys, docs)], ttft, time.perf_counter() - started, prompt)

    def _chat(self, messages: list[dict], started: float) -> tuple[str, float, int]:
        """The baselines' answer from the answerer's reader (the same one Quire's path
        uses): (answer, time to first token, prompt tokens)."""
        stats = GenerationStats()
        answer = "".join(t.text for t in self.answerer.reader.chat(messages, self.params, stats=stats))
        return answer, (time.perf_counter() - started) - stats.decode_seconds, stats.prompt_tokens


def run_qa(
    runner: QARunner,
    questions: Sequence[QAQuestion],
    methods: Sequence[str],
    scopes: Sequence[str],
    on_answer: Callable[[dict], None] | None = None,
    firsts: dict[str, QAQuestion] | None = None,
) -> dict:
    """Every question × scope × method; the records and their summary. A follow-up
    (`after` set) is asked after its first question, found in `firsts` by id."""
    records = []
    for question in questions:
        first = None
        if question.after is not None:
            if not firsts or question.after not in firsts:
                raise ValueError(f"follow-up {question.id}: its first question {question.after} is not given")
            first = firsts[question.after]
        for scope in scopes:
            for method in methods:
                result = runner.run(question, method, scope, first)
                if result is None:
                    continue
                record = {"id": question.id, "kind": question.kind, "scope": scope, "method": method,
                          "question": question.question, **result}
                records.append(record)
                if on_answer is not None:
                    on_answer(record)
    return {"records": records, "summary": summarise(records), "machine": machine()}


def summarise(records: Sequence[dict]) -> dict:
    """Per scope, method and kind (and "all"): accuracy (mean score), evidence hit,
    both passages found (cross), loops, median first token and total seconds, mean
    prompt tokens."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        for kind in (r["kind"], "all"):
            groups.setdefault((r["scope"], r["method"], kind), []).append(r)
    out: dict = {}
    for (scope, method, kind), rows in sorted(groups.items()):
        hits = [r["evidence_hit"] for r in rows if r["evidence_hit"] is not None]
        both = [r["evidence_all"] for r in rows if r["kind"] == "cross" and r["evidence_all"] is not None]
        out.setdefault(scope, {}).setdefault(method, {})[kind] = {
            "n": len(rows),
            "accuracy": round(100 * statistics.fmean(r["score"] for r in rows), 1),
            "evidence_hit": round(100 * statistics.fmean(hits), 1) if hits else None,
            "both_passages": round(100 * statistics.fmean(both), 1) if both else None,
            "loops": sum(r["loop"] for r in rows),
            "ttft_median": round(statistics.median(r["ttft"] for r in rows), 2),
            "total_median": round(statistics.median(r["total"] for r in rows), 2),
            "prompt_tokens_mean": round(statistics.fmean(r["prompt_tokens"] for r in rows)),
        }
        firsts = [r["first_score"] for r in rows if "first_score" in r]
        if firsts:  # follow-ups: how the question before them was answered
            out[scope][method][kind]["first_accuracy"] = round(100 * statistics.fmean(firsts), 1)
    return out


def report(summary: dict) -> str:
    """Markdown tables, one per scope: accuracy and evidence hit per kind and method."""
    lines = []
    for scope, methods in summary.items():
        lines += [f"Scope: {scope}", ""]
        kinds = [k for k in (*KINDS, "all") if any(k in m for m in methods.values())]
        lines.append("| method | " + " | ".join(kinds) + " | evidence hit | loops | first token (median s) | total (median s) | prompt tokens |")
        lines.append("|---" * (len(kinds) + 6) + "|")
        for method, kinds_of in methods.items():
            cells = [f"{kinds_of[k]['accuracy']:.1f} ({kinds_of[k]['n']})" if k in kinds_of else "–" for k in kinds]
            whole = kinds_of["all"]
            hit = "–" if whole["evidence_hit"] is None else f"{whole['evidence_hit']:.1f}"
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {hit} | {whole['loops']} | {whole['ttft_median']} | {whole['total_median']} | {whole['prompt_tokens_mean']} |")
        lines.append("")
    return "\n".join(lines)


def machine() -> dict:
    import os

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()}


def retrieval_study(runner: QARunner, questions: Sequence[QAQuestion], scope: str, on_row: Callable[[dict], None] | None = None) -> dict:
    """Evidence hit of the passages each method would put in the prompt, without the
    reader: for each answerable question, the share of its evidence sentences inside
    Quire's chosen passages ("quire") and BM25-RAG's chunks ("bm25_rag"). What a
    retrieval change is judged by before the reader is run."""
    rows = []
    for question in questions:
        if question.kind == "unanswerable":
            continue
        keys = runner.keys(question, scope)
        docs = [runner.documents[k] for k in keys]
        started = time.perf_counter()
        sources = runner.answerer.retriever.choose_sources(docs, question.question)
        row = {"id": question.id, "kind": question.kind, "retrieve_seconds": round(time.perf_counter() - started, 2)}
        found = evidence_found(question, [(keys[s.entry], s.text) for s in sources])
        row["quire"] = sum(found) / len(found)
        baseline = runner._index(keys, BM25_WORDS)
        best = np.argsort(-baseline.bm25(question.question), kind="stable")[:BM25_TOP]
        found = evidence_found(question, [(keys[baseline.passages[int(i)].entry], baseline.text(int(i))) for i in best])
        row["bm25_rag"] = sum(found) / len(found)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    names = ("quire", "bm25_rag")
    summary = {name: round(100 * statistics.fmean(r[name] for r in rows), 1) for name in names} if rows else {}
    return {"scope": scope, "rows": rows, "evidence_hit": summary, "n": len(rows)}
