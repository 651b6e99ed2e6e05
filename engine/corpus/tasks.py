"""Whole-document tasks: what a question's five passages cannot do.

- `find_all`: every sentence of the scope that mentions a term (exhaustive, not
  top-k): the term's words in order, each word matched by its Snowball stem
  ("interrupt" meets "interrupts", "interrupted" and "interruption"; "injun" does
  not meet "injunction"), and for a term of several words also any sentence holding
  all of them.
- `summarise`: a document or a page range, read part by part into notes, each citing
  its part; where the notes outgrow one prompt, groups of them are combined a level
  up (a hierarchy), each citing the pages it covers.
- `compare`: two or more documents on one topic: each document's passages on it,
  read side by side and numbered, and an answer that cites them.

Each streams the engine's events (Token, Evidence, TaskProgress, TaskStats), stops on
`cancel` and keeps what it has: a cancelled summary ends with the notes made so far.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.corpus.answer import key_words
from engine.corpus.build import CorpusDocument
from engine.corpus.passages import stems, terms

# Characters searched either side of a mention for its sentence's ends.
SENTENCE_REACH = 400
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)]*\s+|\n\s*\n")


@dataclass
class TaskProgress:
    """Parts done of a whole-document task, and the time left at the pace so far."""

    stage: str  # "finding", "reading", "combining"
    done: int
    total: int
    eta_seconds: float | None = None
    working: int = 1  # parts in hand from `done` on (read together, TASK_BATCH)


@dataclass
class TaskStats:
    task: str
    documents: int = 0
    characters_read: int = 0
    parts: int = 0
    found: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    cancelled: bool = False
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Mention:
    """A sentence of a document that mentions the term."""

    entry: int  # document index in the scope
    start: int  # characters in the document's text
    end: int
    page_index: int | None
    page_label: str | None


def _sentence(text: str, start: int, end: int) -> tuple[int, int]:
    """The sentence around [start, end): back to the previous sentence end, on to the next."""
    lo = max(0, start - SENTENCE_REACH)
    before = list(_SENTENCE_END.finditer(text, lo, start))
    first = before[-1].end() if before else (0 if lo == 0 else text.find(" ", lo, start) + 1 or lo)
    after = _SENTENCE_END.search(text, end, min(len(text), end + SENTENCE_REACH))
    last = after.start() if after else min(len(text), end + SENTENCE_REACH)
    if not after and last < len(text):
        space = text.rfind(" ", end, last)
        last = space if space > end else last
    return first, last


def mention_spans(text: str, term: str) -> list[tuple[int, int]]:
    """Character spans in `text` where `term` occurs: its words in order (anything but
    letters and digits between them), each word equal to the term's word by stem."""
    wanted = stems(term)
    if not wanted:
        return []
    plain = terms(term)
    # Candidates by prefix (the shorter of the word and its stem), then checked by stem.
    parts = [re.escape(min(w, s, key=len)) + r"[a-z0-9]*" for w, s in zip(plain, wanted)]
    pattern = re.compile(r"(?<![a-z0-9])" + r"[^a-z0-9]{1,4}".join(f"({p})" for p in parts) + r"(?![a-z0-9])")
    lowered = text.lower()
    found = []
    for match in pattern.finditer(lowered):
        if stems(" ".join(match.groups())) == wanted:
            found.append(match.span())
    return found


def find_mentions(documents: Sequence[CorpusDocument], term: str,
                  cancel: Callable[[], bool] | None = None) -> list[Mention]:
    """Every sentence of `documents` that mentions `term` (module docstring), in
    document order, each once."""
    wanted = stems(term)
    mentions: list[Mention] = []
    for entry, document in enumerate(documents):
        if cancel is not None and cancel():
            break
        text = document.text
        spans = [_sentence(text, s, e) for s, e in mention_spans(text, term)]
        if len(set(wanted)) > 1:  # every content word in one sentence, in any order
            first_word = mention_spans(text, term.split()[0]) if term.split() else []
            for s, e in first_word:
                lo, hi = _sentence(text, s, e)
                if set(wanted) <= set(stems(text[lo:hi])):
                    spans.append((lo, hi))
        for lo, hi in sorted(set(spans)):
            last = mentions[-1] if mentions else None
            if last is not None and last.entry == entry and lo < last.end:
                # The same sentence, or one overlapping it (sentence ends are guesses): one span.
                if hi > last.end:
                    mentions[-1] = Mention(entry, last.start, hi, last.page_index, last.page_label)
                continue
            mentions.append(Mention(entry, lo, hi, *document.page_at(lo)))
    return mentions


