"""`quire bench tasks`: whole-document tasks on real documents (bench qa's), scored
against key points written by reading them (resources/bench/tasks/tasks.jsonl), with
the snippet-RAG prompt and, where the text fits, a dense prompt in the same run.

- "summarise" (a page range): coverage = the share of the range's key points the
  summary names (a point counts when any of its accepted strings is in the text,
  lower-cased, whitespace collapsed); citations = the share of the summary's
  sentences that cite a passage or part. An item with no pages is a whole book,
  reported apart as "summarise-whole" (its seconds are the book's time).
- "find-all" (a term): recall = the share of the term's occurrences (its surface
  forms, listed by hand, found by a plain case-insensitive search) that lie inside a
  reported sentence; for RAG, inside its five chunks.
- "compare" (two documents on a topic): coverage of the key points, as for summaries.

Methods: "quire" (Answerer.summarise / find_all / compare), "bm25" (the top 5 chunks of
200 words by plain BM25 for the request, as bench qa's BM25-RAG), "dense" (the page
range's whole text in the prompt; summaries only).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench.niah import collect_answer
from bench.qa import BM25_SYSTEM, BM25_TOP, BM25_WORDS, CHUNK_OVERLAP, machine
from bench.qa_data import normalise
from engine.corpus.build import CorpusDocument
from engine.corpus.answerer import Answerer, Evidence
from engine.corpus.passages import PassageIndex
from engine.corpus.tasks import find_mentions, page_range
from engine.generate import GenerationStats, SamplingParams, Token

METHODS = ("quire", "bm25", "dense")
SUMMARY_TOKENS = 400


def load_items(path: Path | str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def coverage(points: Sequence[Sequence[str]], text: str) -> float:
    flat = normalise(text)
    return sum(any(normalise(s) in flat for s in point) for point in points) / len(points)


def occurrences(document: CorpusDocument, forms: Sequence[str]) -> list[int]:
    """Character positions of each listed surface form (case-insensitive, any run of
    whitespace between its words)."""
    found = set()
    for form in forms:
        pattern = re.compile(r"\s+".join(re.escape(w) for w in form.split()), re.IGNORECASE)
        found |= {m.start() for m in pattern.finditer(document.text)}
    return sorted(found)


def _cited_sentences(text: str) -> float | None:
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if len(s.split()) >= 3]
    if not sentences:
        return None
    return sum(bool(re.search(r"\[\d+(?:\s*[,;]\s*\d+)*\]", s)) for s in sentences) / len(sentences)


class TaskRunner:
    def __init__(self, answerer: Answerer, documents: dict[str, CorpusDocument], *, summary_tokens: int = SUMMARY_TOKENS,
                 dense_limit: int = 30000) -> None:
        self.answerer = answerer
        self.model = answerer.model
        self.documents = documents
        self.params = SamplingParams(max_new_tokens=summary_tokens, no_repeat_ngram=12)
        self.dense_limit = dense_limit
        self._indexes: dict[tuple, PassageIndex] = {}

    def _index(self, keys: tuple[str, ...]) -> PassageIndex:
        if keys not in self._indexes:
            self._indexes[keys] = PassageIndex([self.documents[k].text for k in keys], BM25_WORDS, CHUNK_OVERLAP,
                                               stem=False, floor=0.25)
        return self._indexes[keys]

    def _generate(self, messages: list[dict]) -> tuple[str, int]:
        stats = GenerationStats()
        text = "".join(t.text for t in self.answerer.reader.chat(messages, self.params, stats=stats))
        return text, stats.prompt_tokens

    def _rag(self, keys: tuple[str, ...], request: str) -> tuple[str, int, list[tuple[int, int, int]]]:
        index = self._index(keys)
        best = [int(i) for i in np.argsort(-index.bm25(request), kind="stable")[:BM25_TOP]]
        texts = [index.text(i) for i in best]
        context = "\n\n".join(f"Excerpt {n}:\n{t.strip()}" for n, t in enumerate(texts, 1))
        answer, prompt = self._generate([{"role": "system", "content": BM25_SYSTEM},
                                         {"role": "user", "content": f"{context}\n\nQuestion: {request}"}])
        spans = [(int(index.entry[i]), int(index.start[i]), int(index.end[i])) for i in best]
        return answer, prompt, spans

    def run(self, item: dict, method: str) -> dict | None:
        keys = tuple(item["docs"])
        docs = [self.documents[k] for k in keys]
        started = time.perf_counter()
        task = item["task"]
        row: dict = {"id": item["id"], "task": task, "method": method}
        if task == "find-all":
            if method == "dense":
                return None
            where = [occurrences(d, item["forms"]) for d in docs]
            total = sum(map(len, where))
            if method == "quire":
                spans = [(m.entry, m.start, m.end) for m in find_mentions(docs, item["term"])]
            else:
                index = self._index(keys)
                best = np.argsort(-index.bm25(item["term"]), kind="stable")[:BM25_TOP]
                spans = [(int(index.entry[i]), int(index.start[i]), int(index.end[i])) for i in best]
            inside = sum(any(e == entry and s <= p < t for e, s, t in spans) for entry, positions in enumerate(where)
                         for p in positions)
            row.update(occurrences=total, found=len(spans), recall=inside / total if total else None)
        elif task == "summarise":
            document = docs[0]
            first, last = item.get("pages") or (None, None)
            if first is None and last is None:
                row["task"] = "summarise-whole"  # a whole book: summarised apart from the page ranges
            if method == "quire":
                text, _, stats = collect_answer(self.answerer.summarise(document, self.params, first_page=first, last_page=last))
                row.update(prompt_tokens=stats.prompt_tokens, parts=stats.parts)
            elif method == "bm25":
                text, prompt, _ = self._rag(keys, item["request"])
                row.update(prompt_tokens=prompt)
            else:
                lo, hi = page_range(document, first, last)
                messages = [{"role": "user", "content": f"{document.text[lo:hi].strip()}\n\n{item['request']}"}]
                if len(self.model.encode_chat(messages)) > self.dense_limit:
                    return None
                text, prompt = self._generate(messages)
                row.update(prompt_tokens=prompt)
            row.update(answer=text, coverage=coverage(item["points"], text), cited_sentences=_cited_sentences(text))
        elif task == "compare":
            if method == "dense":
                return None
            if method == "quire":
                text, evidence, stats = collect_answer(self.answerer.compare(docs, item["topic"], self.params))
                row.update(prompt_tokens=stats.prompt_tokens if stats else None,
                           documents_cited=len({e.doc_id for e in evidence if e.cited}))
            else:
                text, prompt, _ = self._rag(keys, item["request"])
                row.update(prompt_tokens=prompt)
            row.update(answer=text, coverage=coverage(item["points"], text), cited_sentences=_cited_sentences(text))
        row["seconds"] = round(time.perf_counter() - started, 2)
        return row


def run_tasks(runner: TaskRunner, items: Sequence[dict], methods: Sequence[str],
              on_row: Callable[[dict], None] | None = None) -> dict:
    rows = []
    for item in items:
        for method in methods:
            row = runner.run(item, method)
            if row is None:
                continue
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return {"rows": rows, "summary": summarise_rows(rows), "machine": machine()}


def summarise_rows(rows: Sequence[dict]) -> dict:
    """Per task and method: mean coverage or recall (%), median seconds, mean prompt tokens."""
    out: dict = {}
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["method"]), []).append(row)
    for (task, method), group in sorted(groups.items()):
        key = "recall" if task == "find-all" else "coverage"
        values = [r[key] for r in group if r.get(key) is not None]
        tokens = [r["prompt_tokens"] for r in group if r.get("prompt_tokens")]
        out.setdefault(task, {})[method] = {
            "n": len(group),
            key: round(100 * statistics.fmean(values), 1) if values else None,
            "seconds_median": round(statistics.median(r["seconds"] for r in group), 1),
            "prompt_tokens_mean": round(statistics.fmean(tokens)) if tokens else None,
        }
    return out
