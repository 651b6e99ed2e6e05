"""Tokenizers from GGUF metadata: hand-checked tiny vocabularies, and id-for-id parity
with transformers' tokenizers for the real SmolLM2, Qwen2.5-Coder and Gemma 3 GGUFs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.errors import TokenizerError
from engine.tokenizer import (
    FALLBACK_CHAT_TEMPLATE,
    StreamDecoder,
    Tokenizer,
    load_tokenizer,
    load_tokenizer_from_gguf,
    load_tokenizer_from_meta,
    render_chat,
    tokenizer_meta_from_gguf,
)

# --- tiny byte-level vocabularies, ids worked out by hand ---------------------------


def _byte_level_meta(tokens: list[str], merges: list[str], types: list[int] | None = None, **extra: object) -> dict:
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types or [1] * len(tokens),
        "tokenizer.ggml.merges": merges,
        **extra,
    }


# "Ġ" is how GPT-2's byte alphabet spells a space. "ba" is in the vocabulary but no merge
# makes it; the ids of "abc" and "ab" run against merge order on purpose.
TINY_TOKENS = ["<|end|>", "a", "b", "c", "Ġ", "abc", "ab", "Ġa", "ba"]
TINY_MERGES = ["a b", "ab c", "Ġ a"]


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    meta = _byte_level_meta(
        TINY_TOKENS, TINY_MERGES, [3, 1, 1, 1, 1, 1, 1, 1, 1],
        **{"tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.bos_token_id": 1},
    )
    return load_tokenizer_from_meta(meta)


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("abc", [5]),  # a b -> ab, then ab c -> abc
        ("ab a", [6, 7]),  # split into "ab" and " a"; " a" merges to Ġa
        ("cab", [3, 6]),
        ("bac", [2, 1, 3]),  # no merge "b a", so "ba" is never produced
        ("abc<|end|>a", [5, 0, 1]),  # the control token is matched whole
        ("az", [1]),  # a byte the vocabulary lacks is dropped, as HF's BPE drops it
    ],
)
def test_tiny_byte_level_ids(tiny: Tokenizer, text: str, ids: list[int]) -> None:
    assert tiny.encode(text) == ids


def test_tiny_byte_level_decode_and_attributes(tiny: Tokenizer) -> None:
    assert tiny.decode([8]) == "ba"  # unreachable by merges, still decodes
    assert tiny.decode([5, 7, 0]) == "abc a<|end|>"
    assert tiny.token_bytes(4) == b" "
    assert tiny.encode("a", add_bos=True) == [1, 1]
    assert tiny.eos_ids == [0]
    assert tiny.vocab_size == len(TINY_TOKENS)
    assert tiny.add_bos_default is False
    with pytest.raises(TokenizerError):
        tiny.token_bytes(len(TINY_TOKENS))


@pytest.mark.parametrize(("merges", "ids"), [(["a b", "b c"], [3, 2]), (["b c", "a b"], [0, 4])])
def test_merge_order_decides(merges: list[str], ids: list[int]) -> None:
    tokenizer = load_tokenizer_from_meta(_byte_level_meta(["a", "b", "c", "ab", "bc"], merges))
    assert tokenizer.encode("abc") == ids


def test_unknown_tokenizer_model_is_a_named_error() -> None:
    meta = _byte_level_meta(["a"], [])
    meta["tokenizer.ggml.model"] = "bert"
    with pytest.raises(TokenizerError, match="Unsupported tokenizer model 'bert'"):
        load_tokenizer_from_meta(meta)


def test_stream_decoder_holds_back_split_character() -> None:
    # "Ã" and "©" are GPT-2's spellings of the bytes 0xC3 and 0xA9: together "é".
    tokenizer = load_tokenizer_from_meta(_byte_level_meta(["Ã", "©", "h"], []))
    stream = StreamDecoder(tokenizer)
    assert [stream.feed(0), stream.feed(1), stream.feed(2)] == ["", "é", "h"]
    assert stream.feed(0) == ""
    assert stream.flush() == "\ufffd"  # a dangling lead byte is reported, not lost


# --- chat templates --------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "Und auf Deutsch? 日本語も。"},
]


def test_fallback_chat_template() -> None:
    text = render_chat(FALLBACK_CHAT_TEMPLATE, CONVERSATION)
    assert text == (
        "System: You answer briefly.\nUser: What is 2+2?\nAssistant: 4.\n"
        "User: Und auf Deutsch? 日本語も。\nAssistant:"
    )
    assert render_chat(FALLBACK_CHAT_TEMPLATE, CONVERSATION[:2], add_generation_prompt=False).endswith("2+2?\n")


def test_render_chat_environment() -> None:
    template = "{% for m in messages %}\n  {{ m['content'] | tojson }}\n{% endfor %}{{ bos_token }}{{ extra }}"
    # trim_blocks/lstrip_blocks drop the newline after a tag and the indent before one.
    assert render_chat(template, [{"content": "é<b>"}], bos_token="<s>", extra="!") == '  "é<b>"\n<s>!'
    with pytest.raises(TokenizerError, match="no system"):
        render_chat("{{ raise_exception('no system') }}", [])
    assert len(render_chat("{{ strftime_now('%Y') }}", [])) == 4


# --- real GGUFs against transformers ---------------------------------------------

MODELS = [
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "gemma-3-270m-q4_k_m.gguf",
]

SAMPLES = [
    "Café naïve résumé — Ærøskøbing, Straße, façade.",
    "日本語のテキストと中文文本，한국어 텍스트。",
    "Emoji: 😀👍🏽🇩🇪👨‍👩‍👧 and ✓ ✗ ∑ ∞",
    "שלום עולם — مرحبا بالعالم (RTL)",
    "def f(x):\n\tif x:\n\t\treturn  x  +  1\n\n\n    # four spaces\n        deeper()\n",
    "class A:\n    def __init__(self) -> None:\n        self.items = [i ** 2 for i in range(10)]\n",
    "words    with     runs      of spaces   \n  \n\t\n",
    "3.14159 2.71828 1234567890123456789 0.000001 1e-9 -42",
    "Dates: 2024-05-17, 17/05/2024, 1999. Price $1,000.50 at 10:45am, x  1",
    "<|im_start|>user\nhi<|im_end|>\n<start_of_turn>model\nok<end_of_turn>\n",
    " leading space, trailing spaces   ",
    "It's, we're, they'LL, I'd; CAPS'S\r\nWindows\r\nlines",
]


def _gguf_path(name: str) -> Path:
    """The installed models' `gguf/` folder first, then `$QUIRE_GGUF_DIR`."""
    from engine.paths import models_dir

    folders = [models_dir() / "gguf"]
    if os.environ.get("QUIRE_GGUF_DIR"):
        folders.append(Path(os.environ["QUIRE_GGUF_DIR"]).expanduser())
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    pytest.skip(f"{name} not found in {', '.join(map(str, folders))} (set QUIRE_GGUF_DIR)")


