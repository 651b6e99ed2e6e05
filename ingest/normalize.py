"""Text normalisation that remembers where every character came from.

Readers hand over the *raw* text they extracted (pypdf's `extract_text()`, the text
of an XHTML chapter, a decoded TXT section); this module tidies it for reading and
for the model, and returns with it `raw_offsets`: for each output character, the
offset in the raw text it was taken from. The map lives only while a document is
read (the library stores the normalised text alone; the viewer finds a passage
again in the PDF's own text layer, app/gui/viewer.py `locate_span`).

Rules, in the order they are applied:

1. Running lines (PDF only, `find_running_lines`) are dropped: a line among the
   first or last two non-empty lines of a page whose *masked* form — digits and a
   leading or trailing lower-case roman numeral replaced by `#` — appears at the edge
   of at least three pages, and either on at least 2% of all pages or densely over
   the stretch of pages it spans (a chapter's running head): "Page 12 of 40",
   "- 7 -", "CHAPTER 3  THE SEA  47" all mask to one key per book or chapter. Also a
   first or last line that begins or ends with the page's own printed label, when at
   least 10% of pages have one ("970 dotchart" in R's reference manual).
2. Invisible characters — soft hyphen U+00AD, zero-width space/joiners, BOM, and C0
   controls other than TAB and LF — are deleted; CR LF and lone CR become LF.
3. Ligatures (ﬀ ﬁ ﬂ ﬃ ﬄ ﬅ ﬆ) are expanded; each produced letter points at the
   ligature in the raw text.
4. Hyphenation across a line end (`join_hyphens`, PDF): a hyphen that ends a line,
   follows a letter and is followed (after the next line's indentation) by a
   lower-case letter is removed together with the line break: "hyphen-\\nated" →
   "hyphenated". A line-end hyphen followed by anything else (a capital, a digit)
   is left alone. No dictionary can tell "well-\\nknown" from "hyphen-\\nated", so
   the document itself decides: a compound that also occurs with an in-line
   hyphen somewhere in the same document ("well-known") keeps its hyphen and only
   loses the line break.
5. Whitespace (`collapse_spaces`): tabs, NBSP and other Unicode spaces become a
   space; runs of spaces become one; spaces at the start and end of lines go.
   Without it (TXT, Markdown, where indentation means something) only spaces at the
   end of lines go. Always: three or more line breaks (blank lines in between) become two — at most
   one blank line — and the text is stripped at both ends.

Substitutions (rules 2–5 replacing one character by another) are listed in
`SUBSTITUTIONS`; every other output character is the raw character at its offset.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

LIGATURES: dict[str, str] = {
    "\ufb00": "ff",
    "\ufb01": "fi",
    "\ufb02": "fl",
    "\ufb03": "ffi",
    "\ufb04": "ffl",
    "\ufb05": "st",  # long s + t
    "\ufb06": "st",
}

# Horizontal whitespace other than a plain space that reads as a space.
_SPACE_LIKE = "\t\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"

# Raw character → the characters it may legitimately become in the output.
SUBSTITUTIONS: dict[str, str] = {
    **LIGATURES,
    "\r": "\n",
    **{char: " " for char in _SPACE_LIKE},
}

_INVISIBLE = re.compile("[\u00ad\u200b\u200c\u200d\u2060\ufeff\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CRLF = re.compile(r"\r\n?")
_LIGATURE = re.compile("[" + "".join(LIGATURES) + "]")
_HYPHEN_BREAK = re.compile(r"(?<=[^\W\d_])-[ \t]*\n[ \t]*(?=[^\W\d_])")
_WORD_BEFORE = re.compile(r"[^\W\d_]+$")
_WORD_AFTER = re.compile(r"[^\W\d_]+")
_INLINE_COMPOUND = re.compile(r"[^\W\d_]+-[^\W\d_]+")
# Only runs that need a change: two or more spaces, or any run holding another space.
_SPACE_RUN = re.compile(" [ " + _SPACE_LIKE + "]+|[" + _SPACE_LIKE + "][ " + _SPACE_LIKE + "]*")
_EDGE_SPACES = re.compile(r"(?m)^ +| +$")
_TRAILING_SPACES = re.compile(r"(?m)[ \t]+$")
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")

EDGE_LINES = 2  # lines at the top and at the bottom of a page checked for running lines
RUNNING_MIN_PAGES = 3
RUNNING_MIN_SHARE = 0.02
RUNNING_MIN_DENSITY = 0.25  # share of the pages in a key's span that carry it
RUNNING_LABEL_SHARE = 0.1  # share of pages whose edge line carries their own page label

_DIGITS = re.compile(r"\d+")
_ROMAN_EDGE = re.compile(r"^[ivxlcdm]+\b|\b[ivxlcdm]+$")
_LINE = re.compile(r"[^\n]*(?:\n|$)")


@dataclass
class NormalizedText:
    text: str
    # Offset in the raw text of each character of `text`; None when text == raw.
    raw_offsets: list[int] | None


class _Tracked:
    """A string with the raw offset of each of its characters, edited by regex.

    The offset list is materialised only at the first edit, so untouched text
    costs nothing; edits copy list slices (C speed), never loop per character.
    """

    def __init__(self, raw: str) -> None:
        self.text = raw
        self.offsets: list[int] | None = None

    def sub(self, pattern: re.Pattern[str], replace: Callable[[re.Match[str]], tuple[str, Sequence[int]]]) -> None:
        """Replace each match by `replace(match)` = (new text, for each new character
        the index inside the match it comes from)."""
        pieces: list[str] = []
        offsets: list[int] = []
        source = self.offsets
        position = 0
        changed = False
        for match in pattern.finditer(self.text):
            start, end = match.span()
            replacement, origins = replace(match)
            if replacement == match.group():
                continue
            changed = True
            pieces.append(self.text[position:start])
            pieces.append(replacement)
            if source is None:
                offsets.extend(range(position, start))
                offsets.extend(start + origin for origin in origins)
            else:
                offsets.extend(source[position:start])
                offsets.extend(source[start + origin] for origin in origins)
            position = end
        if not changed:
            return
        pieces.append(self.text[position:])
        if source is None:
            offsets.extend(range(position, len(self.text)))
        else:
            offsets.extend(source[position:])
        self.text = "".join(pieces)
        self.offsets = offsets

    def delete_spans(self, spans: Iterable[tuple[int, int]]) -> None:
        """Delete raw spans; only valid before any other edit."""
        assert self.offsets is None, "delete_spans works on raw positions"
        pieces: list[str] = []
        offsets: list[int] = []
        position = 0
        for start, end in sorted(spans):
            if start < position:
                start = position
            pieces.append(self.text[position:start])
            offsets.extend(range(position, start))
            position = max(position, end)
        pieces.append(self.text[position:])
        offsets.extend(range(position, len(self.text)))
        self.text = "".join(pieces)
        self.offsets = offsets

    def strip(self) -> None:
        stripped = self.text.strip()
        if len(stripped) == len(self.text):
            return
        start = len(self.text) - len(self.text.lstrip())
        end = start + len(stripped)
        self.offsets = list(range(start, end)) if self.offsets is None else self.offsets[start:end]
        self.text = stripped


def _delete(match: re.Match[str]) -> tuple[str, Sequence[int]]:
    return "", ()


def _ligature(match: re.Match[str]) -> tuple[str, Sequence[int]]:
    expanded = LIGATURES[match.group()]
    return expanded, (0,) * len(expanded)


def _crlf(match: re.Match[str]) -> tuple[str, Sequence[int]]:
    # Keep the LF of a CR LF pair; a lone CR is substituted by LF.
    return ("\n", (1,)) if len(match.group()) == 2 else ("\n", (0,))


def _first_space(match: re.Match[str]) -> tuple[str, Sequence[int]]:
    return " ", (0,)


def _two_newlines(match: re.Match[str]) -> tuple[str, Sequence[int]]:
    last = len(match.group()) - 1
    return "\n\n", (0, last)


def inline_compounds(text: str) -> set[str]:
    """Lower-cased hyphenated compounds written on one line ("well-known")."""
    return {compound.lower() for compound in _INLINE_COMPOUND.findall(text)}


def normalize(
    raw: str,
    *,
    join_hyphens: bool = False,
    collapse_spaces: bool = True,
    drop_spans: Iterable[tuple[int, int]] = (),
    keep_compounds: set[str] | frozenset[str] = frozenset(),
) -> NormalizedText:
    """Normalise `raw` by the module's rules; `drop_spans` are raw spans to delete
    first (running lines), `keep_compounds` the document's in-line compounds."""
    tracked = _Tracked(raw)
    spans = list(drop_spans)
    if spans:
        tracked.delete_spans(spans)
    tracked.sub(_CRLF, _crlf)
    tracked.sub(_INVISIBLE, _delete)
    tracked.sub(_LIGATURE, _ligature)
    if join_hyphens:
        text = tracked.text

        def join(match: re.Match[str]) -> tuple[str, Sequence[int]]:
            if not text[match.end()].islower():
                return match.group(), range(len(match.group()))
            before = _WORD_BEFORE.search(text, 0, match.start())
            after = _WORD_AFTER.match(text, match.end())
            if before and after and f"{before.group()}-{after.group()}".lower() in keep_compounds:
                return "-", (0,)
            return "", ()

        tracked.sub(_HYPHEN_BREAK, join)
    if collapse_spaces:
        tracked.sub(_SPACE_RUN, _first_space)
        tracked.sub(_EDGE_SPACES, _delete)
    else:
        tracked.sub(_TRAILING_SPACES, _delete)
    tracked.sub(_BLANK_LINES, _two_newlines)
    tracked.strip()
    if tracked.offsets is None or tracked.text == raw:
        return NormalizedText(tracked.text, None)
    assert len(tracked.offsets) == len(tracked.text)
    return NormalizedText(tracked.text, tracked.offsets)


