"""Pieces every reader shares: turning raw sections into normalised `Page`s, filling
the `ExtractionReport`, splitting long text at paragraph boundaries, and progress
reporting with cancellation."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from ingest.document import PAGE_SEPARATOR, Document, OutlineEntry, Page, assign_offsets
from ingest.normalize import normalize

log = logging.getLogger(__name__)

# progress(done, total): called between pages/sections; it may raise
# ingest.errors.Cancelled to stop reading (the jobs layer does that for its cancel flag).
# A callback that also takes the keyword `what` gets a description of the step where
# the count alone would mislead ("OCR page 3 of 120" while done/total run on past
# the pages already read); `accepts_keyword(progress, "what")` tells.
Progress = Callable[[int, int], None]


def accepts_keyword(function: Callable[..., object], name: str) -> bool:
    """Whether `function` can be called with the keyword `name`."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)

SECTION_MIN_CHARS = 3000
SECTION_MAX_CHARS = 6000

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass
class Section:
    """A raw section as a reader found it, before normalisation."""

    raw: str
    title: str | None = None
    label: str | None = None
    heading_level: int | None = None  # when the section opens with a heading


def page_from_raw(section: Section, *, join_hyphens: bool = False, collapse_spaces: bool = True) -> Page:
    normalized = normalize(section.raw, join_hyphens=join_hyphens, collapse_spaces=collapse_spaces)
    return Page(
        index=0,
        text=normalized.text,
        label=section.label,
        title=section.title,
        raw_offsets=normalized.raw_offsets,
    )


def finish(document: Document, *, drop_empty: bool = True) -> Document:
    """Drop empty sections (remapping the outline), assign offsets, fill the report."""
    # A document of only empty sections keeps one, so it still has a page to show.
    if drop_empty and any(page.text for page in document.pages):
        kept: list[Page] = []
        new_index: dict[int, int] = {}
        for position, page in enumerate(document.pages):
            if page.text:
                new_index[position] = len(kept)
                kept.append(page)
            else:
                # An outline entry that pointed at an empty section points at the next kept one.
                new_index[position] = len(kept)
        dropped = len(document.pages) - len(kept)
        if dropped:
            log.debug("%s: dropped %d empty sections", document.path, dropped)
        document.outline = [
            OutlineEntry(entry.title, _remap(entry.page_index, new_index, len(kept)), entry.level)
            for entry in document.outline
        ]
        document.pages = kept
    assign_offsets(document.pages)
    report = document.report
    report.pages = len(document.pages)
    report.chars_per_page = [len(page.text) for page in document.pages]
    report.characters = sum(report.chars_per_page) + max(0, len(document.pages) - 1) * len(PAGE_SEPARATOR)
    return document


def _remap(index: int | None, mapping: dict[int, int], count: int) -> int | None:
    if index is None or index not in mapping:
        return None
    target = mapping[index]
    return target if target < count else (count - 1 if count else None)


def split_paragraphs(text: str, *, minimum: int = SECTION_MIN_CHARS, maximum: int = SECTION_MAX_CHARS) -> list[str]:
    """Cut `text` into pieces of about `minimum`–`maximum` characters, at paragraph
    breaks where possible, then at line breaks, then at spaces. Joining the pieces
    gives back `text` exactly."""
    if len(text) <= maximum:
        return [text]
    pieces: list[str] = []
    start = 0
    while len(text) - start > maximum:
        window = text[start : start + maximum]
        cut = _last_break(window, minimum)
        pieces.append(text[start : start + cut])
        start += cut
    pieces.append(text[start:])
    return pieces


def _last_break(window: str, minimum: int) -> int:
    """Where to cut `window`: after the last paragraph break past `minimum`, else the
    last line break, else the last space, else at its end."""
    best = 0
    for match in _PARAGRAPH_BREAK.finditer(window, minimum):
        best = match.end()
    if best:
        return best
    for separator in ("\n", " "):
        position = window.rfind(separator, minimum)
        if position >= 0:
            return position + 1
    return len(window)