@pytest.fixture(scope="module", params=MODELS)
def pair(request: pytest.FixtureRequest) -> tuple[str, Tokenizer, object]:
    """(name, ours, transformers' tokenizer) for one real GGUF."""
    transformers = pytest.importorskip("transformers")
    path = _gguf_path(request.param)
    ours = load_tokenizer_from_gguf(path)
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    meta_pre = tokenizer_meta_from_gguf(path).get("tokenizer.ggml.pre")
    if meta_pre == "smollm":
        # transformers' GGUF loader has no entry for "smollm" and falls back to plain
        # GPT-2 splitting. SmolLM's own tokenizer.json (and llama.cpp) split every digit
        # first; the reference gets that pre-tokenizer so it describes the real model.
        from tokenizers import pre_tokenizers

        reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    return request.param, ours, reference


@pytest.fixture(scope="module")
def haystack_text(haystack_dir: Path) -> str:
    """About 200 KB of real English essays."""
    parts: list[str] = []
    size = 0
    for essay in sorted(haystack_dir.glob("*.txt")):
        parts.append(essay.read_text(encoding="utf-8"))
        size += len(parts[-1].encode("utf-8"))
        if size >= 200_000:
            break
    return "".join(parts)


def _first_difference(ours: list[int], reference: list[int]) -> str:
    index = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
    return f"first difference at {index}: ours {ours[index:index + 5]} vs reference {reference[index:index + 5]}"


@pytest.mark.slow
def test_haystack_ids_match_transformers(pair: tuple[str, Tokenizer, object], haystack_text: str) -> None:
    name, ours, reference = pair
    assert len(haystack_text.encode("utf-8")) >= 200_000
    expected = reference(haystack_text, add_special_tokens=False).input_ids
    got = ours.encode(haystack_text)
    assert got == expected, f"{name}: {_first_difference(got, expected)}"
    assert ours.decode(got) == haystack_text


