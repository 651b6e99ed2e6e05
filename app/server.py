"""An OpenAI-compatible HTTP server whose context is the library (`quire serve`).

Any client of OpenAI's chat API (Open WebUI, the `openai` package, curl) asks its
questions over the user's documents and gets the cited answer back:

    GET  /v1/models              the library, and one model per collection
    GET  /v1/models/{model}      one of them
    POST /v1/chat/completions    an answer, streamed (server-sent events) or whole

The model name chooses the scope: `quire` (or `quire-library`) is every ready
document, `quire/collection/<name>` a collection, `quire/docs/<id>,<id>` documents by
id. The answer is `Service.ask`'s, the path the window and `quire ask` use: the
last user message is the question, the earlier user/assistant pairs are the
conversation (`Turn`s; the sources block this server appended to an earlier answer
is dropped from it), and system messages are ignored, since the engine writes its
own grounded prompt. Sampling parameters (temperature, top_p, n, stop, tools) are
ignored for the same reason; `max_tokens` (or `max_completion_tokens`) is honoured.

Evidence comes back twice: as numbered sources appended to the answer's text
("\\n\\nSources:\\n[1] Title, p. 12: “quote…”"; the cited passages, or every passage
read where none was cited), and as the extension field `quire_evidence` (with
`quire_stats`) on the whole response and on the last streamed chunk. Shapes follow
OpenAI's API reference (https://platform.openai.com/docs/api-reference/chat): errors
are {"error": {"message", "type", "param", "code"}}.

There is one service (one model), so answers queue: a single worker thread runs
them one at a time in order of arrival. The HTTP side is threaded; each request's thread waits on
its own answer and watches its connection, so a client that goes away cancels its
answer (the service is asked with a cancel callable) and a request still waiting in
the queue when its client leaves is skipped. No Qt here and no model: the caller
passes any `Service` (tests pass a scripted one).

It listens on 127.0.0.1 unless told otherwise. With an API key every request needs
`Authorization: Bearer KEY`; without one, a loopback server answers only requests
whose Host header names this machine (a defence against DNS rebinding).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import queue
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from app.service import AskEvent, Service, scope_documents
from engine.corpus.answer import Turn
from engine.corpus.answerer import AskStats, Evidence
from engine.generate import Token
from ingest.errors import LibraryError
from ingest.library import Library

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
LIBRARY_MODELS = ("quire", "quire-library")
# The model alone, without the library: the messages go to it as they are (system
# messages and all). For another program — or another Quire, as its reader
# (engine/reader.py) — that wants Quire's model and not its documents.
MODEL_ALONE = "quire-model"
COLLECTION_PREFIX = "quire/collection/"
DOCUMENTS_PREFIX = "quire/docs/"
SOURCES_HEADING = "\n\nSources:\n"
QUOTE_CHARS = 200  # of a quote in the sources block; quire_evidence carries it whole
MAX_BODY_BYTES = 16 * 2**20  # a long conversation is well under a megabyte
# How often a request waiting on its answer looks whether its client has gone: the
# answer is cancelled within this much of a disconnect.
POLL_SECONDS = 0.1
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class ApiError(Exception):
    """A request the server refuses, answered in OpenAI's error shape."""

    def __init__(self, status: HTTPStatus, message: str, *, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param
        self.allow = allow  # the method a 405 names

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _unknown_model(model: str) -> ApiError:
    return ApiError(
        HTTPStatus.NOT_FOUND,
        f"The model '{model}' does not exist: use 'quire' (the library), 'quire/collection/<name>' "
        "or 'quire/docs/<id>,<id>' (GET /v1/models lists them)",
        code="model_not_found", param="model",
    )


# -- scope -------------------------------------------------------------------------


def resolve_scope(library: Library, model: str) -> list[int] | None:
    """The document ids a model name asks over (None: every ready document; [] for
    the model alone)."""
    if model == MODEL_ALONE:
        return []
    if model in LIBRARY_MODELS:
        return None
    if model.startswith(COLLECTION_PREFIX):
        name = model[len(COLLECTION_PREFIX):]
        collections = library.collections()
        found = [c for c in collections if c.name == name] or [
            c for c in collections if c.name.casefold() == name.casefold()
        ]
        if len(found) != 1:
            raise _unknown_model(model)
        return list(found[0].document_ids)
    if model.startswith(DOCUMENTS_PREFIX):
        try:
            ids = [int(part) for part in model[len(DOCUMENTS_PREFIX):].split(",")]
        except ValueError:
            raise _unknown_model(model) from None
        for document_id in ids:
            try:
                library.get(document_id)
            except LibraryError:
                raise _unknown_model(model) from None
        return ids
    raise _unknown_model(model)


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


def list_models(library: Library) -> list[dict]:
    """The library as a model, then one model per collection, in OpenAI's shape."""
    models = [{"id": LIBRARY_MODELS[0], "object": "model", "created": 0, "owned_by": "quire"},
              {"id": MODEL_ALONE, "object": "model", "created": 0, "owned_by": "quire"}]
    for collection in library.collections():
        models.append({
            "id": COLLECTION_PREFIX + collection.name, "object": "model",
            "created": _epoch(collection.created_at), "owned_by": "quire",
        })
    return models


# -- request -----------------------------------------------------------------------


@dataclass(frozen=True)
class ChatRequest:
    model: str
    question: str
    history: list[Turn]
    max_tokens: int
    stream: bool
    include_usage: bool
    messages: list[dict] = field(default_factory=list)  # as sent, text only: for MODEL_ALONE


def _content_text(content: object, index: int) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
    raise ApiError(HTTPStatus.BAD_REQUEST, f"messages[{index}].content must be a string or a list of content parts",
                   param=f"messages[{index}].content")


def _without_sources(answer: str) -> str:
    """An earlier answer without the sources block this server appended to it."""
    head, heading, _ = answer.rpartition(SOURCES_HEADING)
    return head if heading else answer


def conversation(messages: list) -> tuple[str, list[Turn]]:
    """(question, earlier turns) from OpenAI chat messages: the last user message is
    the question; each earlier user message and the assistant reply after it are a
    turn (consecutive user messages join); system, developer and tool messages are
    not part of the conversation the engine reads."""
    said: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"messages[{index}] must be an object with a role",
                           param=f"messages[{index}]")
        if message["role"] in ("user", "assistant"):
            said.append((message["role"], _content_text(message.get("content"), index)))
    last_user = max((i for i, (role, _) in enumerate(said) if role == "user"), default=None)
    if last_user is None:
        raise ApiError(HTTPStatus.BAD_REQUEST, "messages must hold a user message: the question", param="messages")
    question = said[last_user][1].strip()
    if not question:
        raise ApiError(HTTPStatus.BAD_REQUEST, "the last user message is empty", param="messages")
    turns: list[Turn] = []
    asked: list[str] = []
    for role, text in said[:last_user]:
        if role == "user":
            asked.append(text)
        elif asked:
            turns.append(Turn("\n".join(asked), _without_sources(text)))
            asked = []
    return question, turns


