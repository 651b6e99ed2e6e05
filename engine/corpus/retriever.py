"""`Retriever`: which passages an answer reads.

    retriever = Retriever()
    sources = retriever.choose_sources(documents, "Who wrote it?")   # Sources numbered 1..5, best first

Every passage of the scope (engine/corpus/passages.py: 200 words, 20 shared with the
one before, possibly across pages) ranked by BM25 over word stems; a follow-up ranked
together with the turn before it (`turn_scores`); each chosen passage cited by one page
(`_page_of`). The index is built from the documents' text, not from the corpus cache,
and kept for the scope last asked. `Answerer` (engine/corpus/answerer.py) reads what
this chooses.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from engine.corpus.answer import Source, Turn, without_citations
from engine.corpus.build import CorpusDocument
from engine.corpus.passages import PassageIndex

# Passages the reader gets (engine/corpus/passages.py): 5 of 200 words, as BM25-RAG
# reads. More passages raised the evidence hit (8: 84.9%, 12: 88.9% against 79.4%)
# but not the 0.5B reader's accuracy (36.4%, 36.1% against 40.1%; docs/lab/answers-bench-qa.md).
READ_PASSAGES = 5
# A follow-up is retrieved for together with the turn before it, whose words carry
# what "she", "it" or "the second one" refer to: BM25 of the follow-up, plus these
# shares of BM25 for the previous question and the previous answer.
FOLLOW_UP_QUESTION_WEIGHT = 0.5
FOLLOW_UP_ANSWER_WEIGHT = 0.25
# Of a follow-up's passages, this many are ranked with the turn before; the rest for
# the follow-up alone, so a question on a new topic still finds its own. Measured by
# the passages read (evidence hit) on bench qa: the 26 follow-ups 96.2% (61.5% alone),
# the 127 answerable questions after a turn about another document 84.2% (85.3%
# with no turn before; 80.4% with all five passages ranked with the turn).
FOLLOW_UP_JOINT = 3
# A question in several parts ("How many bins does Octave's hist use, and which
# argument of R's hist() ...?") also reads each part's best passage: BM25 of the whole
# question lets one part's rare words outrank the other's. Measured on bench qa's 127
# answerable questions (own scope): evidence hit 85.3% → 85.7%, cross-document
# questions with both passages read 9 → 10 of 16 (retrieval alone: 56.2% → 62.5%),
# accuracy 57.8% → 58.2% (4 scores moved), 1,684 → 1,768 prompt tokens on average;
# docs/lab/answers-bench-qa.md. The parts are cut at ", and", ";", a "?" inside the
# question, and before a second question word; parts under PART_WORDS words are not
# questions of their own.
_PARTS = re.compile(
    r",\s*and\s+|;\s*|\?\s+"
    r"|,\s+(?=(?:which|what|how|where|when|why|in which|by what|since)\b)"
    r"|\s+and\s+(?=(?:which|what|how|where|when|why|in which|by what|since|does|do|is)\b)",
    re.IGNORECASE,
)
PART_WORDS = 3


def question_parts(question: str) -> list[str]:
    """The parts of a question that asks several things, or [] for one that asks one."""
    parts = [part.strip() for part in _PARTS.split(question) if len(part.split()) >= PART_WORDS]
    return parts if len(parts) > 1 else []


class Retriever:
    def __init__(self) -> None:
        # The documents last asked: their passage index and their text in lowercase
        # (for names the documents asked never mention).
        self._scope: tuple[tuple[str, ...], PassageIndex, list[str]] | None = None

    def passage_index(self, documents: list[CorpusDocument]) -> PassageIndex:
        """The documents' passages and their lexical index (kept for the documents
        last asked). Built from their text: the answer path does not read the cache."""
        names = tuple(d.content_key for d in documents)
        if self._scope is None or self._scope[0] != names:
            # Passages run across page edges: cut at them, the passages that end a
            # page are fragments, and the reader scored 26.6% against BM25-RAG's 40.1%
            # on the same prompt (bench qa's 36-question subset; docs/lab/answers-bench-qa.md).
            index = PassageIndex([d.text for d in documents])
            lowered = [d.text.lower() for d in documents]
            self._scope = (names, index, lowered)
        return self._scope[1]

    def lowered(self, documents: list[CorpusDocument]) -> list[str]:
        """The documents' text in lowercase (kept with their index)."""
        self.passage_index(documents)
        return self._scope[2]

    def choose_sources(
        self, documents: list[CorpusDocument], question: str, count: int = READ_PASSAGES, history: list[Turn] | None = None
    ) -> list[Source]:
        """The `count` passages that BM25 ranks best for `question`, numbered best
        first, then the best passage of each of its `question_parts` not among them
        (one that shares a weighted word with its part). Neighbours that overlap stay
        separate sources (their shared words are read twice): a merged run would cite
        the page where it starts, not the page of the passage that held the answer. After earlier turns, the first
        FOLLOW_UP_JOINT passages are ranked with the previous question and answer
        (`retrieval_scores`), the rest for the question alone."""
        index = self.passage_index(documents)
        scores = index.bm25(question)
        ranked = [int(i) for i in np.argsort(-scores, kind="stable")[: count + FOLLOW_UP_JOINT]]
        if not history:
            chosen = ranked[:count]
            for part in question_parts(question):
                part_scores = index.bm25(part)
                best = int(np.argmax(part_scores))
                if part_scores[best] > 0 and best not in chosen:  # a part of common words finds nothing
                    chosen.append(best)
            return self._numbered(documents, index, chosen, scores, index.weights(question))
        scores = scores + turn_scores(index, history)
        chosen = [int(i) for i in np.argsort(-scores, kind="stable")[:FOLLOW_UP_JOINT]]
        order = chosen + [i for i in ranked if i not in chosen]
        return self._numbered(documents, index, order[:count], scores, index.weights(f"{question} {history[-1].question}"))

    @staticmethod
    def _numbered(documents: list[CorpusDocument], index: PassageIndex, order: list[int], scores: np.ndarray,
                  asked: dict[str, float]) -> list[Source]:
        """Passages `order` of `index` as Sources numbered 1.. in that order, each cited
        by the page that holds the question's rarest terms (`_page_of`)."""
        sources = []
        for number, i in enumerate(order, 1):
            document = documents[int(index.entry[i])]
            start, end = int(index.start[i]), int(index.end[i])
            page_index, label = _page_of(document, start, end, asked, index.analyse)
            sources.append(Source(number, int(index.entry[i]), start, end, document.title, label,
                                  document.text[start:end], float(scores[i]), page_index))
        return sources

    def balanced_sources(self, documents: list[CorpusDocument], question: str, per_document: int) -> list[Source]:
        """The `per_document` best passages of each document for `question`, numbered
        together (each document's best first, the documents in turn)."""
        index = self.passage_index(documents)
        scores = index.bm25(question)
        chosen: list[list[int]] = []
        for entry in range(len(documents)):
            mine = np.flatnonzero(index.entry == entry)
            chosen.append([int(i) for i in mine[np.argsort(-scores[mine], kind="stable")[:per_document]]])
        order = [picks[rank] for rank in range(per_document) for picks in chosen if rank < len(picks)]
        return self._numbered(documents, index, order, scores, index.weights(question))


