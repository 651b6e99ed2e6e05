"""EPUB reader (EPUB 2 and 3) on the standard library's zipfile and ElementTree.

Path through the container: META-INF/container.xml names the package document
(OPF); its <manifest> maps ids to files, its <spine> gives reading order (which need
not be the order of files in the archive); chapter titles come from the EPUB 3
navigation document (<nav epub:type="toc">) or else the EPUB 2 NCX. Each spine item
becomes one `Page` (a section) titled from the TOC, else from its first heading.
Metadata: dc:title, dc:creator (all, joined), dc:date.

A DRM-protected book lists its content in META-INF/encryption.xml: that raises
`EncryptedDocumentError` (font obfuscation, which encrypts fonts only, does not).

References: EPUB 3.3 (W3C Recommendation 2023), §4 "Open Container Format"
(container.xml, encryption.xml), §5 "Package document" (manifest, spine, metadata),
§7 "Navigation document"; OPF 2.0.1 §2.4.1 for the NCX.
"""

from __future__ import annotations

import logging
import posixpath
import zipfile
from pathlib import Path
from urllib.parse import unquote
from xml.etree import ElementTree

from ingest.document import Document, OutlineEntry, Page
from ingest.errors import CorruptDocumentError, EncryptedDocumentError
from ingest.readers.common import Progress, Section, finish, page_from_raw
from ingest.readers.markup import decode_markup, extract_markup

log = logging.getLogger(__name__)

CONTAINER = "META-INF/container.xml"
ENCRYPTION = "META-INF/encryption.xml"
_OPS = "http://www.idpf.org/2007/ops"
_FONT_OBFUSCATION = {"http://www.idpf.org/2008/embedding", "http://ns.adobe.com/pdf/enc#RC"}
_XHTML_TYPES = {"application/xhtml+xml", "text/html", "application/x-dtbook+xml"}
_NCX_TYPE = "application/x-dtbncx+xml"


def _local(tag: str) -> str:
    """Element name without its namespace: EPUBs disagree on prefixes, not on names."""
    return tag.rsplit("}", 1)[-1]


def _children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [child for child in element if _local(child.tag) == name]