def parse_chat_request(body: bytes, default_max_tokens: int) -> ChatRequest:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(HTTPStatus.BAD_REQUEST, "'model' is required: 'quire' asks over the whole library", param="model")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(HTTPStatus.BAD_REQUEST, "'messages' is required: a non-empty list", param="messages")
    question, history = conversation(messages)
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    if max_tokens is None:
        max_tokens = default_max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ApiError(HTTPStatus.BAD_REQUEST, "'max_tokens' must be a positive integer", param="max_tokens")
    options = payload.get("stream_options") or {}
    plain = [{"role": m["role"], "content": _content_text(m.get("content"), i)} for i, m in enumerate(messages)
             if m["role"] in ("system", "user", "assistant")]
    return ChatRequest(
        model=model, question=question, history=history, max_tokens=max_tokens, stream=bool(payload.get("stream")),
        include_usage=isinstance(options, dict) and bool(options.get("include_usage")), messages=plain,
    )


# -- the answer queue --------------------------------------------------------------


@dataclass(frozen=True)
class Failed:
    """The engine failed on this answer: one line for the client."""

    message: str


FINISHED = object()  # the last thing a job's events carry when its answer is complete


@dataclass
class AnswerJob:
    """One question waiting for, or getting, its answer. The worker puts the engine's
    events into `events` and then FINISHED or a `Failed`; the request's thread reads
    them and cancels the job when its client goes."""

    question: str
    document_ids: list[int] | None
    max_tokens: int
    history: list[Turn] = field(default_factory=list)
    messages: list[dict] | None = None  # the model alone: these messages, no library
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


