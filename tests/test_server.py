"""`quire serve` (app/server.py) as its clients see it: the real HTTP server on a free
local port over a temporary library, a scripted service behind it, and the official
`openai` client (or raw HTTP where the bytes are the point) in front."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from app.server import QuireServer
from engine.corpus.answerer import AskStats
from engine.generate import Token
from ingest.jobs import ingest_paths
from ingest.library import Library
from tests.gui.fakes import ScriptedService

HARBOUR = "Ships leave the harbour at dawn and return with the evening tide, loaded with fish and salt."
MILL = "The windmill on the hill grinds the village's wheat every autumn when the wind is steady."
ANSWER = "The answer is **42**."


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QUIRE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def documents(home, tmp_path) -> dict[str, int]:
    """Two ready text documents and a collection 'Harbours' holding the first."""
    paths = []
    for name, text in (("harbour.txt", HARBOUR), ("mill.txt", MILL)):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    with Library() as library:
        ingest_paths(library, paths)
        ids = {Path(r.path).name: r.id for r in library.documents(status="ready")}
        library.add_to_collection(library.create_collection("Harbours"), [ids["harbour.txt"]])
    assert set(ids) == {"harbour.txt", "mill.txt"}
    return ids


@contextmanager
def serving(service, **options) -> Iterator[QuireServer]:
    server = QuireServer(service, port=0, **options).start()
    try:
        yield server
    finally:
        server.close()


def client(server: QuireServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=30)


def raw(server: QuireServer) -> http.client.HTTPConnection:
    host, port = server.httpd.server_address[:2]
    return http.client.HTTPConnection(host, port, timeout=30)


def post(server: QuireServer, body: object, path: str = "/v1/chat/completions", headers: dict | None = None):
    """(status, headers, parsed JSON body) of a raw POST."""
    connection = raw(server)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, response, json.loads(payload)


def ask(question: str = "What is the answer?", model: str = "quire", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": question}], **extra}


def expected_sources(*texts_and_titles: tuple[str, str]) -> str:
    """The sources block for the scripted service's evidence: the first 60 characters
    of each document in scope, page 1, numbered in order."""
    lines = [f"[{n}] {title}, p. 1: “{' '.join(text[:60].split())}”" for n, (title, text) in enumerate(texts_and_titles, 1)]
    return "\n\nSources:\n" + "\n".join(lines)


BOTH = expected_sources(("harbour.txt", HARBOUR), ("mill.txt", MILL))


# -- the openai client -------------------------------------------------------------


def test_models_are_the_library_and_its_collections(documents):
    with serving(ScriptedService()) as server:
        models = client(server).models.list()
        assert [m.id for m in models.data] == ["quire", "quire-model", "quire/collection/Harbours"]
        assert client(server).models.retrieve("quire/collection/Harbours").id == "quire/collection/Harbours"


def test_a_whole_answer_carries_its_sources_and_evidence(documents):
    service = ScriptedService()
    with serving(service) as server:
        completion = client(server).chat.completions.create(
            model="quire", messages=[{"role": "user", "content": "What is the answer?"}])
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "quire"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ANSWER + BOTH
    assert choice.finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (12, 4, 16)
    evidence = completion.quire_evidence
    assert [(e["number"], e["document_id"], e["title"], e["page_label"]) for e in evidence] == [
        (1, documents["harbour.txt"], "harbour.txt", "1"), (2, documents["mill.txt"], "mill.txt", "1")]
    assert evidence[0]["quote"] == HARBOUR[:60]
    assert (evidence[0]["char_start"], evidence[0]["char_end"]) == (0, 60)
    assert evidence[0]["cited"] is False
    assert completion.quire_stats["finish_reason"] == "stop"
    assert service.asked == [("What is the answer?", [documents["harbour.txt"], documents["mill.txt"]])]


def test_a_streamed_answer_arrives_in_pieces_then_sources_then_evidence(documents):
    with serving(ScriptedService()) as server:
        chunks = list(client(server).chat.completions.create(
            model="quire", messages=[{"role": "user", "content": "What is the answer?"}], stream=True,
            stream_options={"include_usage": True}))
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == ["The ", "answer ", "is ", "**42**.", BOTH]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == "stop"
    assert [e["document_id"] for e in final[0].quire_evidence] == [documents["harbour.txt"], documents["mill.txt"]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_the_model_name_chooses_the_scope(documents):
    harbour, mill = documents["harbour.txt"], documents["mill.txt"]
    service = ScriptedService()
    with serving(service) as server:
        openai_client = client(server)
        for model in ("quire", "quire-library", "quire/collection/Harbours", "quire/collection/harbours",
                      f"quire/docs/{mill}", f"quire/docs/{mill},{harbour}"):
            openai_client.chat.completions.create(model=model, messages=[{"role": "user", "content": model}])
        for model in ("quire/collection/Nowhere", "quire/docs/999", "quire/docs/x", "gpt-4o"):
            with pytest.raises(openai.NotFoundError) as raised:
                openai_client.chat.completions.create(model=model, messages=[{"role": "user", "content": "?"}])
            assert raised.value.code == "model_not_found"
        completion = openai_client.chat.completions.create(
            model="quire/collection/Harbours", messages=[{"role": "user", "content": "Where?"}])
    assert [ids for _, ids in service.asked] == [
        [harbour, mill], [harbour, mill], [harbour], [harbour], [mill], [mill, harbour], [harbour]]
    assert completion.choices[0].message.content == ANSWER + expected_sources(("harbour.txt", HARBOUR))


def test_a_new_empty_library_is_asked_over_nothing(home):
    service = ScriptedService()
    with serving(service) as server:
        status, _, body = post(server, ask())
    assert status == 200 and body["choices"][0]["message"]["content"] == ANSWER
    assert body["quire_evidence"] == []
    assert service.asked == [("What is the answer?", [])]


def test_earlier_messages_become_the_conversation(documents):
    service = ScriptedService()
    with serving(service) as server:
        client(server).chat.completions.create(model="quire", messages=[
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Who leaves at dawn?"},
            {"role": "assistant", "content": "The ships do [1]." + BOTH},
            {"role": "user", "content": [{"type": "text", "text": "And when do they return?"}]},
        ])
    assert service.asked[-1][0] == "And when do they return?"
    assert service.histories == [[("Who leaves at dawn?", "The ships do [1].")]]


# -- raw HTTP ----------------------------------------------------------------------


def assert_error(status: int, body: dict, expected_status: int, code: str | None = None, param: str | None = None):
    assert status == expected_status
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert body["error"]["code"] == code
    assert body["error"]["param"] == param


def test_bad_requests_get_openai_shaped_errors(documents):
    service = ScriptedService()
    with serving(service) as server:
        status, _, body = post(server, b"{not json")
        assert_error(status, body, 400)
        assert body["error"]["type"] == "invalid_request_error"
        status, _, body = post(server, {"model": "quire"})
        assert_error(status, body, 400, param="messages")
        status, _, body = post(server, {"model": "quire", "messages": [{"role": "system", "content": "hi"}]})
        assert_error(status, body, 400, param="messages")
        status, _, body = post(server, {"messages": [{"role": "user", "content": "hi"}]})
        assert_error(status, body, 400, param="model")
        status, _, body = post(server, ask(max_tokens=0))
        assert_error(status, body, 400, param="max_tokens")
        status, _, body = post(server, ask(model="quire/collection/Nowhere"))
        assert_error(status, body, 404, code="model_not_found", param="model")
        status, _, body = post(server, ask(), path="/v1/completions")
        assert_error(status, body, 404, code="not_found")

        connection = raw(server)
        connection.request("GET", "/v1/chat/completions")
        response = connection.getresponse()
        assert_error(response.status, json.loads(response.read()), 405, code="method_not_allowed")
        assert response.getheader("Allow") == "POST"
        # The same connection stays usable after an error (keep-alive).
        connection.request("GET", "/v1/models")
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["data"][0]["id"] == "quire"
    assert service.asked == []


def test_an_api_key_is_required_when_set(documents):
    with serving(ScriptedService(), api_key="sesame") as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            status, _, body = post(server, ask(), headers=headers)
            assert_error(status, body, 401, code="invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            client(server, key="wrong").models.list()
        assert [m.id for m in client(server, key="sesame").models.list().data][0] == "quire"
        status, _, body = post(server, ask(), headers={"Authorization": "Bearer sesame"})
        assert status == 200 and body["choices"][0]["message"]["content"].startswith(ANSWER)


def test_without_a_key_only_requests_naming_this_machine_are_served(documents):
    with serving(ScriptedService()) as server:
        status, _, body = post(server, ask(), headers={"Host": "attacker.example:8765"})
        assert_error(status, body, 403, code="forbidden_host")
        for host in ("localhost:8765", "127.0.0.1", "[::1]:8765"):
            assert post(server, ask(), headers={"Host": host})[0] == 200
    with serving(ScriptedService(), api_key="sesame") as server:
        headers = {"Host": "quire.example", "Authorization": "Bearer sesame"}
        assert post(server, ask(), headers=headers)[0] == 200


def test_the_stream_is_server_sent_events_ending_in_done(documents):
    with serving(ScriptedService()) as server:
        connection = raw(server)
        connection.request("POST", "/v1/chat/completions", body=json.dumps(ask(stream=True)),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type").startswith("text/event-stream")
        text = response.read().decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ANSWER + BOTH
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("stop") == 1
    assert "quire_evidence" in chunks[-1] and all("quire_evidence" not in c for c in chunks[:-1])


def test_a_failing_service_is_an_error_not_a_dead_server(documents):
    service = ScriptedService(fail_after=2)
    with serving(service) as server:
        status, _, body = post(server, ask())
        assert status == 500 and body["error"]["type"] == "server_error"
        assert "the scripted service broke" in body["error"]["message"]
        with pytest.raises(openai.APIError, match="the scripted service broke"):
            list(client(server).chat.completions.create(model="quire", messages=[{"role": "user", "content": "?"}],
                                                       stream=True))
        service.fail_after = None
        status, _, body = post(server, ask())
        assert status == 200


# -- one service, many clients ------------------------------------------------------


class EchoService(ScriptedService):
    """Answers each question with its own words, so a mixed-up answer shows."""

    def ask(self, question, documents, max_tokens, cancel, history=()):
        self.pieces = ["answer ", "to ", question]
        yield from super().ask(question, documents, max_tokens, cancel, history)


def test_concurrent_requests_are_all_answered_in_order_of_arrival(documents):
    service = EchoService(delay=0.005)
    arrived: list[str] = []
    answers: dict[int, str] = {}
    with serving(service) as server:
        submit = server.answers.submit
        arriving = threading.Lock()

        def recording_submit(job):
            with arriving:  # the order recorded is the order queued
                arrived.append(job.question)
                submit(job)

        server.answers.submit = recording_submit

        def one(number: int) -> None:
            if number % 2 == 0:
                chunks = client(server).chat.completions.create(
                    model="quire", messages=[{"role": "user", "content": f"question {number}"}], stream=True)
                answers[number] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                status, _, body = post(server, ask(f"question {number}"))
                assert status == 200
                answers[number] = body["choices"][0]["message"]["content"]

        threads = [threading.Thread(target=one, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert sorted(answers) == list(range(20))
    for number, text in answers.items():
        assert text == f"answer to question {number}" + BOTH
    assert [question for question, _ in service.asked] == arrived
    assert sorted(arrived) == sorted(f"question {n}" for n in range(20))


class RecordingService(ScriptedService):
    """Keeps what each ask yielded, to see how it ended."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.outcomes: list[list] = []

    def ask(self, question, documents, max_tokens, cancel, history=()):
        events: list = []
        for event in super().ask(question, documents, max_tokens, cancel, history):
            events.append(event)
            yield event
        self.outcomes.append(events)