def turn_scores(index: PassageIndex, history: list[Turn]) -> np.ndarray:
    """What the turn before adds to a follow-up's BM25: the previous question's and
    answer's BM25 at FOLLOW_UP_QUESTION_WEIGHT and FOLLOW_UP_ANSWER_WEIGHT."""
    last = history[-1]
    return (FOLLOW_UP_QUESTION_WEIGHT * index.bm25(last.question)
            + FOLLOW_UP_ANSWER_WEIGHT * index.bm25(without_citations(last.answer)))


def retrieval_scores(index: PassageIndex, question: str, history: list[Turn] | None = None) -> np.ndarray:
    """BM25 of every passage for `question`, plus `turn_scores` after earlier turns."""
    scores = index.bm25(question)
    return scores + turn_scores(index, history) if history else scores


def _page_of(document: CorpusDocument, start: int, end: int, asked: dict[str, float],
             analyse: Callable[[str], list[str]]) -> tuple[int | None, str | None]:
    """The page a passage [start, end) is cited by, where it spans several: the one
    whose part holds the question's rarest terms (by their weights `asked`, over the
    terms that `analyse` gives), then most of its characters."""
    pages = document.pages
    if not pages:
        return None, None
    first = document.page_at(start)[0]
    last = document.page_at(max(start, end - 1))[0]
    bounds = [p for p, _ in pages] + [max(end, pages[-1][0])]

    def weight(i: int) -> tuple[float, int]:
        lo, hi = max(start, bounds[i]), min(end, bounds[i + 1])
        return sum(asked.get(t, 0.0) for t in set(analyse(document.text[lo:hi]))), hi - lo

    index = max(range(first, last + 1), key=weight)
    return index, pages[index][1]