def _one_line(error: BaseException) -> str:
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return "out of memory: choose a smaller model or fewer documents"
    return (" ".join(str(error).split()) or type(error).__name__)[:400]


class AnswerQueue:
    """The service's only user: one thread answers jobs one at a time, first come
    first served. A job cancelled before its turn is skipped."""

    def __init__(self, service: Service, library_path: Path | None = None) -> None:
        self.service = service
        self.library_path = library_path
        self._jobs: queue.Queue[AnswerJob | None] = queue.Queue()
        self._current: AnswerJob | None = None
        self._thread = threading.Thread(target=self._run, name="quire-answers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: AnswerJob) -> None:
        self._jobs.put(job)

    def waiting(self) -> int:
        return self._jobs.qsize()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the answer under way and every waiting one, and end the thread."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.events.put(Failed("the server is shutting down"))
        current = self._current
        if current is not None:
            current.cancel()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        library = Library(self.library_path)
        try:
            self._prepare(library)
            while (job := self._jobs.get()) is not None:
                if job.cancelled.is_set():
                    log.info("skipped a queued question whose client has gone: %.60s", job.question)
                    continue
                self._current = job
                self._answer(job, library)
                self._current = None
        finally:
            library.close()

    def _prepare(self, library: Library) -> None:
        """Index the whole library's passages now (the usual scope), so the first
        question does not wait for it."""
        prepare: Callable[[list], None] | None = getattr(self.service, "prepare", None)
        if prepare is None:
            return
        try:
            prepare(scope_documents(library, None))
        except Exception:  # noqa: BLE001 — the first question builds it again, and reports a failure
            log.exception("could not index the library ahead of the first question")

    def _answer(self, job: AnswerJob, library: Library) -> None:
        try:
            if job.messages is not None:
                events = self.service.chat(job.messages, job.max_tokens, job.cancelled.is_set)
            else:
                documents = scope_documents(library, job.document_ids)
                events = self.service.ask(job.question, documents, job.max_tokens, job.cancelled.is_set, job.history)
            for event in events:
                job.events.put(event)
        except Exception as error:  # noqa: BLE001 — one failed answer must not stop the server
            log.exception("the answer failed")
            job.events.put(Failed(_one_line(error)))
        else:
            job.events.put(FINISHED)


# -- the answer as OpenAI shapes ---------------------------------------------------


def numbered_evidence(evidence: Sequence[Evidence]) -> list[tuple[int, Evidence]]:
    """Each passage with its [n]: the number the answer's prompt gave it, else its
    place in the list."""
    return sorted(
        ((e.number if e.number is not None else place, e) for place, e in enumerate(evidence, 1)),
        key=lambda pair: pair[0],
    )


def _quote(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= QUOTE_CHARS else flat[:QUOTE_CHARS].rstrip() + "…"


def sources_text(evidence: Sequence[Evidence], answer: str = "") -> str:
    """The sources block appended to `answer`: the cited passages, or every passage
    read where the answer cited none; empty without evidence. An answer cut off
    inside a Markdown code fence has it closed first, or the sources would render
    as code."""
    numbered = numbered_evidence(evidence)
    shown = [(n, e) for n, e in numbered if e.cited] or numbered
    if not shown:
        return ""
    fence = "\n```" if answer.count("```") % 2 else ""
    lines = [
        f"[{n}] {e.title}" + (f", p. {e.page_label}" if e.page_label else "") + f": “{_quote(e.text)}”"
        for n, e in shown
    ]
    return fence + SOURCES_HEADING + "\n".join(lines)


def evidence_json(evidence: Sequence[Evidence]) -> list[dict]:
    return [
        {
            "number": n, "document_id": e.doc_id, "title": e.title, "page_label": e.page_label,
            "page_index": e.page_index, "char_start": e.char_start, "char_end": e.char_end, "quote": e.text,
            "cited": e.cited, "supported": e.supported, "weight": round(e.weight, 4),
        }
        for n, e in numbered_evidence(evidence)
    ]


def finish_reason(stats: AskStats | None) -> str:
    return "length" if stats is not None and stats.finish_reason == "length" else "stop"


def usage(stats: AskStats | None) -> dict | None:
    if stats is None:
        return None
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


class ClientGone(Exception):
    """The request's client closed its connection."""


def client_gone(connection: socket.socket) -> bool:
    """Whether the peer closed the connection: it reads as at its end (or failed)
    while the client, waiting for the answer, has nothing to send."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        if not readable:
            return False
        return connection.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


# -- HTTP --------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    quire: QuireServer

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001 - socketserver's signature
        """A client that hangs up before its request is read is not an error worth a
        traceback on the terminal (socketserver prints one); anything else is logged."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.debug("client %s went away: %s", client_address, error)
            return
        log.exception("request from %s failed", client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer coding
    server_version = "Quire"
    _chunked = True  # whether a stream is sent in chunked transfer coding

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 — the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        quire = self.server.quire
        self._streaming = False
        try:
            try:
                self._route(quire, method)
            except ApiError as error:
                self._send_json(error.status, error.body(), allow=error.allow)
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, ClientGone):
                raise
            except Exception as error:  # noqa: BLE001 — a client gets an answer, the server goes on
                log.exception("%s %s failed", method, self.path)
                self.close_connection = True
                if not self._streaming:
                    failure = ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, _one_line(error), kind="server_error")
                    self._send_json(failure.status, failure.body())
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, ClientGone):
            self.close_connection = True

    def _route(self, quire: QuireServer, method: str) -> None:
        body = self._read_body()
        self._check_host(quire)
        self._authorise(quire.api_key)
        path = urlsplit(self.path).path.rstrip("/")
        if path == "/v1/chat/completions":
            self._allow(method, "POST")
            self._chat(quire, body)
        elif path == "/v1/models":
            self._allow(method, "GET")
            with Library(quire.library_path) as library:
                self._send_json(HTTPStatus.OK, {"object": "list", "data": list_models(library)})
        elif path.startswith("/v1/models/"):
            self._allow(method, "GET")
            self._model(quire, unquote(path[len("/v1/models/"):]))
        else:
            raise ApiError(HTTPStatus.NOT_FOUND, f"Invalid URL ({method} {urlsplit(self.path).path})",
                           code="not_found")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise ApiError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is over {MAX_BODY_BYTES // 2**20} MiB")
        return self.rfile.read(length) if length > 0 else b""

    def _authorise(self, api_key: str | None) -> None:
        if api_key is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(HTTPStatus.UNAUTHORIZED,
                           "Incorrect API key provided: send it as 'Authorization: Bearer KEY' (quire serve --api-key)",
                           code="invalid_api_key")

    def _check_host(self, quire: QuireServer) -> None:
        """On a loopback address without a key, only requests that name this machine:
        a web page whose own name an attacker points at 127.0.0.1 (DNS rebinding)
        would otherwise read the library through the visitor's browser."""
        if quire.api_key is not None or not quire.loopback:
            return
        host = self.headers.get("Host", "")
        name = host.rpartition("]")[0].lstrip("[") if host.startswith("[") else host.partition(":")[0]
        if name.lower() not in LOOPBACK_NAMES:
            raise ApiError(HTTPStatus.FORBIDDEN, f"Host '{host}' is not this machine: ask for 127.0.0.1 or localhost "
                           "(or serve with an API key)", code="forbidden_host")

    @staticmethod
    def _allow(method: str, allowed: str) -> None:
        if method != allowed:
            raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed here: use {allowed}",
                           code="method_not_allowed", allow=allowed)

    def _model(self, quire: QuireServer, model: str) -> None:
        with Library(quire.library_path) as library:
            resolve_scope(library, model)
            known = {m["id"]: m for m in list_models(library)}
        self._send_json(HTTPStatus.OK, known.get(model, {"id": model, "object": "model", "created": 0, "owned_by": "quire"}))

    def _send_json(self, status: HTTPStatus, payload: dict, *, allow: str | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if allow:
            self.send_header("Allow", allow)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    # -- chat completions --------------------------------------------------------

    def _chat(self, quire: QuireServer, body: bytes) -> None:
        request = parse_chat_request(body, quire.max_tokens)
        with Library(quire.library_path) as library:
            document_ids = resolve_scope(library, request.model)
        job = AnswerJob(request.question, document_ids, request.max_tokens, request.history,
                        messages=request.messages if request.model == MODEL_ALONE else None)
        quire.answers.submit(job)
        try:
            if request.stream:
                self._stream(request, job)
            else:
                self._whole(request, job)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, ClientGone):
            job.cancel()
            raise

    def _events(self, job: AnswerJob) -> Iterator[AskEvent | Failed]:
        """The job's events as they come, until it is finished; the client's going
        while it waits cancels the job (ClientGone)."""
        while True:
            try:
                event = job.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if client_gone(self.connection):
                    raise ClientGone from None
                continue
            if event is FINISHED:
                return
            yield event
            if isinstance(event, Failed):
                return

    def _whole(self, request: ChatRequest, job: AnswerJob) -> None:
        pieces: list[str] = []
        evidence: list[Evidence] = []
        stats: AskStats | None = None
        for event in self._events(job):
            if isinstance(event, Failed):
                raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"the answer failed: {event.message}",
                               kind="server_error", code="engine_error")
            if isinstance(event, Token):
                pieces.append(event.text)
            elif isinstance(event, Evidence):
                evidence.append(event)
            elif isinstance(event, AskStats):
                stats = event
        answer = "".join(pieces)
        response = {
            "id": _completion_id(), "object": "chat.completion", "created": int(time.time()), "model": request.model,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": answer + sources_text(evidence, answer)},
                "logprobs": None, "finish_reason": finish_reason(stats),
            }],
            "quire_evidence": evidence_json(evidence),
            "quire_stats": asdict(stats) if stats is not None else None,
        }
        if stats is not None:
            response["usage"] = usage(stats)
        self._send_json(HTTPStatus.OK, response)

    def _stream(self, request: ChatRequest, job: AnswerJob) -> None:
        # HTTP/1.0 has no chunked coding: such a client reads to the connection's end.
        self._chunked = self.request_version != "HTTP/1.0"
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self._streaming = True
        completion_id, created = _completion_id(), int(time.time())

        def chunk(delta: dict, reason: str | None = None, **extra: object) -> dict:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": request.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}], **extra}

        self._send_event(chunk({"role": "assistant", "content": ""}))
        pieces: list[str] = []
        evidence: list[Evidence] = []
        stats: AskStats | None = None
        for event in self._events(job):
            if isinstance(event, Failed):
                error = ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"the answer failed: {event.message}",
                                 kind="server_error", code="engine_error")
                self._send_event(error.body())
                self._end_stream()
                return
            if isinstance(event, Token) and event.text:
                pieces.append(event.text)
                self._send_event(chunk({"content": event.text}))
            elif isinstance(event, Evidence):
                evidence.append(event)
            elif isinstance(event, AskStats):
                stats = event
        sources = sources_text(evidence, "".join(pieces))
        if sources:
            self._send_event(chunk({"content": sources}))
        self._send_event(chunk({}, finish_reason(stats), quire_evidence=evidence_json(evidence),
                               quire_stats=asdict(stats) if stats is not None else None))
        if request.include_usage:
            self._send_event({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                              "model": request.model, "choices": [], "usage": usage(stats)})
        self._end_stream()

    def _send_event(self, payload: dict) -> None:
        self._write_chunk(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")

    def _end_stream(self) -> None:
        self._write_chunk(b"data: [DONE]\n\n")
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _write_chunk(self, data: bytes) -> None:
        # HTTP/1.1 chunked transfer coding (RFC 9112 §7.1): size in hex, CRLF, data, CRLF.
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


class QuireServer:
    """The HTTP server and the answer queue behind it. `serve_forever()` blocks (the
    CLI); `start()` serves from a thread (tests, benchmarks); `close()` stops both.
    Port 0 binds a free port: `url` says which."""

    def __init__(self, service: Service, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 api_key: str | None = None, library_path: Path | None = None, max_tokens: int = 384) -> None:
        self.api_key = api_key or None
        self.loopback = is_loopback(host)
        # Opened once here so that a new library's schema is made before two threads
        # (the answers' and a request's) would both make it at once.
        Library(library_path).close()
        self.library_path = library_path
        self.max_tokens = max_tokens
        self.answers = AnswerQueue(service, library_path)
        self.httpd = _HTTPServer((host, port), _Handler)
        self.httpd.quire = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def serve_forever(self) -> None:
        self.answers.start()
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> QuireServer:
        self._thread = threading.Thread(target=self.serve_forever, name="quire-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()
        self.answers.stop()

    def __enter__(self) -> QuireServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
