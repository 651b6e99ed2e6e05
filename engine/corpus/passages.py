"""Passages: the units an answer retrieves, reads and cites, and their lexical index.

A passage is a run of about PASSAGE_WORDS words of one document, cut at word
boundaries with a little overlap, so that a sentence cut by one edge is whole in
the next passage. The same cut serves every retriever: BM25 over passage words
(what desktop RAG apps put in front of a model), the cache's retrieval heads (a
block's tally lands on the passages whose characters it covers), and an embedding
model where one is given. Passages are what the reader sees, numbered, and what an
answer's [n] points at.

BM25 is Okapi BM25 (Robertson and Zaragoza, "The Probabilistic Relevance Framework:
BM25 and Beyond", 2009) from rank-bm25, over lowercase runs of letters and digits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rank_bm25 import BM25Okapi

# Words per passage and words shared with the passage before. Eight passages of 120
# words are about the prompt of five 200-word chunks that BM25-RAG reads
# (docs/BENCHMARKS.md, bench qa), in smaller pieces, so that more places fit.
PASSAGE_WORDS = 120
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
    """The lexical index's tokens: lowercase runs of letters and digits."""
    return _TERM.findall(text.lower())


@dataclass(frozen=True)
class Passage:
    entry: int  # the document's index in the scope
    start: int  # first character in the document's text
    end: int


class PassageIndex:
    """Every passage of a list of documents, in document order, with BM25 over them.

    With `breaks` (per document, the characters where its pages start) no passage
    crosses a page: the page an answer cites is the page that holds the passage."""

    def __init__(
        self,
        texts: Sequence[str],
        words: int = PASSAGE_WORDS,
        overlap: int = PASSAGE_OVERLAP,
        breaks: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.passages: list[Passage] = []
        for entry, text in enumerate(texts):
            cuts = sorted({0, *(b for b in (breaks[entry] if breaks else ()) if 0 < b < len(text)), len(text)})
            for first, last in zip(cuts, cuts[1:]):
                spans = word_spans(text[first:last], words, overlap)
                self.passages += [Passage(entry, first + s, first + e) for s, e in spans]
        if not self.passages:
            raise ValueError("no text to index")
        self._texts = texts
        self.entry = np.asarray([p.entry for p in self.passages], dtype=np.int64)
        self.start = np.asarray([p.start for p in self.passages], dtype=np.int64)
        self.end = np.asarray([p.end for p in self.passages], dtype=np.int64)
        self._bm25 = BM25Okapi([terms(self.text(i)) for i in range(len(self.passages))])

    def __len__(self) -> int:
        return len(self.passages)

    def text(self, index: int) -> str:
        p = self.passages[index]
        return self._texts[p.entry][p.start : p.end]

    def bm25(self, question: str) -> np.ndarray:
        """BM25 score of every passage for `question`: (n_passages,)."""
        return np.asarray(self._bm25.get_scores(terms(question)), dtype=np.float64)

    def from_blocks(self, block_entry: np.ndarray, block_start: np.ndarray, block_end: np.ndarray, tally: np.ndarray) -> np.ndarray:
        """Each passage's score from per-block scores: the best block whose characters
        overlap the passage, in the same document. (n_passages,)"""
        scores = np.zeros(len(self.passages), dtype=np.float64)
        for entry in np.unique(self.entry):
            mine = np.flatnonzero(self.entry == entry)
            blocks = np.flatnonzero(block_entry == entry)
            if not len(blocks):
                continue
            # Blocks are in text order inside a document: the first block ending
            # after a passage's start and the first starting at or after its end
            # bound the blocks it overlaps.
            ends, starts = block_end[blocks], block_start[blocks]
            first = np.searchsorted(ends, self.start[mine], side="right")
            last = np.searchsorted(starts, self.end[mine], side="left")
            values = tally[blocks]
            # Running maxima over a sparse table would be faster; passages overlap
            # only a handful of blocks each.
            for row, lo, hi in zip(mine, first, last):
                if hi > lo:
                    scores[row] = float(values[lo:hi].max())
        return scores


def rank_order(scores: np.ndarray) -> np.ndarray:
    """Each item's rank under `scores` (0 = best; ties: earlier first)."""
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(len(scores))
    return ranks


def fuse(score_lists: Sequence[np.ndarray], k: float = 60.0, depth: int = 100) -> np.ndarray:
    """Reciprocal rank fusion (Cormack, Clarke and Büttcher, SIGIR 2009): each list
    gives its best `depth` items 1 / (k + rank); an item with no positive score in a
    list gets nothing from it. (n,)"""
    fused = np.zeros(len(score_lists[0]), dtype=np.float64)
    for scores in score_lists:
        ranks = rank_order(scores)
        counted = (ranks < depth) & (scores > 0)
        fused[counted] += 1.0 / (k + 1 + ranks[counted])
    return fused
