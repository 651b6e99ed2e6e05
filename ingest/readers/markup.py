"""HTML/XHTML → readable text with block-level line breaks, shared by the HTML and
EPUB readers.

Built on the standard library's tolerant `html.parser`, so real-world tag soup
(unclosed <p>, stray end tags) reads as a browser would show it, not as an XML
error. Whitespace follows HTML's rendering rules (CSS `white-space: normal`: runs
collapse to one space) except inside <pre>. Block elements end a paragraph (a blank
line), <br>, list items and table rows end a line; <script>, <style>, <template>
and <noscript> are not visible text and are skipped.

Reference: WHATWG HTML, §15.3 "Rendering — non-replaced elements" for which
elements are blocks; §13.2 for the parsing model html.parser approximates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

_BLOCK = {
    "address", "article", "aside", "blockquote", "body", "caption", "center", "dd", "details", "dialog",
    "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5",
    "h6", "header", "hgroup", "hr", "html", "legend", "main", "nav", "ol", "p", "pre", "section", "summary",
    "table", "tbody", "tfoot", "thead", "ul",
}
_LINE = {"br", "li", "tr", "option"}
_CELL = {"td", "th"}
_HIDDEN = {"script", "style", "template", "noscript", "head"}
_HEADING = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_WHITESPACE = re.compile(r"[ \t\n\r\f]+")


@dataclass
class Heading:
    level: int  # 1 for <h1> … 6 for <h6>
    title: str
    offset: int  # where the heading's text starts in MarkupText.text


@dataclass
class MarkupText:
    text: str
    title: str | None = None  # <title>
    headings: list[Heading] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)  # <meta name=… content=…>, names lower-cased


class _Extractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.pieces: list[str] = []
        self.length = 0
        self.pending_breaks = 0  # line breaks owed before the next visible text
        self.hidden_depth = 0
        self.pre_depth = 0
        self.in_title = False
        self.title_parts: list[str] = []
        self.heading: tuple[int, list[str], int | None] | None = None
        self.headings: list[Heading] = []
        self.meta: dict[str, str] = {}

    def _owe(self, breaks: int) -> None:
        self.pending_breaks = max(self.pending_breaks, breaks)

    def _ends_with_space(self) -> bool:
        return bool(self.pieces) and self.pieces[-1][-1:] in (" ", "\n")

    def _emit(self, text: str) -> None:
        if self.pending_breaks and self.pieces:
            if self.pieces[-1].endswith(" "):
                trimmed = self.pieces[-1].rstrip(" ")
                self.length -= len(self.pieces[-1]) - len(trimmed)
                self.pieces[-1] = trimmed
            self.pieces.append("\n" * self.pending_breaks)
            self.length += self.pending_breaks
        if (self.pending_breaks or not self.pieces or self._ends_with_space()) and not self.pre_depth:
            text = text.lstrip(" ")
        self.pending_breaks = 0
        if not text:
            return
        if self.heading is not None and self.heading[2] is None:
            self.heading = (self.heading[0], self.heading[1], self.length)
        self.pieces.append(text)
        self.length += len(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "meta":
            values = dict(attrs)
            name = values.get("name") or values.get("property")
            if name and values.get("content"):
                self.meta.setdefault(name.lower(), values["content"] or "")
            return
        if tag == "title" and not self.title_parts:
            self.in_title = True
            return
        if tag in _HIDDEN:
            if tag != "head":
                self.hidden_depth += 1
            return
        if tag == "pre":
            self.pre_depth += 1
        if tag in _HEADING:
            self._owe(2)
            self.heading = (_HEADING[tag], [], None)
        elif tag in _BLOCK:
            self._owe(2)
        elif tag in _LINE:
            if tag == "br":
                # Each <br> is a line break of its own, up to one blank line.
                self.pending_breaks = min(2, self.pending_breaks + 1) if self.pieces else 0
            else:
                self._owe(1)
        elif tag in _CELL and self.pieces and not self._ends_with_space() and not self.pending_breaks:
            self._emit(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
            return
        if tag in _HIDDEN:
            if tag != "head" and self.hidden_depth:
                self.hidden_depth -= 1
            return
        if tag == "pre" and self.pre_depth:
            self.pre_depth -= 1
        if tag in _HEADING and self.heading is not None:
            level, parts, offset = self.heading
            title = " ".join("".join(parts).split())
            if title and offset is not None:
                self.headings.append(Heading(level, title, offset))
            self.heading = None
            self._owe(2)
        elif tag in _BLOCK:
            self._owe(2)
        elif tag in _LINE and tag != "br":
            self._owe(1)

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title_parts.append(data)
            return
        if self.hidden_depth:
            return
        text = data.replace("\r\n", "\n") if self.pre_depth else _WHITESPACE.sub(" ", data)
        if not text.strip(" ") and not self.pre_depth:
            # Inter-element whitespace matters only between two inline runs.
            if self.pieces and not self.pending_breaks and not self._ends_with_space():
                self._emit(" ")
            return
        if self.heading is not None:
            self.heading[1].append(text)
        self._emit(text)


def extract_markup(source: str) -> MarkupText:
    """Visible text, title, headings and <meta> of an HTML or XHTML document."""
    parser = _Extractor()
    parser.feed(source)
    parser.close()
    text = "".join(parser.pieces).rstrip()
    title = " ".join("".join(parser.title_parts).split()) or None
    headings = [heading for heading in parser.headings if heading.offset < len(text)]
    return MarkupText(text=text, title=title, headings=headings, meta=parser.meta)


_XML_ENCODING = re.compile(rb"""^\s*<\?xml[^>]*encoding=["']([A-Za-z0-9._-]+)["']""")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset=["']?([A-Za-z0-9._-]+)""", re.IGNORECASE)


def decode_markup(data: bytes) -> str:
    """Decode HTML/XHTML bytes: BOM, then the declared encoding, then UTF-8, then cp1252."""
    for bom, encoding in ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if data.startswith(bom):
            return data[len(bom):].decode(encoding, errors="replace")
    head = data[:2048]
    declared = _XML_ENCODING.match(head) or _META_CHARSET.search(head)
    if declared:
        try:
            return data.decode(declared.group(1).decode("ascii"), errors="replace")
        except LookupError:
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")