def _descendants(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [node for node in element.iter() if isinstance(node.tag, str) and _local(node.tag) == name]


def _text(element: ElementTree.Element | None) -> str:
    return " ".join("".join(element.itertext()).split()) if element is not None else ""


def _parse(archive: zipfile.ZipFile, name: str, what: str) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(archive.read(name))
    except ElementTree.ParseError as error:
        raise CorruptDocumentError(f"the EPUB's {what} ({name}) is not well-formed XML: {error}") from error


def _resolve(base: str, href: str) -> str:
    """Archive path of `href` relative to the file `base`, fragment dropped."""
    target = unquote(href.split("#", 1)[0])
    return posixpath.normpath(posixpath.join(posixpath.dirname(base), target)) if target else base


def _check_drm(archive: zipfile.ZipFile, names: set[str]) -> None:
    if ENCRYPTION not in names:
        return
    root = _parse(archive, ENCRYPTION, "encryption list")
    for method in _descendants(root, "EncryptionMethod"):
        if method.get("Algorithm") not in _FONT_OBFUSCATION:
            raise EncryptedDocumentError(
                "this EPUB is DRM-protected (META-INF/encryption.xml); remove the DRM with its vendor's tool first"
            )


def _package_path(archive: zipfile.ZipFile, names: set[str]) -> str:
    if CONTAINER not in names:
        raise CorruptDocumentError(f"not a standard EPUB: {CONTAINER} is missing, so the book's package file cannot be found")
    rootfiles = _descendants(_parse(archive, CONTAINER, "container"), "rootfile")
    for rootfile in rootfiles:
        if rootfile.get("media-type", "application/oebps-package+xml") == "application/oebps-package+xml":
            full_path = rootfile.get("full-path")
            if full_path:
                if full_path not in names:
                    raise CorruptDocumentError(f"the EPUB's package file {full_path}, named in {CONTAINER}, is missing")
                return full_path
    raise CorruptDocumentError(f"{CONTAINER} names no package (.opf) file")


def _nav_titles(archive: zipfile.ZipFile, nav_path: str) -> list[tuple[str, str, int]]:
    """(archive path, title, level) of each EPUB 3 nav TOC entry, in order."""
    try:
        root = ElementTree.fromstring(archive.read(nav_path))
    except (ElementTree.ParseError, KeyError) as error:
        log.warning("EPUB nav document %s unreadable: %s", nav_path, error)
        return []
    navs = _descendants(root, "nav")
    toc = next((nav for nav in navs if "toc" in nav.get(f"{{{_OPS}}}type", "").split()), navs[0] if navs else None)
    entries: list[tuple[str, str, int]] = []

    def walk(ordered_list: ElementTree.Element, level: int) -> None:
        for item in _children(ordered_list, "li"):
            link = next((child for child in item if _local(child.tag) in ("a", "span")), None)
            if link is not None and link.get("href"):
                entries.append((_resolve(nav_path, link.get("href", "")), _text(link), level))
            for nested in _children(item, "ol"):
                walk(nested, level + 1)

    if toc is not None:
        for ordered_list in _children(toc, "ol"):
            walk(ordered_list, 0)
    return entries


def _ncx_titles(archive: zipfile.ZipFile, ncx_path: str) -> list[tuple[str, str, int]]:
    """(archive path, title, level) of each NCX navPoint, in order."""
    try:
        root = ElementTree.fromstring(archive.read(ncx_path))
    except (ElementTree.ParseError, KeyError) as error:
        log.warning("EPUB NCX %s unreadable: %s", ncx_path, error)
        return []
    entries: list[tuple[str, str, int]] = []

    def walk(parent: ElementTree.Element, level: int) -> None:
        for point in _children(parent, "navPoint"):
            label = next(iter(_descendants(point, "text")), None)
            content = next(iter(_children(point, "content")), None)
            if content is not None and content.get("src"):
                entries.append((_resolve(ncx_path, content.get("src", "")), _text(label), level))
            walk(point, level + 1)

    for nav_map in _descendants(root, "navMap"):
        walk(nav_map, 0)
    return entries


def read_epub(path: str | Path, *, progress: Progress | None = None) -> Document:
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise CorruptDocumentError(f"{path.name} is not a readable EPUB (damaged zip archive: {error})") from error
    with archive:
        names = set(archive.namelist())
        _check_drm(archive, names)
        opf_path = _package_path(archive, names)
        package = _parse(archive, opf_path, "package file")
        document = Document(path=str(path), format="epub", pages=[])

        metadata = next(iter(_descendants(package, "metadata")), None)
        if metadata is not None:
            document.title = next((_text(node) for node in _descendants(metadata, "title") if _text(node)), None)
            creators = [_text(node) for node in _descendants(metadata, "creator") if _text(node)]
            document.author = ", ".join(creators) or None
            document.date = next((_text(node) for node in _descendants(metadata, "date") if _text(node)), None)

        manifest: dict[str, tuple[str, str, str]] = {}  # id → (archive path, media type, properties)
        for item in _descendants(package, "item"):
            if item.get("id") and item.get("href"):
                manifest[item.get("id", "")] = (
                    _resolve(opf_path, item.get("href", "")),
                    item.get("media-type", ""),
                    item.get("properties", ""),
                )
        spine = next(iter(_descendants(package, "spine")), None)
        if spine is None:
            raise CorruptDocumentError(f"the EPUB's package file {opf_path} has no <spine> (reading order)")

        toc: list[tuple[str, str, int]] = []
        nav = next((entry[0] for entry in manifest.values() if "nav" in entry[2].split()), None)
        if nav and nav in names:
            toc = _nav_titles(archive, nav)
        if not toc:
            ncx_id = spine.get("toc")
            ncx = manifest[ncx_id][0] if ncx_id in manifest else None
            ncx = ncx or next((href for href, media, _ in manifest.values() if media == _NCX_TYPE), None)
            if ncx and ncx in names:
                toc = _ncx_titles(archive, ncx)
        title_of: dict[str, str] = {}
        for target, title, _level in toc:
            if title:
                title_of.setdefault(target, title)

        spine_paths: list[str] = []
        for itemref in _children(spine, "itemref"):
            entry = manifest.get(itemref.get("idref", ""))
            if entry is None:
                document.report.warnings.append(f"spine item {itemref.get('idref')!r} is not in the manifest")
                continue
            if entry[1] not in _XHTML_TYPES and not entry[0].lower().endswith((".xhtml", ".html", ".htm")):
                continue
            spine_paths.append(entry[0])

        index_of: dict[str, int] = {}
        for number, member in enumerate(spine_paths):
            index_of.setdefault(member, number)
            if member not in names:
                document.report.warnings.append(f"chapter file {member} is missing from the archive")
                document.pages.append(Page(index=number, text=""))
                continue
            markup = extract_markup(decode_markup(archive.read(member)))
            first_heading = markup.headings[0].title if markup.headings else None
            chapter_title = title_of.get(member) or first_heading or markup.title
            document.pages.append(page_from_raw(Section(markup.text, chapter_title, chapter_title)))
            if progress is not None:
                progress(number + 1, len(spine_paths))
        if not spine_paths:
            raise CorruptDocumentError(f"the EPUB's spine in {opf_path} lists no readable chapters")

        document.outline = [OutlineEntry(title, index_of.get(target), level) for target, title, level in toc if title]
        empty = sum(1 for page in document.pages if not page.text)
        if empty:
            document.report.warnings.append(f"{empty} of {len(spine_paths)} chapters have no text (images only?)")
    return finish(document)
