"""Tokenizers built from a model's own metadata, and chat templates rendered from it.

A GGUF file carries no `tokenizer.json`; it describes its tokenizer with llama.cpp's
metadata keys (`tokenizer.ggml.model`, `.tokens`, `.token_type`, `.merges`, `.scores`,
`.pre`, the special ids and `tokenizer.chat_template`; see the GGUF spec,
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md). Two families are built:

* `tokenizer.ggml.model == "gpt2"` — byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2).
  Built as a `tiktoken.Encoding` (tiktoken's BPE is the fast path): mergeable ranks are
  keyed by each token's raw bytes (the GPT-2 byte-to-unicode spelling undone) and ranked
  by the merge that first produces them, so tiktoken's "merge the lowest-ranked pair"
  loop takes the same steps as HF's merge list. The split regex comes from
  `tokenizer.ggml.pre`.
* `tokenizer.ggml.model == "llama"` — SentencePiece-style BPE with byte fallback
  (Gemma 3, Llama 2). Built with the `tokenizers` library.

Special tokens (token types CONTROL and USER_DEFINED) written in the text are encoded
as their ids, as HF tokenizers do for added tokens. `load_tokenizer` also wraps an HF
`tokenizer.json` folder in the same API. Chat templates are Jinja, rendered in a
sandbox configured like transformers' `apply_chat_template`.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from engine.errors import TokenizerError

logger = logging.getLogger(__name__)

MetaValue = str | int | float | bool | list
TokenizerMeta = Mapping[str, MetaValue]

# llama.cpp token types (gguf-py `TokenType`).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Spellings that end a turn or a document. Only tokens the vocabulary marks as special
# (CONTROL) and spells exactly like this count, so an ordinary word never stops generation.
END_OF_TURN_SPELLINGS = frozenset({
    "<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<end_of_turn>", "<|eot_id|>",
    "<|eom_id|>", "<|end|>", "<|return|>", "<EOT>", "<eos>", "</s>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
})

# Split regexes by `tokenizer.ggml.pre`, as the models' own tokenizer.json files split.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# SmolLM's tokenizer.json runs `Digits(individual_digits=True)` and then GPT-2's regex on
# each piece. One regex does the same if every digit is its own match and a digit counts
# as the end of a piece for the whitespace lookahead (`\s+(?!\S)` would otherwise leave
# the last space before a digit on its own).
_SMOLLM_SPLIT = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

PRE_TOKENIZER_SPLITS: dict[str, str] = {
    "default": _GPT2_SPLIT,
    "gpt2": _GPT2_SPLIT,
    "gpt-2": _GPT2_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "smollm": _SMOLLM_SPLIT,
}

# Used when a model ships no chat template: a plain transcript that any base model can
# continue. System text comes first, each message is "<Role>: <content>" on its own
# line, and with `add_generation_prompt` the prompt ends with "Assistant:".
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_ids: list[int]
    add_bos_default: bool
    chat_template: str | None

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...


# --- GPT-2 byte alphabet -----------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table.

    Bytes that are printable Latin-1 stand for themselves; the other 68 (controls,
    space, soft hyphen...) are moved to U+0100 onwards in byte order, so that every
    token is a visible string (space becomes "Ġ", newline "Ċ").
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


@lru_cache(maxsize=1)
def _char_to_byte() -> dict[str, int]:
    return {char: byte for byte, char in _byte_to_char().items()}


# --- shared behaviour ------------------------------------------------------------


class _TokenizerBase:
    """Attributes and chat rendering shared by both implementations."""

    vocab_size: int
    bos_id: int | None
    eos_ids: list[int]
    add_bos_default: bool
    chat_template: str | None
    bos_token: str
    eos_token: str

    def token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` with the model's template, or the plain fallback without one."""
        template = self.chat_template if self.chat_template else FALLBACK_CHAT_TEMPLATE
        return render_chat(
            template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token,
        )

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"Token id {token_id} is outside the vocabulary (size {self.vocab_size}).")


def _special_splitter(specials: Iterable[str]) -> re.Pattern[str] | None:
    """A regex that finds special-token spellings in text, longest first where they share
    a prefix (as HF's added-token matcher prefers the longest match)."""
    ordered = sorted(set(specials), key=len, reverse=True)
    if not ordered:
        return None
    return re.compile("(" + "|".join(re.escape(spelling) for spelling in ordered) + ")")


# --- byte-level BPE over tiktoken ------------------------------------------------


