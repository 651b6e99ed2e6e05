"""The data and scoring of `quire bench qa`: real questions written by reading real
documents, each with its accepted answers or key facts and the sentences that hold
them (resources/bench/qa/questions.jsonl; the documents come from Debian packages,
tools/fetch_qa_documents.py).

A question's kind says how it is scored:
- "lookup", "table": one fact; correct (1) when any accepted answer is in the
  answer, else 0.
- "cross" (a fact from each of two documents), "spread" (several facts through one
  document), "open" (explain or describe; its key facts): the share of facts found,
  each fact counting when any of its accepted strings is in the answer.
- "unanswerable": 1 when the answer says the documents do not hold it.
An answer that says "not found" scores 0 on any other kind, whatever it names.

Matching is by substring after lower-casing and collapsing whitespace, and with the
answer's Markdown code ticks dropped ("`m`, `n`, and `k`" names m, n, and k; a
bigger reader writes them): accepted answers are written short and distinctive,
with their formatting variants.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.corpus.answer import says_not_found

KINDS = ("lookup", "table", "cross", "spread", "open", "unanswerable")


@dataclass(frozen=True)
class EvidenceSentence:
    doc: str  # document key
    page: int  # 0-based page (or section) index as Quire reads the document
    sentence: str


@dataclass
class QAQuestion:
    id: str
    kind: str
    question: str
    docs: list[str]
    answers: list[str] = field(default_factory=list)
    facts: list[list[str]] = field(default_factory=list)
    evidence: list[EvidenceSentence] = field(default_factory=list)
    # A follow-up: the id of the question asked just before it, in the same
    # conversation (resources/bench/qa/followups.jsonl). Its answer is scored alone.
    after: str | None = None

    @classmethod
    def from_dict(cls, row: dict) -> QAQuestion:
        kind = row["kind"]
        if kind not in KINDS:
            raise ValueError(f"question {row.get('id')}: unknown kind '{kind}'")
        evidence = [EvidenceSentence(e["doc"], int(e["page"]), e["sentence"]) for e in row.get("evidence", [])]
        question = cls(row["id"], kind, row["question"], list(row["docs"]), list(row.get("answers", [])),
                       [list(f) for f in row.get("facts", [])], evidence, row.get("after"))
        if kind in ("lookup", "table") and not question.answers:
            raise ValueError(f"question {question.id}: a {kind} question needs accepted answers")
        if kind in ("cross", "spread", "open") and not question.facts:
            raise ValueError(f"question {question.id}: a {kind} question needs key facts")
        return question


def load_questions(path: Path | str) -> list[QAQuestion]:
    questions = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                questions.append(QAQuestion.from_dict(json.loads(line)))
            except (KeyError, json.JSONDecodeError) as error:
                raise ValueError(f"{path}:{number}: {error}") from error
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate question ids")
    return questions


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _has(answer: str, accepted: Iterable[str]) -> bool:
    return any(normalise(a) in answer for a in accepted)


def score_answer(question: QAQuestion, answer: str) -> float:
    """The answer's score in [0, 1] under its question's kind (module docstring)."""
    not_found = says_not_found(answer)
    if question.kind == "unanswerable":
        return 1.0 if not_found else 0.0
    if not_found:
        return 0.0
    text = normalise(answer.replace("`", ""))
    if question.kind in ("lookup", "table"):
        return 1.0 if _has(text, question.answers) else 0.0
    return sum(_has(text, fact) for fact in question.facts) / len(question.facts)


def evidence_found(question: QAQuestion, passages: Sequence[tuple[str, str]]) -> list[bool]:
    """For each of the question's evidence sentences, whether a passage of its
    document holds it whole. `passages`: (document key, text)."""
    texts: dict[str, list[str]] = {}
    for doc, text in passages:
        texts.setdefault(doc, []).append(normalise(text))
    return [any(normalise(e.sentence) in t for t in texts.get(e.doc, [])) for e in question.evidence]


_WORDS = re.compile(r"\w+")


def has_loop(answer: str, n: int = 6, times: int = 3) -> bool:
    """Whether some run of `n` words recurs `times` times or more: the mark of a
    looping answer ("She is married to Norton. She is married to Norton. ...")."""
    words = _WORDS.findall(answer.lower())
    seen: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        seen[gram] = seen.get(gram, 0) + 1
        if seen[gram] >= times:
            return True
    return False