def eta(started: float, done: int, total: int) -> float | None:
    """Seconds left at the pace so far (None before the first part is done)."""
    if done <= 0:
        return None
    return (time.perf_counter() - started) / done * (total - done)


# -- the tasks, run by Answerer (engine/corpus/answerer.py) ------------------------

# Summaries: words per part read at once (about 650 tokens of English prose; 1,000-word
# parts gave notes with a quarter of the key points, docs/lab/conversations-and-tasks.md), the tokens
# each part's notes may take, the most points a summary gives (more notes are combined
# a level up) and the most notes combined into one. Tom Sawyer whole (141 notes): 4
# points made of about 35 notes each named 25% of the book's key points, 24 points of
# 6 notes each 58.3% (docs/lab/conversations-and-tasks.md).
PART_WORDS = 500
NOTE_TOKENS = 100
SUMMARY_POINTS = 24
COMBINE_GROUP = 8
# Parts (and groups of notes) read together: a local reader decodes them as one batch
# (engine.generate.generate_batch). On the 2-core box the 0.5B default decoded 40
# tok/s alone, 96 as 4 sequences, 118 as 8 and 100 as 12
# (docs/lab/conversations-and-tasks.md).
TASK_BATCH = 8
# Comparisons: passages read per document.
COMPARE_PASSAGES = 3

NOTE_PROMPT = (
    "Write the key points of this part of a document as two to four short sentences: "
    "who or what, what happens or is said, with names and numbers as the text writes them. "
    "Use only the text."
)


def _whole_sentences(text: str) -> str:
    """`text` without a last sentence cut off by the token limit (kept if it is all)."""
    text = " ".join(text.split())
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    if text and text[-1] not in ".!?\"”" and cut > 0:
        return text[: cut + 1]
    return text


_NOTE_PREAMBLE = re.compile(
    r"^(?:here are )?(?:the )?(?:key|main) points(?: of| from| in)?[^:]{0,80}?(?: are| is)?:\s*", re.IGNORECASE)
_NOTE_BULLET = re.compile(r"(?:^|(?<=\s))[-*•]\s+(?=[A-Z`\"“'(])")
_NOTE_NUMBER = re.compile(r"(?:^|(?<=\s))(\d{1,2})\.(?:\s+(?=[A-Z`\"“'(])|$)")


def _clean_note(text: str) -> str:
    """A note as prose: without the reader's "The key points of this part of the
    document are:" and its list markers ("1. … 2. …", "- …"), which a summary made of
    notes repeated at every part, and without a marker left alone at the end by the
    token limit. Numbers are markers only as a run 1., 2., 3. … that starts the note
    or follows a colon, so "The default is 2. The maximum …" keeps its 2. A note that
    is nothing but the preamble stays. Sentences that repeat an earlier one go
    (`_without_repeats`)."""
    cleaned = _NOTE_BULLET.sub("", _NOTE_PREAMBLE.sub("", text.strip()))
    pieces, last, expected = [], 0, 1
    for match in _NOTE_NUMBER.finditer(cleaned):
        # The run starts at the note's start or after a colon: "Set it in 1. First …" is no list.
        before = cleaned[: match.start()].rstrip()
        if int(match.group(1)) == expected and (expected > 1 or not before or before.endswith(":")):
            pieces.append(cleaned[last : match.start()])
            last, expected = match.end(), expected + 1
    cleaned = " ".join("".join(pieces + [cleaned[last:]]).split())
    cleaned = _without_repeats(re.sub(r"\s+[-*•]$", "", cleaned).strip())
    return cleaned or text


