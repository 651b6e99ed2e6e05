"""The KV segment store: quantisation error bounds, the file layout read back
independently of the store, gather vs dequantize, sizes, atomic writes, corruption
detection and garbage collection."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from engine.corpus.store import FORMAT_VERSION, PRECISIONS, SegmentStore
from engine.errors import CorruptCacheError

LEVELS = {"int8": 255, "int4": 15}
F16_EPS = 2.0**-11  # relative rounding error of float16 to nearest


def make_kv(layers: int = 2, heads: int = 2, tokens: int = 100, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Keys with a few large outlier channels and an offset (as real pre-RoPE keys have),
    values with an occasional large channel. Shapes (L, H, T, D)."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((layers, heads, tokens, dim)).astype(np.float32)
    keys[..., [1, dim // 4, dim // 2 + 3]] *= 25.0
    keys += rng.uniform(-2, 2, size=dim).astype(np.float32)
    values = (0.5 * rng.standard_normal((layers, heads, tokens, dim))).astype(np.float32)
    values[..., dim // 2 + 1] += 6.0
    return keys, values


def read_layout(path: Path) -> tuple[dict, int, bytes]:
    """Header JSON, data start and whole file, parsed straight from the documented layout."""
    blob = path.read_bytes()
    magic, version, length = struct.unpack_from("<4sII", blob, 0)
    assert (magic, version) == (b"QKVS", FORMAT_VERSION)
    header_bytes = blob[12 : 12 + length]
    assert blob[-8:-4] == b"QEND" and struct.unpack("<I", blob[-4:])[0] == zlib.crc32(header_bytes)
    return json.loads(header_bytes), -(-(12 + length) // 64) * 64, blob


def raw_array(header: dict, data_start: int, blob: bytes, name: str) -> np.ndarray:
    entry = header["arrays"][name]
    count = int(np.prod(entry["shape"]))
    return np.frombuffer(blob, np.dtype(entry["dtype"]), count, data_start + entry["offset"]).reshape(entry["shape"])


def block_extremes(keys: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-block, per-channel min and max of keys (H, T, D), expanded back to (H, T, D)."""
    low, high = np.empty_like(keys), np.empty_like(keys)
    for start in range(0, keys.shape[1], block_size):
        part = keys[:, start : start + block_size]
        low[:, start : start + block_size] = part.min(axis=1, keepdims=True)
        high[:, start : start + block_size] = part.max(axis=1, keepdims=True)
    return low, high


