"""Whole-document tasks (engine/corpus/tasks.py): find-all's mentions, page ranges,
and summarise's map, combine and cancel, driven by a scripted model so the tests
check the task's bookkeeping rather than a small model's prose."""

from __future__ import annotations

import re

import pytest

from engine.corpus import tasks
from engine.corpus.build import CorpusDocument
from engine.corpus.answerer import Evidence
from engine.corpus.tasks import TaskProgress, TaskStats, find_all, find_mentions, page_range, parse_pages
from engine.generate import SamplingParams, Token

TEXT = (
    "Injun Joe ran. INJUN  JOE's knife was there. The injunction was served. "
    "Joe Harper and injun joe met.\n\nInterrupts are handled here; the interrupt handler runs. "
    "A handler for each interrupt is set up first. Nothing else happens."
)


def document(text: str = TEXT, pages: int = 2) -> CorpusDocument:
    step = len(text) // pages
    return CorpusDocument("d", text, [(i * step, str(i + 1)) for i in range(pages)], "Tale")


def test_mentions_match_words_by_stem_in_order_and_each_sentence_once():
    found = [TEXT[m.start:m.end] for m in find_mentions([document()], "Injun Joe")]
    assert found == ["Injun Joe ran.", "INJUN  JOE's knife was there.", "Joe Harper and injun joe met."]
    # "injunction" is not "injun"; "interrupts" is "interrupt".
    assert not find_mentions([document()], "injunctions joe")
    assert len(find_mentions([document()], "interrupts")) == 2
    # Several content words: also any sentence holding all of them, in any order.
    both = [TEXT[m.start:m.end] for m in find_mentions([document()], "interrupt handler")]
    assert both == ["Interrupts are handled here; the interrupt handler runs.", "A handler for each interrupt is set up first."]


def test_find_all_streams_a_numbered_list_with_evidence_per_sentence():
    docs = [document(), CorpusDocument("e", "No pirates here. Injun Joe again!", [], "Other")]
    events = list(find_all("injun joe", docs))
    text = "".join(e.text for e in events if isinstance(e, Token))
    evidence = [e for e in events if isinstance(e, Evidence)]
    stats = events[-1]
    assert isinstance(stats, TaskStats) and stats.found == 4 and stats.extra["documents_with_mentions"] == 2
    assert text.startswith("**4 sentence(s) mention “injun joe”** in 2 of 2 document(s).")
    assert [e.number for e in evidence] == [1, 2, 3, 4] and all(e.cited for e in evidence)
    assert re.search(r"\n4\. \*Other\*: “Injun Joe again!” \[4\]$", text)
    assert evidence[2].page_label == "1" and evidence[3].page_label is None
    assert "No sentence" in "".join(e.text for e in find_all("kraken", docs) if isinstance(e, Token))


def test_page_ranges():
    assert parse_pages("3-10") == (3, 10) and parse_pages(" 7 ") == (7, 7) and parse_pages("5-") == (5, None)
    assert parse_pages("") == (None, None) and parse_pages("2–4") == (2, 4)
    for bad in ("x", "0-3", "9-2"):
        with pytest.raises(ValueError):
            parse_pages(bad)
    doc = CorpusDocument("d", "aaaa" "bbbb" "cccc", [(0, "i"), (4, "ii"), (8, "1")], "T")
    assert page_range(doc, 2, 3) == (4, 12) and page_range(doc, None, 1) == (0, 4) and page_range(doc, None, None) == (0, 12)
    with pytest.raises(ValueError):
        page_range(doc, 3, 2)