@pytest.mark.slow
@pytest.mark.parametrize("text", SAMPLES)
def test_sample_ids_match_transformers(pair: tuple[str, Tokenizer, object], text: str) -> None:
    name, ours, reference = pair
    expected = reference(text, add_special_tokens=False).input_ids
    got = ours.encode(text)
    assert got == expected, f"{name}: {_first_difference(got, expected)}"
    assert ours.decode(got) == reference.decode(expected)


@pytest.mark.slow
def test_round_trip(pair: tuple[str, Tokenizer, object]) -> None:
    _, ours, _ = pair
    for text in SAMPLES:
        if "<" in text:
            continue  # special spellings decode back too, but through their own ids
        assert ours.decode(ours.encode(text)) == text
        assert b"".join(ours.token_bytes(i) for i in ours.encode(text)) == text.encode("utf-8")


@pytest.mark.slow
def test_add_bos_matches_transformers(pair: tuple[str, Tokenizer, object]) -> None:
    name, ours, reference = pair
    text = "Hello there."
    assert ours.encode(text, add_bos=ours.add_bos_default) == reference(text).input_ids, name
    assert ours.add_bos_default == (name.startswith("gemma"))  # only Gemma's file asks for BOS
    if ours.bos_id is not None:
        assert ours.encode(text, add_bos=True)[0] == ours.bos_id


@pytest.mark.slow
def test_end_of_turn_ids(pair: tuple[str, Tokenizer, object]) -> None:
    _, ours, reference = pair
    assert ours.eos_ids[0] == reference.eos_token_id
    spelled = {ours.decode([token_id]) for token_id in ours.eos_ids}
    # Each vocabulary's chat turn end must stop generation.
    assert spelled & {"<|im_end|>", "<end_of_turn>"}


@pytest.mark.slow
def test_stream_decoder_on_real_tokens(pair: tuple[str, Tokenizer, object]) -> None:
    _, ours, _ = pair
    text = "Grüße 👨‍👩‍👧 日本 𓀀ꙮ"
    ids = ours.encode(text)
    pieces = [ours.token_bytes(token_id) for token_id in ids]
    # A hieroglyph is rare enough to be split into byte tokens in every one of these vocabularies.
    assert any(piece and not _is_utf8(piece) for piece in pieces)
    stream = StreamDecoder(ours)
    chunks = [stream.feed(token_id) for token_id in ids]
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert "".join(chunks) + stream.flush() == text


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.slow
def test_chat_template_matches_transformers(pair: tuple[str, Tokenizer, object]) -> None:
    _, ours, reference = pair
    if reference.chat_template is None:
        # A base model without a template gets the documented plain transcript.
        assert ours.chat_template is None
        assert ours.apply_chat_template(CONVERSATION) == render_chat(FALLBACK_CHAT_TEMPLATE, CONVERSATION)
        return
    for add_generation_prompt in (True, False):
        expected = reference.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.slow
def test_load_tokenizer_from_folders(pair: tuple[str, Tokenizer, object], tmp_path: Path) -> None:
    name, ours, reference = pair
    gguf_folder = tmp_path / "gguf"
    gguf_folder.mkdir()
    meta = tokenizer_meta_from_gguf(_gguf_path(name))
    (gguf_folder / "gguf_tokenizer.json").write_text(json.dumps(meta), encoding="utf-8")
    from_json = load_tokenizer(gguf_folder)
    hf_folder = tmp_path / "hf"
    reference.save_pretrained(str(hf_folder))
    from_hf = load_tokenizer(hf_folder)
    for text in SAMPLES:
        assert from_json.encode(text) == ours.encode(text)
        assert from_hf.encode(text) == reference(text, add_special_tokens=False).input_ids
    assert from_hf.add_bos_default == ours.add_bos_default
    assert from_hf.bos_id == ours.bos_id and from_hf.eos_ids[0] == ours.eos_ids[0]
    assert from_hf.apply_chat_template(CONVERSATION) == ours.apply_chat_template(CONVERSATION)
    ids = ours.encode("Grüße 😀 日本")
    assert b"".join(from_hf.token_bytes(i) for i in ids) == b"".join(ours.token_bytes(i) for i in ids)


@pytest.mark.slow
def test_smollm_splits_digits_first() -> None:
    """Why the SmolLM reference is patched: stock transformers would give " ", " ", "1"."""
    ours = load_tokenizer_from_gguf(_gguf_path(MODELS[0]))
    space = ours.encode(" ")[0]
    double_space = ours.encode("  ")
    assert len(double_space) == 1 and double_space[0] != space
    # Digits are split off first, so both spaces stay together as one token.
    assert ours.encode("x  1") == [ours.encode("x")[0], double_space[0], ours.encode("1")[0]]