def _mask(line: str) -> str:
    masked = _DIGITS.sub("#", line.strip().lower())
    return " ".join(_ROMAN_EDGE.sub("#", masked).split())


def _edge_lines(text: str) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """(masked key, start, end) of the first EDGE_LINES non-empty lines from the top
    and of the last EDGE_LINES from the bottom (bottom-most first)."""
    lines = [(match.start(), match.end()) for match in _LINE.finditer(text) if match.group().strip()]
    top = lines[:EDGE_LINES]
    bottom = lines[max(len(top), len(lines) - EDGE_LINES):][::-1]
    return (
        [(_mask(text[start:end]), start, end) for start, end in top],
        [(_mask(text[start:end]), start, end) for start, end in bottom],
    )


def find_running_lines(pages: Sequence[str], labels: Sequence[str | None] | None = None) -> list[list[tuple[int, int]]]:
    """For each raw page text, the spans of its running header/footer lines.

    A line further in than the page's first (or last) line counts only when the lines
    between it and the edge are running too, so a body line is never cut out from
    between a kept header and the text. With `labels` (printed page labels), a first
    or last line that begins or ends with the page's own label ("970 dotchart" on
    page 970, "dotchart 971" on 971) is a running line too when such lines occur on
    at least 10% of the pages: reference manuals title each page by its entry, so
    those headers never repeat often enough to be found by key alone."""
    edges = [_edge_lines(text) for text in pages]
    labelled = _label_lines(pages, edges, labels) if labels is not None else [[] for _ in pages]
    seen_on: dict[str, list[int]] = {}
    for index, (top, bottom) in enumerate(edges):
        for key in {key for key, _, _ in top + bottom}:
            if key:
                seen_on.setdefault(key, []).append(index)
    running: set[str] = set()
    minimum = max(RUNNING_MIN_PAGES, math.ceil(RUNNING_MIN_SHARE * len(pages)))
    for key, indexes in seen_on.items():
        count = len(indexes)
        if count < RUNNING_MIN_PAGES:
            continue
        span = indexes[-1] - indexes[0] + 1
        if count >= minimum or count >= RUNNING_MIN_DENSITY * span:
            running.add(key)
    spans: list[list[tuple[int, int]]] = []
    for top, bottom in edges:
        page_spans: list[tuple[int, int]] = []
        for side in (top, bottom):
            for key, start, end in side:
                if key not in running:
                    break
                page_spans.append((start, end))
        spans.append(sorted(set(page_spans)))
    for page_spans, extra in zip(spans, labelled):
        page_spans.extend(span for span in extra if span not in page_spans)
        page_spans.sort()
    return spans


def _label_lines(
    pages: Sequence[str],
    edges: list[tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]],
    labels: Sequence[str | None],
) -> list[list[tuple[int, int]]]:
    found: list[list[tuple[int, int]]] = []
    for text, (top, bottom), label in zip(pages, edges, labels):
        page_spans: list[tuple[int, int]] = []
        for side in (top, bottom):
            if side and label:
                _, start, end = side[0]
                words = text[start:end].split()
                if words and (words[0] == label or words[-1] == label):
                    page_spans.append((start, end))
        found.append(page_spans)
    carrying = sum(1 for page_spans in found if page_spans)
    if carrying < max(RUNNING_MIN_PAGES, math.ceil(RUNNING_LABEL_SHARE * len(pages))):
        return [[] for _ in pages]
    return found
