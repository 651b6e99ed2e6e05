"""The reading half of an answer: the chosen passages as one numbered context, a
grounded prompt, and the answer's [n] citations checked against their passages.

Why a plain, numbered context: on real documents a small model read independently
prefilled cache blocks, placed at positions it never saw in training, far less well
than it read the same text as a prompt (docs/lab/answers-bench-qa.md). The passages
are numbered so the answer can cite them inline, and each [n] maps back to a
document, page and characters.

A citation is flagged when its passage holds too few of the cited sentence's key
words: the check is lexical (key words are the sentence's words of four letters or
more and its numbers, minus common words), so it catches a citation to the wrong
passage, not a wrong claim made with the passage's own words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

NOT_FOUND = "Not found in these documents."

# The reader is told neither to cite nor to say "not found": with either rule the
# 0.5B default model answered "[1]", "[1] [2]" or listed the passages' headers in
# place of an answer (9 of 36 bench-qa answers), or answered "not found" with the
# answer in passage [1] (docs/lab/answers-bench-qa.md). Which passages an answer
# drew on is found after it (`attribute`), by the words they share.
SYSTEM_PROMPT = (
    "Answer the user's question from the numbered passages of their documents. "
    "Quote names, commands, options and numbers exactly as the passages write them."
)

# A citation is supported when its passage holds at least this share of the cited
# sentence's key words.
SUPPORT_SHARE = 0.5

_CITATION = re.compile(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]")
_KEY_WORD = re.compile(r"[a-z][a-z0-9_]{3,}|\d+(?:[.,]\d+)*")
_STOP = frozenset(
    """about above after again against also among another answer based been before being below between both
    cannot could does doing done down during each either else even every from further given have having here
    however into itself just more most much must need only other over passage passages same should since some
    such than that their them then there these they this those through under until upon used uses using very
    were what when where whether which while will with within without would your""".split()
)
_NOT_FOUND_PATTERNS = re.compile(
    r"not found in (these|the) documents|(passages|documents|context|text) (do|does) not (contain|mention|say|provide|include|specify)"
    r"|no (information|mention) (about|of|on)|(is|are) not (mentioned|specified|provided|given|stated)|cannot (find|answer|be answered)"
    r"|can't (find|answer)|does not (appear|say)|not (able|possible) to (find|answer|determine)|there is no (information|mention)",
    re.IGNORECASE,
)


@dataclass
class Source:
    """One numbered passage of the context."""

    number: int
    entry: int  # document index in the scope
    start: int  # characters in the document's text
    end: int
    title: str
    page_label: str | None
    text: str
    score: float  # retrieval score (BM25), for ordering and display
    page_index: int | None = None


def reading_order(sources: Sequence[Source]) -> list[Source]:
    """The order the reader sees the passages in: the best (number 1) last, next to
    the question. On all 138 bench qa questions the 0.5B default model scored 56.9%
    so against 53.5% with the best first (36-question subset: 51.1% against 45.9%;
    docs/lab/answers-bench-qa.md)."""
    return sorted(sources, key=lambda source: source.number, reverse=True)


def context_text(sources: Sequence[Source]) -> str:
    """The numbered passages as the reader sees them, in `reading_order`."""
    parts = []
    for source in reading_order(sources):
        where = source.title or "document"
        if source.page_label:
            where += f", page {source.page_label}"
        parts.append(f"Passage {source.number} ({where}):\n{source.text.strip()}")
    return "\n\n".join(parts)


@dataclass(frozen=True)
class Turn:
    """One earlier exchange of a conversation: the question asked and the answer given."""

    question: str
    answer: str


# Tokens of earlier turns the reader's prompt holds (newest kept, oldest dropped first):
# room for two or three short answers beside the five passages.
HISTORY_TOKENS = 1024


def without_citations(text: str) -> str:
    """An earlier answer as the reader wrote it: its [n] markers removed (they number
    another answer's passages), and RESTATED, which the answerer added (left in, it
    turned a follow-up's right answer into one more restatement)."""
    return re.sub(r"\s*" + _CITATION.pattern, "", text.replace(RESTATED, "")).strip()


def recent_turns(history: Sequence[Turn], budget: int, count_tokens) -> list[Turn]:
    """The newest turns whose questions and answers fit in `budget` tokens, oldest first."""
    kept: list[Turn] = []
    used = 0
    for turn in reversed(history):
        turn = Turn(turn.question.strip(), without_citations(turn.answer))
        used += count_tokens(turn.question) + count_tokens(turn.answer)
        if used > budget:
            break
        kept.append(turn)
    return kept[::-1]


def grounded_messages(question: str, sources: Sequence[Source], history: Sequence[Turn] = ()) -> list[dict]:
    """Chat messages for the reader: the rules, the conversation's earlier turns (as
    they were asked and answered, without their passages), then the passages and
    the question. The turns as chat messages, not as "Earlier question/answer" lines
    before the question: 53.8% against 42.3% on bench qa's 26 follow-ups."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for turn in history:
        messages += [{"role": "user", "content": turn.question}, {"role": "assistant", "content": turn.answer}]
    user = f"Passages:\n\n{context_text(sources)}\n\nQuestion: {question.strip()}"
    return messages + [{"role": "user", "content": user}]


def key_words(text: str) -> set[str]:
    return {w for w in _KEY_WORD.findall(text.lower()) if w not in _STOP}


@dataclass
class Citation:
    number: int
    claim: str  # the sentence (up to the marker) that cites it
    supported: bool


def citations(answer: str, sources: Sequence[Source]) -> list[Citation]:
    """Every [n] (or [n, m]) of `answer`, in order, each checked against passage n.
    A number with no passage is unsupported."""
    by_number = {s.number: s for s in sources}
    found: list[Citation] = []
    for match in _CITATION.finditer(answer):
        # The claim: the text since the previous sentence end or citation.
        before = answer[: match.start()]
        cut = max(before.rfind(". "), before.rfind("\n"), before.rfind("]"))
        claim = before[cut + 1 :].strip()
        words = key_words(claim)
        for number in (int(n) for n in re.split(r"\s*[,;]\s*", match.group(1))):
            source = by_number.get(number)
            if source is None:
                found.append(Citation(number, claim, False))
                continue
            have = key_words(source.text)
            supported = not words or len(words & have) >= SUPPORT_SHARE * len(words)
            found.append(Citation(number, claim, supported))
    return found


def attribute(answer: str, sources: Sequence[Source]) -> list[Citation]:
    """The passages an answer drew on, found after it: each sentence of the answer
    (with key words) is credited to the passage holding most of its key words, where
    that passage holds at least SUPPORT_SHARE of them; a sentence no passage
    supports is listed unsupported, credited to the passage that comes closest."""
    found: list[Citation] = []
    have = [key_words(s.text) for s in sources]
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", answer):
        words = key_words(sentence)
        if not words or not sources:
            continue
        shares = [len(words & h) / len(words) for h in have]
        best = max(range(len(sources)), key=lambda i: shares[i])
        found.append(Citation(sources[best].number, sentence.strip(), shares[best] >= SUPPORT_SHARE))
    return found


# A name in a question: a word written with a capital (not the question's first word
# or a sentence's), or with a capital, digit or underscore inside (gpuArray, RWF_APPEND,
# HTTP2), or a dotted or hyphenated run of such parts (os.urandom, SHA-256).
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:[.-][A-Za-z0-9_]+)*")
_NAME_PART = re.compile(r"[A-Za-z0-9_]{3,}")


def question_names(question: str) -> list[str]:
    """The names a question asks about (see _NAME), in order, without repeats."""
    found: list[str] = []
    for match in _NAME.finditer(question):
        word = match.group(0).rstrip(".-")
        before = question[: match.start()].rstrip()
        opens = not before or before[-1] in ".?!:;\"'(“"
        inner = any(c.isupper() or c.isdigit() or c == "_" for c in word[1:])
        if (inner or (word[0].isupper() and not opens)) and len(word) >= 3 and word not in found:
            found.append(word)
    return found


def missing_names(question: str, texts: Sequence[str]) -> list[str]:
    """The question's names that none of `texts` (lowercase) mention: a name is
    mentioned where it appears whole, or where each of its parts of three or more
    characters appears (SHA-family: "sha" and "family"), ignoring case."""
    missing = []
    for name in question_names(question):
        lowered = name.lower()
        if any(lowered in text for text in texts):
            continue
        parts = [p.lower() for p in _NAME_PART.findall(name)]
        if not parts or not all(any(p in text for text in texts) for p in parts):
            missing.append(name)
    return missing


def not_mentioned(names: Sequence[str], titles: Sequence[str] | None = None) -> str:
    """The answer to a question about names the documents never mention; `titles`:
    the documents that were asked, where they are not all of the scope's."""
    quoted = ", ".join(f"“{n}”" for n in names)
    if titles:
        return (f"{NOT_FOUND} The ones that match the question ({'; '.join(titles)}) never mention {quoted}. "
                "The closest passages are listed as evidence.")
    return f"{NOT_FOUND} They never mention {quoted}. The closest passages are listed as evidence."


# An answer that only says the question again ("The psql meta-command lists the server
# configuration parameters that are set to non-default values.") is no answer: on bench
# qa 7 of the default reader's 138 answers did (each question's own documents), every
# one scored 0, and 2 of them were to questions the documents cannot answer; no answer
# that scored was caught (docs/lab/answers-bench-qa.md). Such an answer is kept and
# followed by RESTATED, so it counts as "not found". Its terms keep a name whole
# ("octave-workspace"): `key_words` splits it, and the right answer "octave-workspace"
# to a question about Octave's workspace file would have said nothing new.
RESTATED = (f"{NOT_FOUND} The answer above only restates the question: the passages read do not seem to "
            "hold it. The closest passages are listed as evidence.")
_ANSWER_TERM = re.compile(r"[a-z0-9][a-z0-9_.\-/:\\]*[a-z0-9]|[a-z0-9]")
_ANSWERING = frozenset("yes no not never none".split())
# Short words that say nothing new (the longer ones are _STOP).
_FUNCTION_WORDS = frozenset(
    """a an and are as at be but by can did do for had has he her his i if in is it its me my of on or our
    she so the to us was we who why you""".split()
)
_CHOICE = re.compile(r"\b(or|whether)\b", re.IGNORECASE)


def _answer_terms(text: str) -> set[str]:
    return set(_ANSWER_TERM.findall(text.lower()))


def restates_question(answer: str, question: str) -> bool:
    """Whether `answer` says nothing that `question` did not: none of its terms (runs
    of letters and digits, with _ . - / : \\ inside, lowercase) is new, leaving out
    common words (_STOP, _FUNCTION_WORDS); yes, no, not, never and none count as new.
    A question that offers a choice ("… or …", "whether") is never restated: its
    answer is one of its own words."""
    if not answer.strip() or _CHOICE.search(question):
        return False
    new = _answer_terms(answer) - _answer_terms(question)
    return not any(term in _ANSWERING or (term not in _STOP and term not in _FUNCTION_WORDS) for term in new)


def says_not_found(answer: str) -> bool:
    """Whether an answer says the documents do not hold what was asked."""
    return bool(_NOT_FOUND_PATTERNS.search(answer))