@pytest.fixture
def store(tmp_path: Path) -> SegmentStore:
    return SegmentStore(tmp_path / "model")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_round_trip_stays_within_quantisation_error(store: SegmentStore, precision: str) -> None:
    keys, values = make_kv()
    written = store.write("ab12", keys, values, layers=[3, 7], precision=precision, meta={"doc": 5})
    with store.open("ab12") as segment:
        assert (segment.tokens, segment.n_blocks, segment.layers, segment.meta) == (100, 4, (3, 7), {"doc": 5})
        assert segment.nbytes == written == store.path_for("ab12").stat().st_size
        assert segment.layer_slot(7) == 1
        for slot in range(2):
            got_keys, got_values = segment.dequantize(slot)
            assert got_keys.shape == got_values.shape == (2, 100, 64) and got_keys.dtype == np.float32
            key_low, key_high = block_extremes(keys[slot], 32)
            value_low = values[slot].min(axis=-1, keepdims=True)
            value_high = values[slot].max(axis=-1, keepdims=True)
            if precision == "fp16":
                key_bound = F16_EPS * np.abs(keys[slot]) + 2.0**-24
                value_bound = F16_EPS * np.abs(values[slot]) + 2.0**-24
            else:
                levels = LEVELS[precision]
                key_bound = (key_high - key_low) / levels / 2 + F16_EPS * (np.abs(key_low) + np.abs(key_high)) + 1e-6
                value_bound = (value_high - value_low) / levels / 2 + F16_EPS * (np.abs(value_low) + np.abs(value_high)) + 1e-6
            assert np.all(np.abs(got_keys - keys[slot]) <= key_bound)
            assert np.all(np.abs(got_values - values[slot]) <= value_bound)
            # The retrieval index must enclose every key of its block, and be tight.
            bound_low, bound_high = (b.astype(np.float32) for b in segment.key_bounds(slot))  # (n_blocks, H, D)
            expand = np.arange(100) // 32
            assert np.all(bound_low.transpose(1, 0, 2)[:, expand] <= keys[slot])
            assert np.all(bound_high.transpose(1, 0, 2)[:, expand] >= keys[slot])
            assert np.all(bound_high.transpose(1, 0, 2)[:, expand] - key_high <= 2 * F16_EPS * np.abs(key_high) + 2.0**-24)
    if precision == "int8":
        # int8 is 256 levels: the worst error is far below the plain channel spread.
        assert np.abs(got_keys - keys[1]).max() < 0.01 * np.abs(keys[1]).max()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gather_returns_the_same_rows_as_dequantize(store: SegmentStore, precision: str) -> None:
    keys, values = make_kv(seed=1)
    store.write("cd34", keys, values, layers=[0, 1], precision=precision)
    segment = store.open("cd34")
    all_keys, all_values = segment.dequantize(1)
    got_keys, got_values, tokens = segment.gather(1, 1, np.array([3, 0, 2]))  # block 3 is partial (4 tokens)
    expected_tokens = np.concatenate([np.arange(96, 100), np.arange(0, 32), np.arange(64, 96)])
    assert tokens.dtype == np.int64 and np.array_equal(tokens, expected_tokens)
    np.testing.assert_allclose(got_keys, all_keys[1, expected_tokens], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_values, all_values[1, expected_tokens], rtol=1e-6, atol=1e-6)
    empty_keys, empty_values, empty_tokens = segment.gather(0, 0, np.array([], dtype=np.int64))
    assert empty_keys.shape == empty_values.shape == (0, 64) and empty_tokens.shape == (0,)
    with pytest.raises(IndexError):
        segment.gather(0, 0, np.array([4]))
    with pytest.raises(KeyError):
        segment.layer_slot(5)
    segment.close()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_read_ahead_requests_cover_what_is_read_and_change_nothing(store: SegmentStore, precision: str, monkeypatch) -> None:
    """`prefetch` asks the kernel for the byte ranges of exactly the sub-arrays and
    token rows named (checked against the mapping's own addresses), up to the end of
    the file, and reads still return what they did."""
    import mmap

    keys, values = make_kv(seed=2)
    store.write("ef56", keys, values, layers=[0, 1], precision=precision)
    segment = store.open("ef56")
    before = segment.gather(1, 1, np.array([2, 3]))
    asked = []

    class Recording:
        def __init__(self, mapping):
            self.mapping = mapping

        def madvise(self, option, start, length):
            asked.append((option, start, length))
            return self.mapping.madvise(option, start, length)

    monkeypatch.setattr(segment, "_mapping", Recording(segment._mapping))
    base = segment._arrays["key_min"].ctypes.data - segment._layout.arrays["key_min"][0]  # the mapping's address
    segment.prefetch_blocks(1, 1, 2, 4)  # blocks 2 and 3: tokens 64..99 (block 3 is partial)
    segment.prefetch("key_min", (1,))
    segment.prefetch("keys")  # a whole array
    rows = {"keys": segment._arrays["keys"][1, 1], "values": segment._arrays["values"][1, 1]}
    wanted = [(rows[name][64].ctypes.data, rows[name][99].ctypes.data + rows[name].strides[0]) for name in ("keys", "values")]
    params = [name for name in ("value_min", "value_scale", "value_zero") if name in segment._arrays]
    for name in params:
        column = segment._arrays[name][1, 1]
        wanted.append((column[64:].ctypes.data, column[64:].ctypes.data + column[64:].nbytes))
    low = segment._arrays["key_min"][1]
    wanted.append((low.ctypes.data, low.ctypes.data + low.nbytes))
    whole = segment._arrays["keys"]
    wanted.append((whole.ctypes.data, whole.ctypes.data + whole.nbytes))
    assert len(asked) == len(wanted) == 4 + len(params)
    for (option, start, length), (first, end) in zip(asked, wanted):
        assert option == mmap.MADV_WILLNEED and start % mmap.PAGESIZE == 0
        assert base + start <= first and base + start + length == end and first - (base + start) < mmap.PAGESIZE
        assert start + length <= segment.nbytes
    after = segment.gather(1, 1, np.array([2, 3]))
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    monkeypatch.undo()
    segment.close()
    segment.prefetch("keys")  # closed: a hint, nothing to do


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_file_layout_decodes_independently(store: SegmentStore, precision: str) -> None:
    keys, values = make_kv(layers=1, heads=2, tokens=40, dim=8, seed=2)
    store.write("ef56", keys, values, layers=[11], precision=precision, block_size=16)
    header, data_start, blob = read_layout(store.path_for("ef56"))
    assert header["tokens"] == 40 and header["layers"] == [11] and header["precision"] == precision
    params = ("value_min", "value_scale") if precision == "int8" else ("value_scale", "value_zero")
    offsets = [header["arrays"][n]["offset"] for n in ("key_min", "key_max", "block_crc", "keys", *params, "values")]
    assert offsets == sorted(offsets) and all((data_start + o) % 64 == 0 for o in offsets)
    # Each block's checksum, recomputed from the documented layout: key codes, the
    # block's tokens' value parameters in file order, value codes.
    block_crc = raw_array(header, data_start, blob, "block_crc")  # (L, H, n_blocks)
    assert block_crc.shape == (1, 2, 3)
    for head in range(2):
        for block in range(3):
            rows, real = slice(16 * block, 16 * block + 16), slice(16 * block, min(16 * block + 16, 40))
            crc = zlib.crc32(raw_array(header, data_start, blob, "keys")[0, head, rows].tobytes())
            for name in params:
                crc = zlib.crc32(raw_array(header, data_start, blob, name)[0, head, real].tobytes(), crc)
            crc = zlib.crc32(raw_array(header, data_start, blob, "values")[0, head, rows].tobytes(), crc)
            assert block_crc[0, head, block] == crc

    def codes(name: str) -> np.ndarray:
        stored = raw_array(header, data_start, blob, name)[0].astype(np.float32)  # (H, Tp, D or D/2)
        if precision == "int8":
            return stored
        unpacked = np.empty(stored.shape[:-1] + (stored.shape[-1] * 2,), np.float32)
        unpacked[..., 0::2], unpacked[..., 1::2] = stored % 16, stored // 16
        return unpacked

    levels = LEVELS[precision]
    low = raw_array(header, data_start, blob, "key_min")[0].astype(np.float32)  # (n_blocks, H, D)
    high = raw_array(header, data_start, blob, "key_max")[0].astype(np.float32)
    block = np.arange(40) // 16
    reference_keys = low[block].transpose(1, 0, 2) + codes("keys")[:, :40] * (high - low)[block].transpose(1, 0, 2) / levels
    value_scale = raw_array(header, data_start, blob, "value_scale")[0].astype(np.float32)[..., None]  # (H, T, 1)
    if precision == "int8":
        value_min = raw_array(header, data_start, blob, "value_min")[0].astype(np.float32)[..., None]
        reference_values = value_min + codes("values")[:, :40] * value_scale
    else:  # an integer zero point, signed: the minimum is -zero * scale
        value_zero = raw_array(header, data_start, blob, "value_zero")[0].astype(np.float32)[..., None]
        assert raw_array(header, data_start, blob, "value_zero").dtype == np.int8
        reference_values = (codes("values")[:, :40] - value_zero) * value_scale
    got_keys, got_values = store.open("ef56").dequantize(0)
    # float32 evaluation order differs (code * span / levels): allow a few ulps.
    np.testing.assert_allclose(got_keys, reference_keys, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_values, reference_values, rtol=1e-5, atol=1e-5)