# A sentence of a note repeats an earlier one when it has at least REPEAT_WORDS key
# words (answer.key_words: words of four letters or more and numbers, less common
# words) and REPEAT_SHARE of them are in that earlier sentence: it adds nothing to it.
REPEAT_WORDS = 3
REPEAT_SHARE = 0.8
# A note's loop that changes the end of each round ("The circus that comes along is
# going to …", "The circus that comes along will …") keeps two sentences that begin
# with the same FRAME_WORDS words, not a third.
FRAME_WORDS = 5
FRAME_TIMES = 2
# A sentence: up to a full stop, "!" or "?" (and closing quotes) before a space, or the end.
_SENTENCE = re.compile(r".+?(?:(?<=[.!?])[\"'”’)]*(?=\s|$)|$)")


def _without_repeats(text: str) -> str:
    """`text` without the sentences that say again what an earlier sentence said:
    the 0.5B reader's notes loop by rounds that change a word or two ("He is trying to
    buy the boys because he is feeling very sad and tired. … Jim is trying to buy the
    Boys because he is feeling very sad."), which the repetition guards let through,
    and a summary's combined points carried them on. Sentences that share a frame but
    not their facts ("The vector of positive integral quantities …", "The vector of
    character strings …") stay."""
    kept: list[set[str]] = []
    frames: dict[tuple[str, ...], int] = {}
    out = []
    for match in _SENTENCE.finditer(text):
        sentence = match.group(0).strip()
        if not sentence:
            continue
        words = key_words(sentence)
        if len(words) >= REPEAT_WORDS and any(len(words & seen) >= REPEAT_SHARE * len(words) for seen in kept):
            continue
        opening = tuple(re.findall(r"\w+", sentence.lower())[:FRAME_WORDS])
        if len(opening) == FRAME_WORDS:
            if frames.get(opening, 0) >= FRAME_TIMES:
                continue
            frames[opening] = frames.get(opening, 0) + 1
        kept.append(words)
        out.append(sentence)
    return " ".join(out)