def open_stream(server: QuireServer, question: str) -> socket.socket:
    """A raw socket that has sent a streaming request (and reads nothing yet)."""
    host, port = server.httpd.server_address[:2]
    sock = socket.create_connection((host, port), timeout=30)
    body = json.dumps(ask(question, stream=True)).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_client_that_leaves_mid_stream_cancels_its_answer(documents):
    service = RecordingService(pieces=["word "] * 200, delay=0.02)
    with serving(service) as server:
        sock = open_stream(server, "Tell me everything.")
        received = b""
        while b'"content": "word "' not in received:
            received += sock.recv(4096)
        sock.close()
        wait_for(lambda: len(service.outcomes) == 1)
        # The server is free again and answers the next client.
        service.delay = 0.0
        status, _, body = post(server, ask())
        assert status == 200
    first = service.outcomes[0]
    assert isinstance(first[-1], AskStats) and first[-1].finish_reason == "cancelled"
    assert sum(isinstance(e, Token) for e in first) < 100


def test_a_queued_request_whose_client_left_is_skipped(documents):
    service = RecordingService(pieces=["word "] * 50, delay=0.02)
    results: dict[str, int] = {}

    def request(question: str) -> None:
        results[question] = post(server, ask(question))[0]

    with serving(service) as server:
        first = threading.Thread(target=request, args=("first",))
        first.start()
        assert service.started.wait(10)
        gone = open_stream(server, "gone")
        wait_for(lambda: server.answers.waiting() == 1)
        gone.close()
        time.sleep(0.5)  # the request's thread notices within POLL_SECONDS
        last = threading.Thread(target=request, args=("last",))
        last.start()
        first.join(30)
        last.join(30)
    assert results == {"first": 200, "last": 200}
    assert [question for question, _ in service.asked] == ["first", "last"]