class ScriptedModel:
    """Counts words as tokens; each note is "note on <first word of the part>", a
    combined note "combined <the notes' first words>"."""

    class Tokenizer:
        @staticmethod
        def encode(text: str) -> list[int]:
            return list(range(len(text.split())))

    tokenizer = Tokenizer()

    def __init__(self) -> None:
        self.prompts: list[list[dict]] = []

    def encode_chat(self, messages):
        self.prompts.append(messages)
        return list(range(sum(len(m["content"].split()) for m in messages)))

    # The reader's side (engine/reader.py): chat messages in, tokens out.
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def chat(self, messages, params, cancel=None, stats=None):
        ids = self.encode_chat(messages)
        if stats is not None:
            stats.prompt_tokens = len(ids)
        return self.stream(ids, params, cancel=cancel, stats=stats)

    def chat_batch(self, conversations, params, cancel=None, stats=None):
        """One after another, as a remote reader does; cancel checked before each."""
        stats = stats or [None] * len(conversations)
        return ["" if cancel is not None and cancel() else "".join(t.text for t in self.chat(m, params, cancel, s))
                for m, s in zip(conversations, stats)]

    def stream(self, ids, params, cancel=None, stats=None):
        user = self.prompts[-1][-1]["content"]
        if user.startswith("Notes on consecutive"):
            text = "combined " + " ".join(re.findall(r"(?:note on|combined) (\w+)", user))
        else:
            part = user.split(":\n\n", 1)[1]
            text = f"note on {part.split()[0]}"
        for n, word in enumerate(text.split(" ")):
            yield Token(n, word + " ")
        if stats is not None:
            stats.generated_tokens = len(text.split())
            stats.finish_reason = "stop"


def long_document(parts: int) -> CorpusDocument:
    """`parts` pages of PART_WORDS words each, so part n is page n."""
    pages = [" ".join(f"w{n}" for n in range(p * tasks.PART_WORDS, (p + 1) * tasks.PART_WORDS)) for p in range(parts)]
    starts = [sum(len(page) + 1 for page in pages[:p]) for p in range(parts)]
    return CorpusDocument("book", " ".join(pages), [(s, str(p + 1)) for p, s in enumerate(starts)], "Book")


def test_summarise_streams_a_note_per_part_each_citing_its_pages(monkeypatch):
    monkeypatch.setattr(tasks, "TASK_BATCH", 2)
    model = ScriptedModel()
    events = list(tasks.summarise(model, long_document(3), SamplingParams(max_new_tokens=50)))
    progress = [e for e in events if isinstance(e, TaskProgress)]
    # Parts are read two at a time: progress before each pair, with the parts in hand.
    assert [(p.stage, p.done, p.total, p.working) for p in progress] == [("reading", 0, 3, 2), ("reading", 2, 3, 1)]
    assert progress[0].eta_seconds is None and progress[1].eta_seconds is not None
    text = "".join(e.text for e in events if isinstance(e, Token))
    w = tasks.PART_WORDS
    assert text == f"**Book**, pages 1–3, part by part:\n\n- note on w0 [1]\n- note on w{w} [2]\n- note on w{2 * w} [3]"
    evidence = [e for e in events if isinstance(e, Evidence)]
    assert [(e.number, e.cited, e.page_label) for e in evidence] == [(1, True, "1"), (2, True, "2"), (3, True, "3")]
    stats = events[-1]
    assert stats.parts == 3 and len(stats.extra["notes"]) == 3 and stats.extra["levels"] == 1 and not stats.cancelled


def test_summarise_combines_a_level_up_when_the_notes_outgrow_a_prompt(monkeypatch):
    monkeypatch.setattr(tasks, "SUMMARY_POINTS", 2)  # five notes: groups of three
    model = ScriptedModel()
    events = list(tasks.summarise(model, long_document(5), SamplingParams(max_new_tokens=50)))
    stats = events[-1]
    assert stats.extra["levels"] == 2
    evidence = [e for e in events if isinstance(e, Evidence)]
    # Two combined notes (parts 1-3 and 4-5), each citing the characters of its parts.
    assert [(e.number, e.page_label) for e in evidence] == [(1, "1–3"), (2, "4–5")]
    text = "".join(e.text for e in events if isinstance(e, Token))
    w = tasks.PART_WORDS
    assert text.endswith(f"- *Pages 1–3:* combined w0 w{w} w{2 * w} [1]\n- *Pages 4–5:* combined w{3 * w} w{4 * w} [2]")


def test_a_cancelled_summary_keeps_the_notes_so_far():
    model = ScriptedModel()

    def cancel() -> bool:
        return len(model.prompts) >= 2  # after two parts

    events = list(tasks.summarise(model, long_document(4), SamplingParams(max_new_tokens=50), cancel=cancel))
    text = "".join(e.text for e in events if isinstance(e, Token))
    assert "- note on w0 [1]" in text and text.endswith("*Stopped after 2 of 4 parts.*")
    stats = events[-1]
    assert stats.cancelled and len(stats.extra["notes"]) == 2
    assert [e.number for e in events if isinstance(e, Evidence)] == [1, 2]