def _quote(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def find_all(term: str, documents: Sequence[CorpusDocument], cancel: Callable[[], bool] | None = None):
    """Every sentence that mentions `term`, as a Markdown list streamed as Token text,
    then each as Evidence (numbered, cited), then TaskStats. No model is needed."""
    from engine.corpus.answerer import Evidence
    from engine.generate import Token

    started = time.perf_counter()
    yield TaskProgress("finding", 0, len(documents))
    mentions = find_mentions(documents, term, cancel)
    cancelled = bool(cancel is not None and cancel())
    in_documents = len({m.entry for m in mentions})
    if not mentions:
        yield Token(-1, f"No sentence in {len(documents)} document(s) mentions “{term}”.")
    else:
        yield Token(-1, f"**{len(mentions)} sentence(s) mention “{term}”** in {in_documents} of {len(documents)} document(s).\n")
        for number, m in enumerate(mentions, 1):
            document = documents[m.entry]
            where = f"*{document.title}*" + (f", p. {m.page_label}" if m.page_label else "")
            quote = _quote(document.text[m.start:m.end])
            if not quote.startswith(('"', "“", "'")):  # the book's own quotation marks stay as they are
                quote = f"“{quote}”"
            yield Token(-1, f"\n{number}. {where}: {quote} [{number}]")
    for number, m in enumerate(mentions, 1):
        document = documents[m.entry]
        yield Evidence(document.doc_id, document.title, m.page_label, m.page_index, m.start, m.end,
                       document.text[m.start:m.end], 1.0 / len(mentions), number=number, cited=True, supported=True)
    yield TaskStats("find-all", documents=len(documents), characters_read=sum(len(d.text) for d in documents),
                    found=len(mentions), seconds=time.perf_counter() - started, cancelled=cancelled,
                    extra={"documents_with_mentions": in_documents})


def parse_pages(text: str) -> tuple[int | None, int | None]:
    """"3-10" -> (3, 10); "7" -> (7, 7); "5-" -> (5, None); "" -> (None, None)."""
    text = text.strip().replace("–", "-").replace(" ", "")
    if not text:
        return None, None
    first, dash, last = text.partition("-")
    try:
        lo = int(first) if first else None
        hi = int(last) if last else (None if dash else lo)
    except ValueError:
        raise ValueError(f"pages “{text}”: write a range like 3-10") from None
    if (lo is not None and lo < 1) or (lo is not None and hi is not None and hi < lo):
        raise ValueError(f"pages “{text}”: write a range like 3-10, first page first")
    return lo, hi


def page_range(document: CorpusDocument, first: int | None, last: int | None) -> tuple[int, int]:
    """Characters of pages `first`..`last` (1-based, inclusive; None: the ends)."""
    if not document.pages or (first is None and last is None):
        return 0, len(document.text)
    count = len(document.pages)
    lo = max(1, first or 1)
    hi = min(count, last or count)
    if lo > hi:
        raise ValueError(f"pages {first}–{last}: the document has {count} page(s)")
    start = document.pages[lo - 1][0]
    end = document.pages[hi][0] if hi < count else len(document.text)
    return start, end


def _where(document: CorpusDocument, note: _Note) -> str:
    label = _label_span(document, note.start, note.end)
    if label is None:
        return f"part {note.number}"
    return f"pages {label}" if "–" in label else f"page {label}"


@dataclass
class _Note:
    number: int
    start: int  # characters of the document it covers
    end: int
    text: str


def _label_span(document: CorpusDocument, start: int, end: int) -> str | None:
    if not document.pages:
        return None
    first, last = document.page_at(start)[1], document.page_at(max(start, end - 1))[1]
    return first if first == last else f"{first}–{last}"


def summarise(reader, document: CorpusDocument, params, *, first_page: int | None = None, last_page: int | None = None,
              cancel: Callable[[], bool] | None = None):
    """Map the page range part by part into notes and give the notes, in order, each
    citing its part; where there are more than SUMMARY_POINTS, groups of consecutive
    notes (as few to a group as that allows, at most COMBINE_GROUP) are combined a
    level up first (each citing its parts' pages). Notes stream as they
    are written when no combining will be needed. Cancelled: the notes so far.

    Why notes rather than one combined paragraph: on bench tasks' three page ranges
    the 0.5B default model's notes on 500-word parts held 64.4% of the key points and
    its paragraph written from them 41.2% (1,000-word parts: 15.3%); see
    docs/lab/conversations-and-tasks.md, "Figures as recorded in BENCHMARKS.md"."""
    from dataclasses import replace

    from engine.corpus.answerer import Evidence
    from engine.corpus.passages import word_spans
    from engine.generate import GenerationStats, Token

    started = time.perf_counter()
    lo, hi = page_range(document, first_page, last_page)
    spans = [(lo + s, lo + e) for s, e in word_spans(document.text[lo:hi], PART_WORDS, 0)]
    stats = TaskStats("summarise", documents=1, characters_read=hi - lo, parts=len(spans))
    note_params = replace(params, max_new_tokens=NOTE_TOKENS, no_repeat_ngram=params.no_repeat_ngram or 6)
    notes: list[_Note] = []
    stream_now = len(spans) <= SUMMARY_POINTS  # the notes will be the result as they are
    title = f"**{document.title}**" + (f", pages {_label_span(document, lo, hi)}" if document.pages else "")

    def generate(conversations: list[list[dict]], sampling) -> list[str | None]:
        """Each conversation's reply, None for one that a cancel cut short or never began."""
        runs = [GenerationStats() for _ in conversations]
        texts = reader.chat_batch(conversations, sampling, cancel=cancel, stats=runs)
        stats.prompt_tokens += sum(r.prompt_tokens for r in runs)
        stats.generated_tokens += sum(r.generated_tokens for r in runs)
        return [None if run.finish_reason in ("cancelled", "") else _clean_note(_whole_sentences(text))
                for text, run in zip(texts, runs)]

    def part(number: int, start: int, end: int) -> list[dict]:
        # The part's number and pages, not the document's title: given "Part 4 of “The
        # Adventures of Tom Sawyer”", the 0.5B default wrote what it knew of the title
        # ("Tom Sawyer is a retired artist who works in the sun"); without it, notes on
        # the same parts kept to their text, with the same key points covered.
        where = _label_span(document, start, end)
        heading = f"Part {number}" + (f" (pages {where})" if where else "")
        return [{"role": "system", "content": NOTE_PROMPT},
                {"role": "user", "content": f"{heading}:\n\n{document.text[start:end].strip()}"}]

    if stream_now and spans:
        yield Token(-1, f"{title}, part by part:\n")
    for first in range(0, len(spans), TASK_BATCH):
        batch = spans[first : first + TASK_BATCH]
        yield TaskProgress("reading", first, len(spans), eta(started, first, len(spans)), working=len(batch))
        if cancel is not None and cancel():
            break
        texts = generate([part(first + k + 1, s, e) for k, (s, e) in enumerate(batch)], note_params)
        stopped = cancel is not None and cancel()
        for k, ((s, e), text) in enumerate(zip(batch, texts)):
            if text is None:  # cancelled before this part's note was done: the notes so far are whole ones
                break
            notes.append(_Note(first + k + 1, s, e, text))
            if stream_now:
                yield Token(-1, f"\n- {text} [{first + k + 1}]")
        if stopped or len(notes) < first + len(batch):
            break
    cancelled = len(notes) < len(spans)
    # Combine a level up while there are more notes than a summary gives points.
    level = notes
    levels = 1
    while not cancelled and len(level) > SUMMARY_POINTS:
        size = min(COMBINE_GROUP, -(-len(level) // SUMMARY_POINTS))
        groups = [level[i : i + size] for i in range(0, len(level), size)]
        combined = []
        for first in range(0, len(groups), TASK_BATCH):
            batch = groups[first : first + TASK_BATCH]
            yield TaskProgress("combining", first, len(groups), eta(started, len(notes) + first, len(notes) + len(groups)),
                               working=len(batch))
            if cancel is not None and cancel():
                cancelled = True
                break
            listings = ["\n\n".join(f"Note {k} ({_where(document, n)}):\n{n.text}" for k, n in enumerate(group, 1))
                        for group in batch]
            texts = generate([[{"role": "system", "content": NOTE_PROMPT},
                               {"role": "user", "content": f"Notes on consecutive parts:\n\n{listing}"}]
                              for listing in listings], replace(note_params, max_new_tokens=NOTE_TOKENS * 2))
            if any(text is None for text in texts):
                cancelled = True
                break
            combined += [_Note(len(combined) + k + 1, group[0].start, group[-1].end, text)
                         for k, (group, text) in enumerate(zip(batch, texts))]
        if cancelled:
            break
        level = combined
        levels += 1
    sources = notes if cancelled else level
    if cancelled:
        if stream_now:
            yield Token(-1, f"\n\n*Stopped after {len(notes)} of {len(spans)} parts.*")
        else:
            yield Token(-1, f"*Stopped after {len(notes)} of {len(spans)} parts; the notes so far:*\n")
            for note in notes:
                yield Token(-1, f"\n- {note.text} [{note.number}]")
    elif not stream_now:
        yield Token(-1, f"{title}, part by part:\n")
        for note in sources:
            yield Token(-1, f"\n- *{_where(document, note).capitalize()}:* {note.text} [{note.number}]")
    for n in sources:
        yield Evidence(document.doc_id, document.title, _label_span(document, n.start, n.end), document.page_at(n.start)[0],
                       n.start, n.end, document.text[n.start:n.end], 1.0 / len(sources), number=n.number, cited=True,
                       supported=True)
    stats.seconds = time.perf_counter() - started
    stats.cancelled = cancelled
    stats.extra = {"notes": [n.text for n in notes], "levels": levels if not cancelled else 1}
    yield stats
