"""The reader (engine/reader.py): who writes the answer from Quire's passages. A
model on an OpenAI-compatible server, tested against real servers started here;
the failures a person meets each give one line."""

from __future__ import annotations

import socket
import threading

import pytest

from engine.generate import GenerationStats, SamplingParams
from engine.reader import ReaderError, RemoteReader, RemoteSpec, make_reader


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
