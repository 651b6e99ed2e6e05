"""engine.model_discovery: GGUFs in Ollama's, LM Studio's and the Hugging Face cache's
own layouts (built here around tiny GGUFs written with gguf.GGUFWriter), what their
headers say against the loader and gguf-py's own reader, loading one in place (no copy
of the GGUF), `quire models found`, and the settings dialog's list."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from engine import model_discovery
from engine.errors import QuireEngineError
from engine.gguf_loader import read_gguf
from engine.model_discovery import HUGGING_FACE, LM_STUDIO, OLLAMA, find_models, read_header, why_not_loadable
from engine.model_store import open_model
from tests.test_gguf_loader import tiny_writer, write_tiny_gguf

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before pytest-qt makes the QApplication

GGUF_MAGIC = b"GGUF"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake user home with no tool stores yet; Quire's data folder beside it."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("QUIRE_HOME", str(tmp_path / "quire"))
    for variable in ("OLLAMA_MODELS", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "QUIRE_GGUF_DIR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(model_discovery, "OLLAMA_SYSTEM_DIRS", ())
    return home


def write_projector(path: Path) -> None:
    """What llama.cpp's clip converter writes for a vision projector (mmproj)."""
    writer = GGUFWriter(str(path), "clip")
    writer.add_type("mmproj")
    writer.add_tensor("mm.0.weight", np.ones((4, 8), dtype=np.float32))
    _finish(writer)


def write_split_part(path: Path, number: int, count: int) -> None:
    """Part `number` (0-based) of a split model, as gguf-split writes it."""
    writer = tiny_writer(path, "llama", "tiny split model")
    writer.add_uint16("split.no", number)
    writer.add_uint16("split.count", count)
    writer.add_tensor("token_embd.weight", np.ones((40, 64), dtype=np.float32))
    _finish(writer)


def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def ollama_add(root: Path, gguf: Path, manifest: str, *, projector: Path | None = None) -> Path:
    """Store `gguf` as Ollama does: blobs/sha256-<hex of its bytes>, and a manifest at
    manifests/<host>/<namespace>/<model>/<tag> whose model layer names that digest."""
    (root / "blobs").mkdir(parents=True, exist_ok=True)

    def blob(path: Path, media_type: str) -> dict:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / f"sha256-{digest}").write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    template = root / "template.txt"
    template.write_text("{{ .Prompt }}")
    layers = [blob(gguf, "application/vnd.ollama.image.model"), blob(template, "application/vnd.ollama.image.template")]
    if projector is not None:
        layers.append(blob(projector, "application/vnd.ollama.image.projector"))
    template.unlink()
    config = {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "0" * 64, "size": 2}
    path = root / "manifests" / manifest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                "config": config, "layers": layers}))
    return root / "blobs" / layers[0]["digest"].replace(":", "-")