class ByteLevelBPETokenizer(_TokenizerBase):
    """Byte-level BPE from a vocabulary and merge list, encoded by tiktoken."""

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int] | None,
        *,
        split_regex: str,
        bos_id: int | None,
        eos_ids: list[int],
        add_bos_default: bool,
        chat_template: str | None,
    ) -> None:
        import tiktoken

        char_to_byte = _char_to_byte()
        types = list(token_types) if token_types is not None else [TOKEN_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise TokenizerError("GGUF tokenizer metadata is inconsistent: token_type and tokens differ in length.")

        # Raw bytes of every token; decoding needs them all, reachable by merges or not.
        self._bytes: list[bytes] = []
        self._specials: dict[str, int] = {}
        for token_id, (spelling, kind) in enumerate(zip(tokens, types)):
            in_alphabet = all(char in char_to_byte for char in spelling)
            if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and in_alphabet:
                # Added tokens are matched and decoded by their literal spelling.
                self._specials.setdefault(spelling, token_id)
                self._bytes.append(spelling.encode("utf-8"))
            elif in_alphabet:
                self._bytes.append(bytes(char_to_byte[char] for char in spelling))
            else:
                # A CONTROL token outside the byte alphabet is a converter mislabel; its
                # text is still what the model means by it.
                self._bytes.append(spelling.encode("utf-8"))

        id_of = {spelling: token_id for token_id, spelling in enumerate(tokens)}
        byte_to_char = _byte_to_char()
        # Each merged token is ranked by the first merge producing it, so tiktoken's
        # lowest-rank-first loop takes the merge list's steps.
        merged_ids: list[int] = []
        merged_seen: set[bytes] = set()
        skipped = 0
        for merge in merges:
            left, _, right = merge.partition(" ")
            merged_id = id_of.get(left + right)
            if merged_id is None or not right:
                skipped += 1
                continue
            if self._bytes[merged_id] not in merged_seen:
                merged_seen.add(self._bytes[merged_id])
                merged_ids.append(merged_id)
        if skipped:
            logger.warning("Ignored %d merges whose result is not in the vocabulary.", skipped)
        byte_ids = {byte: id_of.get(byte_to_char[byte]) for byte in range(256)}
        present_byte_ids = {token_id for token_id in byte_ids.values() if token_id is not None}

        # tiktoken returns ranks as ids. Where ids already grow in merge order (most
        # vocabularies) the ids are the ranks; otherwise ranks are compact and mapped back.
        ids_are_ranks = all(a < b for a, b in zip(merged_ids, merged_ids[1:])) and not (
            present_byte_ids & set(merged_ids)
        )
        ranks: dict[bytes, int] = {}
        rank_to_id: list[int] = []
        if ids_are_ranks:
            for byte, token_id in byte_ids.items():
                if token_id is not None:
                    ranks[bytes([byte])] = token_id
            for token_id in merged_ids:
                ranks[self._bytes[token_id]] = token_id
        else:
            for byte, token_id in byte_ids.items():
                if token_id is not None:
                    ranks[bytes([byte])] = len(rank_to_id)
                    rank_to_id.append(token_id)
            for token_id in merged_ids:
                ranks[self._bytes[token_id]] = len(rank_to_id)
                rank_to_id.append(token_id)
        # tiktoken needs every byte; bytes the vocabulary lacks get ranks past the
        # vocabulary and are dropped from the output, as HF's BPE drops unknown bytes.
        self._first_missing_rank = max(len(tokens), len(rank_to_id))
        missing = [byte for byte, token_id in byte_ids.items() if token_id is None]
        for offset, byte in enumerate(missing):
            ranks[bytes([byte])] = self._first_missing_rank + offset
        if missing:
            logger.info("Byte-level vocabulary lacks %d single-byte tokens; those bytes encode to nothing.", len(missing))
        self._has_missing_bytes = bool(missing)
        self._rank_to_id = None if ids_are_ranks else rank_to_id
        self._encoding = tiktoken.Encoding(
            name="quire-bpe", pat_str=split_regex, mergeable_ranks=ranks, special_tokens={},
        )
        self._special_pattern = _special_splitter(self._specials)
        self.vocab_size = len(tokens)
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos_default = add_bos_default
        self.chat_template = chat_template
        self.bos_token = self._text_of(bos_id)
        self.eos_token = self._text_of(eos_ids[0] if eos_ids else None)

    def _text_of(self, token_id: int | None) -> str:
        return "" if token_id is None else self._bytes[token_id].decode("utf-8", errors="replace")

    def _encode_ordinary(self, text: str) -> list[int]:
        ranks = self._encoding.encode_ordinary(text)
        if self._has_missing_bytes:
            limit = self._first_missing_rank
            ranks = [rank for rank in ranks if rank < limit]
        rank_to_id = self._rank_to_id
        if rank_to_id is None:
            return ranks
        return [rank_to_id[rank] for rank in ranks]

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids: list[int] = [self.bos_id] if add_bos and self.bos_id is not None else []
        if self._special_pattern is None:
            ids.extend(self._encode_ordinary(text))
            return ids
        # re.split with one capture group alternates plain text and special spellings.
        for index, piece in enumerate(self._special_pattern.split(text)):
            if index % 2:
                ids.append(self._specials[piece])
            elif piece:
                ids.extend(self._encode_ordinary(piece))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        table = self._bytes
        return b"".join(table[token_id] for token_id in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        self._check_id(token_id)
        return self._bytes[token_id]


# --- tokenizers-library tokenizers (SentencePiece-style GGUF, HF tokenizer.json) ----


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class HFTokenizer(_TokenizerBase):
    """A `tokenizers.Tokenizer` behind the engine's API."""

    def __init__(
        self,
        backend: object,
        *,
        bos_id: int | None,
        eos_ids: list[int],
        add_bos_default: bool,
        chat_template: str | None,
    ) -> None:
        import tokenizers

        assert isinstance(backend, tokenizers.Tokenizer)
        self._backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos_default = add_bos_default
        self.chat_template = chat_template
        self._added = {token_id: added.content for token_id, added in backend.get_added_tokens_decoder().items()}
        # Only the decoder's own state: serialising the whole tokenizer (a 262K-piece
        # vocabulary for Gemma) to look at it cost most of a second.
        decoder = backend.decoder
        self._byte_level = decoder is not None and b"ByteLevel" in decoder.__getstate__()
        self._bytes_cache: dict[int, bytes] = {}
        self.bos_token = self._text_of(bos_id)
        self.eos_token = self._text_of(eos_ids[0] if eos_ids else None)

    def _text_of(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self._backend.id_to_token(token_id) or ""

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            return [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        self._check_id(token_id)
        piece = self._backend.id_to_token(token_id) or ""
        if token_id in self._added:
            raw = self._added[token_id].encode("utf-8")
        elif self._byte_level:
            char_to_byte = _char_to_byte()
            raw = bytes(char_to_byte[char] for char in piece) if all(c in char_to_byte for c in piece) else piece.encode()
        elif (match := _BYTE_PIECE.fullmatch(piece)) is not None:
            raw = bytes([int(match.group(1), 16)])
        else:
            raw = piece.replace("\u2581", " ").encode("utf-8")
        self._bytes_cache[token_id] = raw
        return raw


def _sentencepiece_merges(tokens: Sequence[str], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece BPE vocabulary that lists none.

    SentencePiece stores pieces best-first, so a piece's position is its merge priority.
    (Gemma's scores do not follow that order; the positions do.) Each piece contributes
    every split whose halves are both pieces, longer left half first — the order
    transformers' `generate_merges` gives, which the reference tokenizer uses.
    """
    merges: list[tuple[str, str]] = []
    seen: set[str] = set()
    for piece in tokens:
        if piece in seen:
            continue
        seen.add(piece)
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


def _build_sentencepiece(meta: TokenizerMeta, tokens: list[str], types: list[int]) -> object:
    """A `tokenizers.Tokenizer` for a SentencePiece-style BPE vocabulary with byte fallback."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    # Some converters store whitespace-run pieces with real spaces; the model spells
    # spaces "▁" everywhere else, so the normalised text can only reach them that way.
    pieces = ["\u2581" * len(token) if token and set(token) == {" "} else token for token in tokens]
    vocab = {piece: token_id for token_id, piece in enumerate(pieces)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    else:
        merges = _sentencepiece_merges(pieces, vocab)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    backend = Backend(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))

    pieces_decoders = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if bool(meta.get("tokenizer.ggml.add_space_prefix", True)):
        # Llama-2 style: a "▁" is prepended to the first word and stripped on decode.
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([*pieces_decoders, decoders.Strip(" ", 1, 0)])
    else:
        # Gemma style: no dummy prefix; spaces become "▁" and the text is one piece.
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(" "), behavior="merged_with_previous")
        backend.decoder = decoders.Sequence(pieces_decoders)

    control = [
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, types) if kind == TOKEN_CONTROL
    ]
    backend.add_special_tokens(control)
    # User-defined pieces (newline runs, "[multimodal]") are matched whole in the raw
    # text, as llama.cpp does; respelled whitespace pieces are left to the normaliser.
    user_defined = [
        AddedToken(token, special=False, normalized=False)
        for token, piece, kind in zip(tokens, pieces, types) if kind == TOKEN_USER_DEFINED and token == piece
    ]
    backend.add_tokens(user_defined)
    return backend


# --- metadata → tokenizer ----------------------------------------------------------


def tokenizer_meta_from_gguf(path: str | Path) -> dict[str, MetaValue]:
    """Every `tokenizer.*` key of a GGUF file, plus `general.architecture`, as plain values."""
    try:
        import gguf
    except ImportError as error:  # pragma: no cover - gguf is a declared dependency
        raise TokenizerError("Reading GGUF files needs the `gguf` package.") from error

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except (OSError, ValueError) as error:
        raise TokenizerError(f"Cannot read GGUF metadata from {path}: {error}") from error
    meta: dict[str, MetaValue] = {}
    for key, field in reader.fields.items():
        if not (key.startswith("tokenizer.") or key == "general.architecture"):
            continue
        meta[key] = _field_value(field, gguf.GGUFValueType)
    return meta


def _field_value(field: object, value_type: type) -> MetaValue:
    """A GGUF field as a Python value. `field.data` indexes the parts holding the values;
    strings are raw UTF-8 byte arrays."""
    types = field.types  # type: ignore[attr-defined]
    parts = field.parts  # type: ignore[attr-defined]
    indices = field.data  # type: ignore[attr-defined]
    if not types:
        return None  # type: ignore[return-value]
    if types[0] == value_type.ARRAY:
        element = types[-1] if len(types) > 1 else None
        if element == value_type.STRING:
            return [bytes(parts[i]).decode("utf-8", errors="replace") for i in indices]
        return [parts[i][0].item() for i in indices]
    if types[0] == value_type.STRING:
        return bytes(parts[indices[0]]).decode("utf-8", errors="replace")
    value = parts[indices[0]][0].item()
    return bool(value) if types[0] == value_type.BOOL else value


def _optional_id(meta: TokenizerMeta, key: str, vocab_size: int) -> int | None:
    value = meta.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size:
        return value
    return None


def _end_ids(meta: TokenizerMeta, tokens: Sequence[str], types: Sequence[int]) -> list[int]:
    """The eos id first, then the declared end-of-turn ids, then CONTROL tokens spelled
    like an end of turn."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token_id = _optional_id(meta, key, len(tokens))
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    for token_id, (spelling, kind) in enumerate(zip(tokens, types)):
        if kind == TOKEN_CONTROL and spelling in END_OF_TURN_SPELLINGS and token_id not in ids:
            ids.append(token_id)
    return ids


def load_tokenizer_from_meta(meta: TokenizerMeta, *, cache: Path | None = None) -> Tokenizer:
    """Build the tokenizer a GGUF's `tokenizer.*` metadata describes.

    Rebuilding a SentencePiece-style vocabulary (merges recovered from token order)
    takes seconds; with `cache`, the built `tokenizers` JSON is kept there and reused
    while it is newer than the metadata it came from.
    """
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model not in ("gpt2", "llama"):
        raise TokenizerError(f"Unsupported tokenizer model {model!r} in GGUF metadata (Quire supports 'gpt2' and 'llama').")
    if not isinstance(tokens, list) or not tokens:
        raise TokenizerError("GGUF metadata has no tokenizer.ggml.tokens; the file has no usable tokenizer.")
    raw_types = meta.get("tokenizer.ggml.token_type")
    types = [int(kind) for kind in raw_types] if isinstance(raw_types, list) else [TOKEN_NORMAL] * len(tokens)
    template = meta.get("tokenizer.chat_template")
    chat_template = template if isinstance(template, str) and template else None
    bos_id = _optional_id(meta, "tokenizer.ggml.bos_token_id", len(tokens))
    eos_ids = _end_ids(meta, tokens, types)
    # llama.cpp adds BOS to SentencePiece vocabularies whose file does not say otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))

    if model == "gpt2":
        pre = str(meta.get("tokenizer.ggml.pre", "default"))
        split = PRE_TOKENIZER_SPLITS.get(pre)
        if split is None:
            logger.warning("Unknown pre-tokenizer %r; splitting text the GPT-2 way.", pre)
            split = _GPT2_SPLIT
        merges = meta.get("tokenizer.ggml.merges")
        if not isinstance(merges, list):
            raise TokenizerError("Byte-level BPE metadata has no tokenizer.ggml.merges; the GGUF is incomplete.")
        return ByteLevelBPETokenizer(
            tokens, merges, types, split_regex=split, bos_id=bos_id, eos_ids=eos_ids,
            add_bos_default=add_bos, chat_template=chat_template,
        )
    backend = _cached_sentencepiece(meta, tokens, types, cache)
    return HFTokenizer(backend, bos_id=bos_id, eos_ids=eos_ids, add_bos_default=add_bos, chat_template=chat_template)


def _cached_sentencepiece(meta: TokenizerMeta, tokens: list[str], types: list[int], cache: Path | None) -> object:
    from tokenizers import Tokenizer as Backend

    if cache is not None and cache.exists():
        try:
            return Backend.from_file(str(cache))
        except Exception as error:  # a damaged cache is rebuilt, never trusted
            logger.warning("Rebuilding tokenizer cache %s: %s", cache, error)
    backend = _build_sentencepiece(meta, tokens, types)
    if cache is not None:
        partial = cache.with_name(cache.name + ".partial")
        try:
            backend.save(str(partial))
            os.replace(partial, cache)
        except OSError as error:  # a read-only model folder still works, just slower
            logger.info("Cannot cache tokenizer in %s: %s", cache.parent, error)
    return backend


def load_tokenizer_from_gguf(path: str | Path) -> Tokenizer:
    return load_tokenizer_from_meta(tokenizer_meta_from_gguf(path))


def _config_token(config: Mapping[str, object], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_hf_folder(folder: Path) -> Tokenizer:
    """Wrap an HF `tokenizer.json` (+ `tokenizer_config.json`) in the engine API."""
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_file(str(folder / "tokenizer.json"))
    except Exception as error:  # the Rust side raises a plain Exception
        raise TokenizerError(f"Cannot read {folder / 'tokenizer.json'}: {error}") from error
    config_path = folder / "tokenizer_config.json"
    config: dict = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}

    bos = _config_token(config, "bos_token")
    bos_id = backend.token_to_id(bos) if bos else None
    added = backend.get_added_tokens_decoder()
    eos_ids: list[int] = []
    eos = _config_token(config, "eos_token")
    if eos and backend.token_to_id(eos) is not None:
        eos_ids.append(backend.token_to_id(eos))
    for token_id, token in sorted(added.items()):
        if token.special and token.content in END_OF_TURN_SPELLINGS and token_id not in eos_ids:
            eos_ids.append(token_id)
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        # Ask the post-processor: does it put BOS in front of a plain encode?
        probe = backend.encode("a", add_special_tokens=True).ids
        add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
    template = config.get("chat_template")
    template_file = folder / "chat_template.jinja"
    if not isinstance(template, str) and template_file.exists():
        template = template_file.read_text(encoding="utf-8")
    return HFTokenizer(
        backend, bos_id=bos_id, eos_ids=eos_ids, add_bos_default=add_bos,
        chat_template=template if isinstance(template, str) and template else None,
    )


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of a converted model folder: `gguf_tokenizer.json` (GGUF metadata
    saved by the loader) if present, else an HF `tokenizer.json`."""
    folder = Path(folder)
    meta_path = folder / "gguf_tokenizer.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise TokenizerError(f"Cannot read {meta_path}: {error}") from error
        template_file = folder / "chat_template.jinja"
        if not meta.get("tokenizer.chat_template") and template_file.exists():
            meta["tokenizer.chat_template"] = template_file.read_text(encoding="utf-8")
        cache = folder / "tokenizer.built.json"
        if cache.exists() and cache.stat().st_mtime < meta_path.stat().st_mtime:
            cache.unlink(missing_ok=True)
        return load_tokenizer_from_meta(meta, cache=cache)
    if (folder / "tokenizer.json").exists():
        return _load_hf_folder(folder)
    raise TokenizerError(f"No tokenizer in {folder}: expected gguf_tokenizer.json or tokenizer.json.")


# --- streaming ---------------------------------------------------------------------


class StreamDecoder:
    """Turns generated token ids into text as they arrive.

    A token can end in the middle of a UTF-8 character (byte-fallback and byte-level
    vocabularies split emoji and CJK across tokens); those bytes are held back until
    the character completes, and invalid bytes become U+FFFD as in `decode`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# --- chat templates ----------------------------------------------------------------


@lru_cache(maxsize=16)
def _compile_template(template: str) -> object:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    # The same settings as transformers' apply_chat_template, so whitespace matches.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    try:
        return environment.from_string(template)
    except TemplateError as error:
        raise TokenizerError(f"The model's chat template is not valid Jinja: {error}") from error


def render_chat(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: object,
) -> str:
    """Render a conversation with a Jinja chat template in a sandbox."""
    from jinja2 import TemplateError

    compiled = _compile_template(template)
    try:
        return compiled.render(  # type: ignore[attr-defined]
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token, **extra,
        )
    except TemplateError as error:
        raise TokenizerError(f"The chat template refused this conversation: {error}") from error