def test_int4_packs_even_channel_in_low_nibble(store: SegmentStore) -> None:
    # Two tokens, four channels: per channel the codes are 0 or 15 (its min or max).
    keys = np.array([[0.0, 15.0, 3.0, 7.0], [15.0, 0.0, 12.0, 8.0]], np.float32).reshape(1, 1, 2, 4)
    store.write("gh78", keys, np.zeros_like(keys), layers=[0], precision="int4", block_size=2)
    header, data_start, blob = read_layout(store.path_for("gh78"))
    packed = raw_array(header, data_start, blob, "keys").reshape(-1)
    assert list(packed) == [0xF0, 0x00, 0x0F, 0xFF]
    np.testing.assert_allclose(store.open("gh78").dequantize(0)[0], keys[0], atol=1e-6)


def test_int4_and_int8_files_are_smaller_than_fp16(store: SegmentStore) -> None:
    keys, values = make_kv(layers=4, heads=2, tokens=1024, dim=64, seed=3)
    sizes = {
        (precision, block): store.write(f"{precision}{block}", keys, values, layers=range(4), precision=precision, block_size=block)
        for precision in PRECISIONS
        for block in (32, 64)
    }
    # Per token and head, fp16 is 2*64*2 bytes; int4 2*32 + 3 (value scale and zero
    # point); the key bounds add 2*64*2 bytes per block. Headers are a few hundred bytes.
    for block in (32, 64):
        index = 4 * 2 * (1024 // block) * 64 * 2 * 2
        assert abs(sizes["fp16", block] - (4 * 2 * 1024 * 256 + index)) < 2048
        assert abs(sizes["int4", block] - (4 * 2 * 1024 * 67 + index)) < 2048
    for block in (32, 64):
        ratio = sizes["int4", block] / sizes["fp16", block]
        assert ratio <= 1 / 3.5, f"int4/fp16 = {ratio:.4f} at block {block}"
    assert sizes["int4", 32] < sizes["int8", 32] < 0.55 * sizes["fp16", 32], sizes


def test_crash_before_rename_leaves_no_segment(store: SegmentStore, monkeypatch: pytest.MonkeyPatch) -> None:
    keys, values = make_kv(layers=1, tokens=40)
    final = store.path_for("ij90")
    seen: list[tuple[bool, int]] = []
    real_replace = os.replace

    def checking_replace(source: str | Path, target: str | Path) -> None:
        # At rename time the temp file is complete and the final name does not exist yet.
        seen.append((Path(target).exists(), read_layout(Path(source))[0]["tokens"]))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", checking_replace)
    store.write("ij90", keys, values, layers=[0])
    assert seen == [(False, 40)]

    def crash(source: str | Path, target: str | Path) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        store.write("kl12", keys, values, layers=[0])
    assert not store.path_for("kl12").exists() and not list(store.path_for("kl12").parent.glob("*.tmp"))

    # A process killed mid-write leaves a temp file: it is never mistaken for a segment.
    stray = final.parent / ".kl12.x7q.tmp"
    stray.write_bytes(final.read_bytes()[:500])
    assert list(store.keys()) == ["ij90"] and not store.has("kl12")
    with pytest.raises(FileNotFoundError):
        store.open("kl12")
    assert store.collect_garbage({"ij90"}) == 500
    assert not stray.exists() and store.has("ij90")


def flip_byte(path: Path, offset: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x40
    path.write_bytes(bytes(blob))


def test_corruption_is_detected(store: SegmentStore) -> None:
    keys, values = make_kv(layers=1, tokens=70)
    path = store.path_for("mn34")
    store.write("mn34", keys, values, layers=[2])
    header, data_start, _ = read_layout(path)
    key_max_at = data_start + header["arrays"]["key_max"]["offset"]
    values_at = data_start + header["arrays"]["values"]["offset"]

    flip_byte(path, key_max_at + 5)
    with pytest.raises(CorruptCacheError, match="mn34"):
        store.open("mn34")
    assert not store.has("mn34") and not path.exists()

    store.write("mn34", keys, values, layers=[2])
    flip_byte(path, values_at + 100)
    with store.open("mn34") as segment:  # the cheap checks do not read the payload
        assert not segment.verify()
    assert store.has("mn34")

    store.write("mn34", keys, values, layers=[2])
    with store.open("mn34") as segment:
        assert segment.verify()
    flip_byte(path, 20)  # inside the header JSON
    with pytest.raises(CorruptCacheError):
        store.open("mn34")

    store.write("mn34", keys, values, layers=[2])
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(CorruptCacheError, match="truncated"):
        store.open("mn34")
    os.truncate(path, 0)
    with pytest.raises(CorruptCacheError):
        store.open("mn34")


def test_a_damaged_block_is_caught_when_it_is_read(store: SegmentStore) -> None:
    keys, values = make_kv(layers=2, tokens=100, seed=3)
    path = store.path_for("gh78")
    store.write("gh78", keys, values, layers=[0, 1])
    header, data_start, _ = read_layout(path)
    entry = header["arrays"]["values"]  # (L, H, Tp, D) uint8
    row = (1 * 2 + 0) * entry["shape"][2] + 40  # layer slot 1, head 0, token 40: block 1
    flip_byte(path, data_start + entry["offset"] + row * entry["shape"][3] + 7)
    with store.open("gh78") as segment:  # the cheap checks pass
        for slot, head, block in ((1, 0, 0), (1, 0, 2), (1, 1, 1), (0, 0, 1)):
            segment.gather(slot, head, np.array([block]))  # other blocks read as before
        with pytest.raises(CorruptCacheError, match="layer 1, KV head 0, block 1"):
            segment.gather(1, 0, np.array([0, 1]))
        assert not segment.verify()


def test_a_format_1_segment_is_read_and_upgraded(store: SegmentStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.corpus.store as store_module

    keys, values = make_kv(layers=2, tokens=100, seed=4)
    for key in ("ij90", "kl12"):
        with monkeypatch.context() as patch:
            patch.setattr(store_module, "FORMAT_VERSION", 1)
            store.write(key, keys, values, layers=[0, 1], precision="int4", meta={"doc": 1})
    blob = store.path_for("ij90").read_bytes()
    assert struct.unpack_from("<I", blob, 4)[0] == 1 and b"block_crc" not in blob
    with store.open("ij90") as old:
        assert old.version == 1 and old.verify()
        expected = old.gather(1, 1, np.array([3, 1]))
        assert store.upgrade(old)
        again = old.gather(1, 1, np.array([3, 1]))  # the open mapping still reads the old file
    with store.open("ij90") as new:
        assert new.version == FORMAT_VERSION and new.verify() and new.meta == {"doc": 1}
        for got, want in zip(new.gather(1, 1, np.array([3, 1])), expected):
            assert np.array_equal(got, want)
        assert all(np.array_equal(a, b) for a, b in zip(again, expected))
    # What a fresh write of the same data gives, byte for byte.
    store.write("mn56", keys, values, layers=[0, 1], precision="int4", meta={"doc": 1})
    assert store.path_for("ij90").read_bytes() == store.path_for("mn56").read_bytes()

    # A damaged format-1 segment is not rewritten.
    header, data_start, _ = read_layout_any(store.path_for("kl12"))
    flip_byte(store.path_for("kl12"), data_start + header["arrays"]["values"]["offset"] + 3)
    before = store.path_for("kl12").read_bytes()
    with store.open("kl12") as old:
        assert not store.upgrade(old)
    assert store.path_for("kl12").read_bytes() == before


def read_layout_any(path: Path) -> tuple[dict, int, bytes]:
    blob = path.read_bytes()
    length = struct.unpack_from("<I", blob, 8)[0]
    return json.loads(blob[12 : 12 + length]), -(-(12 + length) // 64) * 64, blob


def test_collect_garbage_frees_what_is_not_kept(store: SegmentStore) -> None:
    sizes = {}
    for number, key in enumerate(("aa01", "ab02", "zz03", "aa04")):
        keys, values = make_kv(layers=1, tokens=20 + 30 * number, seed=number)
        sizes[key] = store.write(key, keys, values, layers=[0])
    assert sorted(store.keys()) == sorted(sizes) and store.total_bytes() == sum(sizes.values())
    freed = store.collect_garbage({"ab02", "aa04", "not-there"})
    assert freed == sizes["aa01"] + sizes["zz03"]
    assert sorted(store.keys()) == ["aa04", "ab02"]
    assert store.total_bytes() == sizes["ab02"] + sizes["aa04"]
    store.remove("ab02")
    store.remove("ab02")
    assert list(store.keys()) == ["aa04"] and not store.has("ab02")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda k, v: (k[0], v[0], [0, 1]), "4-D"),
        (lambda k, v: (k, v[:, :, :10], [0, 1]), "same shape"),
        (lambda k, v: (k, v, [0]), "layers"),
        (lambda k, v: (k, v, [4, 4]), "layers"),
        (lambda k, v: (np.where(k > 3, np.nan, k), v, [0, 1]), "finite"),
        (lambda k, v: (k[:, :, :0], v[:, :, :0], [0, 1]), "empty"),
        (lambda k, v: (k.astype(np.int32), v, [0, 1]), "floating"),
    ],
)
def test_bad_input_is_rejected(store: SegmentStore, change, message: str) -> None:
    keys, values, layers = change(*make_kv(tokens=16))
    with pytest.raises(ValueError, match=message):
        store.write("op56", keys, values, layers=layers)
    assert not store.path_for("op56").exists()


def test_bad_options_are_rejected(store: SegmentStore) -> None:
    keys, values = make_kv(layers=1, tokens=16, dim=7)
    for options, message in (({"precision": "int2"}, "precision"), ({"precision": "int4"}, "even"), ({"block_size": 0}, "block_size")):
        with pytest.raises(ValueError, match=message):
            store.write("qr78", keys, values, layers=[0], **options)
    with pytest.raises(ValueError, match="key"):
        store.path_for("../evil")


def test_int4_values_of_one_sign_keep_their_error_bound(store: SegmentStore) -> None:
    """The int4 zero point is a signed byte: a token whose values share one sign and
    barely vary (here 40 ± 0.01) would need a zero point far outside it at the
    plain step, so the step widens instead; the error stays within half a step."""
    rng = np.random.default_rng(7)
    values = (40.0 + 0.01 * rng.standard_normal((1, 1, 8, 16))).astype(np.float32)
    values[0, 0, 1] *= -1  # all negative
    values[0, 0, 2] = np.linspace(-1.0, 3.0, 16)  # mixed signs: the plain step
    keys = rng.standard_normal((1, 1, 8, 16)).astype(np.float32)
    store.write("ij90", keys, values, layers=[0], precision="int4", block_size=8)
    got = store.open("ij90").dequantize(0)[1]
    err = np.abs(got - values)[0, 0].max(axis=-1)
    assert np.all(err <= 40.02 / 112 / 2 * (1 + 2**-9)), err
    assert err[2] <= 4.0 / 15 / 2 * (1 + 2**-9) and err[2] > 0
    header, data_start, blob = read_layout(store.path_for("ij90"))
    zero = raw_array(header, data_start, blob, "value_zero")[0, 0]
    assert zero[0] < -100 and zero[1] > 100 and zero[2] == round(1.0 / (4.0 / 15))