def hf_add(hub: Path, repo: str, gguf: Path, filename: str, revision: str = "a" * 40) -> Path:
    """Store `gguf` as huggingface_hub does: blobs/<sha256> and a relative symlink to it
    from snapshots/<revision>/<filename>, and refs/main naming the revision."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    data = gguf.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "blobs" / digest).write_bytes(data)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    link = folder / "snapshots" / revision / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path("..", "..", "blobs", digest))
    return link


@pytest.fixture
def stores(home: Path, tmp_path: Path) -> dict[str, Path]:
    """One of each case, in each tool's layout; returns the paths the finder must give."""
    made = tmp_path / "made"
    made.mkdir()
    for seed in range(4):
        write_tiny_gguf(made / f"tiny{seed}.gguf", seed=seed)
    write_tiny_gguf(made / "phi.gguf", arch="phi3")
    write_projector(made / "mmproj.gguf")
    write_split_part(made / "split1.gguf", 0, 2)
    write_split_part(made / "split2.gguf", 1, 2)

    ollama = home / ".ollama" / "models"
    lm_studio = home / ".lmstudio" / "models" / "lmstudio-community" / "Tiny-GGUF"
    lm_studio.mkdir(parents=True)
    for name, source in [("Tiny-Q8_0.gguf", "tiny2"), ("Phi-F32.gguf", "phi"), ("mmproj-Tiny-F16.gguf", "mmproj")]:
        (lm_studio / name).write_bytes((made / f"{source}.gguf").read_bytes())
    hub = home / ".cache" / "huggingface" / "hub"
    return {
        "tiny:latest": ollama_add(ollama, made / "tiny0.gguf", "registry.ollama.ai/library/tiny/latest",
                                  projector=made / "mmproj.gguf"),
        "someone/tiny:q8": ollama_add(ollama, made / "tiny1.gguf", "registry.ollama.ai/someone/tiny/q8"),
        "lmstudio-community/Tiny-Q8_0": lm_studio / "Tiny-Q8_0.gguf",
        "lmstudio-community/Phi-F32": lm_studio / "Phi-F32.gguf",
        "org/tiny-q8_0": hf_add(hub, "org/Tiny-GGUF", made / "tiny3.gguf", "tiny-q8_0.gguf"),
        "org/tiny-split-00001-of-00002": (
            hf_add(hub, "org/Split-GGUF", made / "split1.gguf", "tiny-split-00001-of-00002.gguf"),
            hf_add(hub, "org/Split-GGUF", made / "split2.gguf", "tiny-split-00002-of-00002.gguf"),
        )[0],
    }


def test_finds_each_tools_layout(stores: dict[str, Path]) -> None:
    found = {model.name: model for model in find_models()}
    # The projector (an Ollama layer of its own, an LM Studio file) and the split
    # model's second part are not listed.
    assert set(found) == set(stores)
    assert [found[name].source for name in sorted(found)] == [
        LM_STUDIO, LM_STUDIO, HUGGING_FACE, HUGGING_FACE, OLLAMA, OLLAMA,
    ]
    for name, path in stores.items():
        model = found[name]
        assert model.path == path
        assert model.size == path.stat().st_size == len(path.read_bytes())
    assert found["tiny:latest"].path.name.startswith("sha256-")
    assert found["org/tiny-q8_0"].path.is_symlink()

    tiny = found["tiny:latest"]
    assert (tiny.architecture, tiny.family, tiny.loadable, tiny.reason) == ("llama", "llama", True, "")
    # write_tiny_gguf: embedding 40x64, norm 64, per layer 4 attention + 3 MLP matrices
    # and 2 norms, 2 layers; F32 but ffn_down (Q8_0), and no general.file_type.
    per_layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64 + 2 * 64
    assert tiny.parameters == 40 * 64 + 64 + 2 * per_layer
    assert tiny.quantisation == "F32"
    assert tiny.size_label == "76608"  # no general.size_label: the count, under a million

    phi = found["lmstudio-community/Phi-F32"]
    assert (phi.architecture, phi.family, phi.loadable) == ("phi3", "", False)
    assert "unsupported model architecture 'phi3'" in phi.reason
    split = found["org/tiny-split-00001-of-00002"]
    assert not split.loadable and split.reason.startswith("split into 2 files")
    assert sum(m.loadable for m in found.values()) == 4


def test_store_locations_follow_the_tools_variables(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    ollama_add(tmp_path / "ollama", tmp_path / "tiny.gguf", "registry.ollama.ai/library/tiny/1b")
    ollama_add(tmp_path / "ollama", tmp_path / "tiny.gguf", "hf.co/org/Tiny-GGUF/Q8_0")
    hf_add(tmp_path / "hf-home" / "hub", "org/Tiny-GGUF", tmp_path / "tiny.gguf", "tiny.gguf")
    assert find_models() == []
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    # Both manifests name the same blob: the file is listed once, under the first name.
    assert [(m.source, m.name) for m in find_models()] == [(HUGGING_FACE, "org/tiny"), (OLLAMA, "hf.co/org/Tiny-GGUF:Q8_0")]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert [m.source for m in find_models()] == [OLLAMA]


def test_header_matches_gguf_py_on_a_real_model(real_gguf) -> None:
    path = real_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    header = read_header(path)
    reader = GGUFReader(path)  # gguf-py's own reader, the reference (slow: every token)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0].name == "ARRAY":
            assert header.array_lengths[key] == len(field.data), key
        else:
            assert header.metadata[key] == field.contents(), key
    assert header.tensors == [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type)) for t in reader.tensors]
    model = model_discovery.describe(path, OLLAMA, "smollm2")
    assert (model.family, model.quantisation, model.size_label, model.loadable) == ("llama", "Q4_1", "135M", True)
    assert model.parameters == sum(int(t.n_elements) for t in reader.tensors)