# -- the real model ----------------------------------------------------------------


@pytest.fixture
def default_model_folder() -> Path:
    """The installed default model's folder, found before `home` moves QUIRE_HOME."""
    from engine.install import find_default
    from engine.model_store import is_converted
    from engine.paths import models_dir
    from engine.runtime import DEFAULT_MODEL

    model = find_default(DEFAULT_MODEL)
    folder = models_dir() / model.name
    if not is_converted(folder, model.sha256):
        pytest.skip(f"{model.name} is not installed (quire models install)")
    return folder


@pytest.mark.slow
def test_the_real_default_model_answers_through_the_server(default_model_folder, documents):
    from app.service import LocalService
    from app.settings import AppSettings

    service = LocalService(AppSettings(model=str(default_model_folder), device="cpu"))
    with serving(service) as server:
        completion = client(server).chat.completions.create(
            model="quire/collection/Harbours", max_tokens=16,
            messages=[{"role": "user", "content": "When do the ships leave the harbour?"}])
    text = completion.choices[0].message.content
    assert text.split("\n\nSources:\n")[0].strip()
    assert "harbour.txt" in text.split("\n\nSources:\n")[1]
    assert [e["document_id"] for e in completion.quire_evidence] == [documents["harbour.txt"]]
    assert 0 < completion.usage.completion_tokens <= 16
