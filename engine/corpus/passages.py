"""Passages: the units an answer retrieves, reads and cites, and their lexical index.

A passage is a run of about PASSAGE_WORDS words of one document, cut at word
boundaries with a little overlap, so that a sentence cut by one edge is whole in
the next passage. BM25 over the passages' words chooses what the reader sees,
numbered, and what an answer's [n] points at. (The cache's retrieval heads, fused
with BM25, lowered the evidence hit on `quire bench qa` and were taken out of the
answer path: docs/lab/answers-bench-qa.md.)

BM25 is Okapi BM25 (Robertson and Zaragoza, "The Probabilistic Relevance Framework:
BM25 and Beyond", 2009) from rank-bm25. Quire's index reads lowercase runs of letters
and digits, stemmed by the Snowball English stemmer ("installs", "installing" and
"installation" meet), and gives a term found in half the passages or more no weight
(rank-bm25 gives such terms a quarter of the average weight by default, so "the",
"of" and "how" outvoted the question's own words). Measured on bench qa's 127
answerable questions (own scope, 5 passages of 200 words, evidence hit): 79.4% as
plain words, 82.8% with the zero floor, 85.3% stemmed as well; the whole library
78.9% against 84.0% (docs/lab/answers-bench-qa.md). The BM25-RAG baseline keeps plain words
and rank-bm25's defaults (stem=False, floor=0.25).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import snowballstemmer
from rank_bm25 import BM25Okapi

# Words per passage and words shared with the passage before. Measured on bench qa's
# 127 answerable questions (own scope, BM25, evidence hit of the passages read):
# 5 x 200 words 79.4% against 8 x 120 77.2% (cut at page edges) for about the same
# prompt; more passages raised the hit (8 x 200 84.9%, 12 x 200 88.9%) but not the
# 0.5B reader's accuracy (docs/lab/answers-bench-qa.md).
PASSAGE_WORDS = 200
PASSAGE_OVERLAP = 20

_WORD = re.compile(r"\S+")
_TERM = re.compile(r"[a-z0-9]+")


def word_spans(text: str, words: int = PASSAGE_WORDS, overlap: int = PASSAGE_OVERLAP) -> list[tuple[int, int]]:
    """Character spans of runs of `words` whitespace-separated words, each sharing
    `overlap` words with the one before; the last may be shorter."""
    if words <= 0 or not 0 <= overlap < words:
        raise ValueError(f"need 0 <= overlap < words, got {overlap}, {words}")
    found = [m.span() for m in _WORD.finditer(text)]
    spans = []
    for first in range(0, len(found), words - overlap):
        last = min(first + words, len(found)) - 1
        spans.append((found[first][0], found[last][1]))
        if last == len(found) - 1:
            break
    return spans


def terms(text: str) -> list[str]:
    """Lowercase runs of letters and digits: the plain tokens."""
    return _TERM.findall(text.lower())


_STEMMER = snowballstemmer.stemmer("english")
_STEMS: dict[str, str] = {}


def stems(text: str) -> list[str]:
    """The plain tokens of `text`, each stemmed (Snowball English)."""
    found = []
    for term in _TERM.findall(text.lower()):
        stem = _STEMS.get(term)
        if stem is None:
            stem = _STEMS[term] = _STEMMER.stemWord(term)
        found.append(stem)
    return found


@dataclass(frozen=True)
class Passage:
    entry: int  # the document's index in the scope
    start: int  # first character in the document's text
    end: int


class PassageIndex:
    """Every passage of a list of documents, in document order, with BM25 over them.
    Passages run across page edges (the engine cites a passage by one page)."""

    def __init__(self, texts: Sequence[str], words: int = PASSAGE_WORDS, overlap: int = PASSAGE_OVERLAP,
                 stem: bool = True, floor: float = 0.0) -> None:
        """`stem`: index stems rather than plain tokens; `floor`: the weight of a term
        in half the passages or more, as a share of the average term weight
        (rank-bm25's epsilon)."""
        self.passages: list[Passage] = []
        for entry, text in enumerate(texts):
            self.passages += [Passage(entry, s, e) for s, e in word_spans(text, words, overlap)]
        if not self.passages:
            raise ValueError("no text to index")
        self._texts = texts
        self.analyse = stems if stem else terms
        self.entry = np.asarray([p.entry for p in self.passages], dtype=np.int64)
        self.start = np.asarray([p.start for p in self.passages], dtype=np.int64)
        self.end = np.asarray([p.end for p in self.passages], dtype=np.int64)
        self._bm25 = BM25Okapi([self.analyse(self.text(i)) for i in range(len(self.passages))], epsilon=floor)

    def __len__(self) -> int:
        return len(self.passages)

    def text(self, index: int) -> str:
        p = self.passages[index]
        return self._texts[p.entry][p.start : p.end]

    def weights(self, question: str) -> dict[str, float]:
        """The question's terms (as `analyse` gives them) and their inverse document
        frequency over the passages, in the form that stays positive (Lucene's BM25
        idf; rank-bm25's goes to zero or below for a term in half the passages)."""
        n = len(self.passages)
        found = {}
        for term in set(self.analyse(question)):
            having = sum(term in counts for counts in self._bm25.doc_freqs)
            found[term] = math.log(1.0 + (n - having + 0.5) / (having + 0.5)) if having else 0.0
        return found

    def bm25(self, question: str) -> np.ndarray:
        """BM25 score of every passage for `question`: (n_passages,)."""
        return np.asarray(self._bm25.get_scores(self.analyse(question)), dtype=np.float64)