@pytest.mark.parametrize(
    "case",
    ["complete", "unsupported architecture", "missing tensor", "foreign tensor", "projector"],
)
def test_loadable_agrees_with_the_loader(tmp_path: Path, case: str) -> None:
    """`why_not_loadable` from the header alone says yes exactly when read_gguf (the
    conversion's own check) accepts the file."""
    path = tmp_path / "model.gguf"
    if case == "projector":
        write_projector(path)
    else:
        arch = "qwen2moe" if case == "unsupported architecture" else "llama"
        skip = ("blk.1.ffn_up.weight",) if case == "missing tensor" else ()
        write_tiny_gguf(path, arch=arch, skip=skip)
    if case == "foreign tensor":
        write_tiny_gguf(tmp_path / "base.gguf")
        reader = GGUFReader(tmp_path / "base.gguf")
        writer = tiny_writer(path, "llama", "tiny")
        for tensor in reader.tensors:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
        writer.add_tensor("blk.0.ffn_gate_exps.weight", np.ones((2, 64), dtype=np.float32))
        _finish(writer)
    reason = why_not_loadable(read_header(path), path)
    try:
        read_gguf(path)
        accepted = True
    except QuireEngineError:
        accepted = False
    assert (reason == "") == accepted == (case == "complete"), reason


def test_discovered_gguf_loads_in_place(stores: dict[str, Path], home: Path, tmp_path: Path) -> None:
    from app.settings import AppSettings

    found = {model.name: model for model in find_models()}
    blob = found["tiny:latest"].path
    before = blob.stat()
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    # What the settings dialog stores when the model is picked, and what loading opens.
    settings = AppSettings(model=str(blob))
    folder = open_model(settings.model_spec())

    quire_models = tmp_path / "quire" / "models"
    assert folder.path.parent == quire_models
    # A blob's name says nothing: the folder is named from the GGUF's metadata.
    assert folder.path.name == "tiny-test-model-F32"
    source = json.loads((folder.path / "source.json").read_text())
    assert (source["path"], source["size"], source["sha256"]) == (str(blob), before.st_size, digest)
    after = blob.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    copies = [p for p in (tmp_path / "quire").rglob("*") if p.is_file() and p.read_bytes()[:4] == GGUF_MAGIC]
    assert copies == [] and not list((tmp_path / "quire").rglob("*.gguf"))
    assert folder.source_gguf == blob

    # Opened again: the same folder, not converted again.
    weights = folder.path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert open_model(str(blob)).path == folder.path and weights.stat().st_mtime_ns == stamp

    # An HF snapshot symlink: source.json names the blob it points to.
    link = found["org/tiny-q8_0"].path
    linked = open_model(str(link))
    assert linked.path.name == "tiny-q8_0"
    assert json.loads((linked.path / "source.json").read_text())["path"] == str(link.resolve())
    assert link.is_symlink()

    # `ollama rm`: the blob is gone, its conversion still opens by the same path.
    blob.unlink()
    assert open_model(str(blob)).path == folder.path


def test_files_of_one_name_get_their_own_folders(home: Path, tmp_path: Path) -> None:
    """LM Studio and the HF cache often hold files of the same name: converting one must
    not replace the other's conversion."""
    write_tiny_gguf(tmp_path / "a.gguf", seed=0)
    write_tiny_gguf(tmp_path / "b.gguf", seed=1)
    studio = home / ".lmstudio" / "models" / "org" / "Tiny-GGUF" / "tiny.gguf"
    studio.parent.mkdir(parents=True)
    studio.write_bytes((tmp_path / "a.gguf").read_bytes())
    link = hf_add(home / ".cache" / "huggingface" / "hub", "org/Tiny-GGUF", tmp_path / "b.gguf", "tiny.gguf")
    first, second = open_model(str(studio)), open_model(str(link))
    assert (first.path.name, second.path.name) == ("tiny", "tiny-2")
    assert open_model(str(studio)).path == first.path and open_model(str(link)).path == second.path