def test_a_note_cut_by_the_token_limit_loses_its_last_half_sentence():
    assert tasks._whole_sentences("Tom paints. Ben gives an apple. Then the") == "Tom paints. Ben gives an apple."
    assert tasks._whole_sentences("no full stop at all") == "no full stop at all"


def test_a_note_cut_short_by_cancel_is_not_kept():
    """Parts read together are cancelled together: the whole notes are kept, not the
    halves of the ones still being written."""

    class Cut(ScriptedModel):
        def chat_batch(self, conversations, params, cancel=None, stats=None):
            self.prompts += conversations
            stats[0].finish_reason, stats[1].finish_reason = "stop", "cancelled"
            return ["note on w0.", "Tom sat on a barrel in the shade, dangled his legs, m"] + [""] * (len(conversations) - 2)

    model = Cut()
    events = list(tasks.summarise(model, long_document(4), SamplingParams(max_new_tokens=50), cancel=lambda: len(model.prompts) > 0))
    text = "".join(e.text for e in events if isinstance(e, Token))
    assert "note on w0. [1]" in text and "barrel" not in text and text.endswith("*Stopped after 1 of 4 parts.*")
    assert events[-1].cancelled and events[-1].extra["notes"] == ["note on w0."]


def test_a_part_is_headed_by_its_number_and_pages_not_the_title():
    """The title made the 0.5B reader write what it knew of the book instead of the part."""
    model = ScriptedModel()
    list(tasks.summarise(model, long_document(2), SamplingParams(max_new_tokens=50)))
    firsts = [conversation[-1]["content"].split(":\n\n", 1)[0] for conversation in model.prompts]
    assert firsts == ["Part 1 (pages 1)", "Part 2 (pages 2)"]


def test_a_note_loses_the_readers_preamble_and_list_markers():
    clean = tasks._clean_note
    assert clean("The key points of this part of the document are: 1. R works on vectors. 2. Assignment "
                 "uses <-. 3.") == "R works on vectors. Assignment uses <-."
    assert clean("The key points of Part 6 are: - Lists hold anything. - Data frames are tables.") == (
        "Lists hold anything. Data frames are tables.")
    assert clean("Here are the main points: “Tom” paints.") == "“Tom” paints."
    # Numbers, options and dashes inside a sentence stay; a note that is only the preamble is kept.
    assert clean("Pi is 3.14 - roughly. Use -v or 2. as the step.") == "Pi is 3.14 - roughly. Use -v or 2. as the step."
    # A number ending a sentence is not a marker: markers run 1., 2., 3.
    assert clean("The default is 2. The maximum is 12. Set it in 1. First open the file.") == (
        "The default is 2. The maximum is 12. Set it in 1. First open the file.")
    assert clean("Steps: 1. Open it. 2. Save it.") == "Steps: Open it. Save it."
    assert clean("1. Tom paints. 2. Ben pays 4. Then he paints. 3.") == "Tom paints. Ben pays 4. Then he paints."
    assert clean("The key points of this part are:") == "The key points of this part are:"


def test_a_note_drops_the_sentences_that_say_again_what_one_before_said():
    clean = tasks._clean_note
    # From a note on Tom Sawyer's chapter II: the round that adds nothing goes, in place.
    assert clean("He is trying to buy the boys because he is feeling very sad and tired. Ben eats an apple. "
                 "Jim is trying to buy the Boys because he is feeling very sad.") == (
        "He is trying to buy the boys because he is feeling very sad and tired. Ben eats an apple.")
    assert clean("Amy Lawrence was proud and glad. Tom would not look. Amy Lawrence was proud and glad.") == (
        "Amy Lawrence was proud and glad. Tom would not look.")
    # A loop that changes each round's end: two sentences on one five-word opening, not a third.
    assert clean("The circus that comes along is a circus. The circus that comes along will save it. "
                 "The circus that comes along will marry. Then the boys sat in the shadow.") == (
        "The circus that comes along is a circus. The circus that comes along will save it. "
        "Then the boys sat in the shadow.")
    # Sentences that share a frame but not their facts stay, and so do short ones,
    # abbreviations and numbers.
    note = ("The vector of positive integral quantities is created and placed in z. The vector of character "
            "strings is created and placed in z. It returns the number of rows. It returns the number of columns. "
            "Who? Who? Mr. Walters shakes hands. Pi is 3.14 here.")
    assert clean(note) == note