@pytest.mark.slow
def test_a_discovered_real_model_answers(real_gguf, home: Path, tmp_path: Path) -> None:
    """The smallest default model, pulled into an Ollama store: found, loaded by its
    blob's path through the runtime, and greedy text equals the installed model's."""
    pytest.importorskip("torch")
    from engine.generate import SamplingParams
    from engine.runtime import load_model

    source = real_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    blob = ollama_add(home / ".ollama" / "models", source, "registry.ollama.ai/library/smollm2/135m")
    [model] = find_models()
    assert (model.name, model.path, model.family, model.quantisation, model.loadable) == (
        "smollm2:135m", blob, "llama", "Q4_1", True)
    params = SamplingParams(max_new_tokens=8)
    loaded = load_model(str(model.path), backend="torch", device="cpu")
    assert loaded.folder.path.name == "smollm2-135M-8k-lc100k-mix1-ep2-Q4_1"
    answer = "".join(t.text for t in loaded.chat([{"role": "user", "content": "What is the capital of France?"}], params))
    installed = source.parent.parent / "smollm2-135m-instruct"  # the default install's conversion
    reference = load_model(str(installed if installed.is_dir() else source), backend="torch", device="cpu")
    expected = "".join(t.text for t in reference.chat([{"role": "user", "content": "What is the capital of France?"}], params))
    assert answer == expected and len(answer) > 8
    assert not list((tmp_path / "quire").rglob("*.gguf"))


def test_cli_lists_what_was_found(stores: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    assert main(["models", "found"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["name", "source", "family", "size", "params", "quant", "loadable"]
    row = next(line for line in lines if line.startswith("tiny:latest "))
    assert row.split()[1:3] == ["ollama", "llama"] and row.endswith(" yes")
    phi = next(line for line in lines if line.startswith("lmstudio-community/Phi-F32 "))
    assert "phi3" in phi and "no: unsupported model architecture 'phi3'" in phi
    assert f"    {stores['tiny:latest']}" in lines
    assert main(["models", "found", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {entry["name"]: entry["loadable"] for entry in listed}["lmstudio-community/Phi-F32"] is False


def test_settings_dialog_lists_and_picks(stores: dict[str, Path], qtbot) -> None:
    from PySide6.QtCore import Qt

    from app.gui.settings_dialog import SettingsDialog
    from app.settings import AppSettings

    found = find_models()
    dialog = SettingsDialog(AppSettings(), models=[], found=found)
    qtbot.addWidget(dialog)
    tree = dialog.found_list
    rows = [tree.topLevelItem(i) for i in range(tree.topLevelItemCount())]
    assert [row.text(0) for row in rows] == [m.name for m in found]
    phi = next(row for row in rows if row.text(0) == "lmstudio-community/Phi-F32")
    assert phi.text(2) == "phi3" and phi.text(5).startswith("no: ")
    assert not phi.flags() & Qt.ItemFlag.ItemIsSelectable

    dialog._use_found(phi)  # not loadable: the model stays the default
    assert dialog.chosen().model == ""
    tiny = next(row for row in rows if row.text(0) == "tiny:latest")
    assert tiny.text(5) == "yes"
    dialog._use_found(tiny)
    assert dialog.model.currentText() == "tiny:latest (ollama)"
    assert dialog.chosen().model == str(stores["tiny:latest"])

    # Reopened with that choice: the combo shows the name, not the blob's path.
    again = SettingsDialog(dialog.chosen(), models=[], found=found)
    qtbot.addWidget(again)
    assert again.model.currentText() == "tiny:latest (ollama)"
    assert again.chosen().model == str(stores["tiny:latest"])
