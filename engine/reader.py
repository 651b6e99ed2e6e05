"""Who writes the answer: the reader.

Quire chooses the passages itself (engine/corpus/retriever.py); the reader writes the
answer from them. By default that is the model that owns the cache. A person may
choose another: a bigger local GGUF (`LocalReader`), or a model behind an
OpenAI-compatible server they already run — Ollama, vLLM, LM Studio, llama.cpp's
server, or another `quire serve` (`RemoteReader`). A reader only needs to turn chat
messages into streamed tokens, and to estimate how long a text is.

A remote reader is named `URL/MODEL`, where URL is the server's OpenAI base URL
(ending in /v1) and MODEL the model's name there, which may itself hold slashes or
colons: `http://127.0.0.1:11434/v1/qwen2.5:7b`, `http://gpu-box:8000/v1/Qwen/Qwen2.5-7B-Instruct`.
Nothing is sent anywhere unless the person names a server.

The HTTP client is the standard library's: streaming chat completions are one POST
read as server-sent events (`data: {json}` lines, then `data: [DONE]`), and the
failures a person meets (the server is not running, a timeout, a model it does not
have, a key it refuses) each become one line in `ReaderError`.

Reference: OpenAI's chat completions API (streaming), https://platform.openai.com/docs/api-reference/chat
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from engine.errors import QuireEngineError
from engine.generate import GenerationStats, LoopStop, SamplingParams, Token

DEFAULT_TIMEOUT_S = 120.0  # first token of a large model on a busy server can take a while
CHARS_PER_TOKEN = 4  # the estimate of a remote model's token count (its tokenizer is not here)


class ReaderError(QuireEngineError):
    """The reader could not write the answer (server unreachable, timeout, unknown model)."""


class Reader(Protocol):
    name: str

    def chat(self, messages: list[dict], params: SamplingParams, *, cancel: Callable[[], bool] | None = None,
             stats: GenerationStats | None = None) -> Iterator[Token]: ...

    def chat_batch(self, conversations: list[list[dict]], params: SamplingParams, *,
                   cancel: Callable[[], bool] | None = None, stats: list[GenerationStats] | None = None) -> list[str]: ...

    def count_tokens(self, text: str) -> int: ...


def make_reader(spec: str, *, api_key: str = "", backend: str = "auto", device: str | None = None) -> Reader | None:
    """The reader a setting names: "" for the cache's own model (None), `URL/MODEL`
    for a server, else a local model (installed name, .gguf file or folder)."""
    spec = spec.strip()
    if not spec:
        return None
    if "://" in spec:
        return RemoteReader(spec, api_key)
    from engine.runtime import load_model

    options = {"device": device} if device is not None else {}
    return LocalReader(load_model(spec, backend=backend, **options))


class LocalReader:
    """A loaded model (engine.runtime) as the reader: a second, bigger GGUF."""

    def __init__(self, model) -> None:  # noqa: ANN001 - engine.runtime's loaded model
        self.model = model
        self.name = model.folder.name

    def chat(self, messages, params, *, cancel=None, stats=None) -> Iterator[Token]:  # noqa: ANN001
        return self.model.chat(messages, params, cancel=cancel, stats=stats)

    def chat_batch(self, conversations, params, *, cancel=None, stats=None) -> list[str]:  # noqa: ANN001
        """Several replies decoded together (whole-document tasks map over parts)."""
        return self.model.chat_batch(conversations, params, cancel=cancel, stats=stats)

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer.encode(text))


@dataclass(frozen=True)
class RemoteSpec:
    base_url: str  # "http://127.0.0.1:11434/v1"
    model: str

    @classmethod
    def parse(cls, spec: str) -> RemoteSpec:
        """`URL/MODEL` with URL ending in /v1 (see the module docstring)."""
        spec = spec.strip()
        head, marker, model = spec.partition("/v1/")
        parts = urlsplit(head)
        if not marker or not model.strip("/") or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ReaderError(
                f"reader {spec!r} is not URL/MODEL: give the server's OpenAI base URL (ending in /v1) and the model, "
                "e.g. http://127.0.0.1:11434/v1/qwen2.5:7b"
            )
        return cls(head + "/v1", model.strip("/"))


class RemoteReader:
    """A model behind an OpenAI-compatible server writes the answer, streamed."""

    def __init__(self, spec: str | RemoteSpec, api_key: str = "", timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.spec = spec if isinstance(spec, RemoteSpec) else RemoteSpec.parse(spec)
        self.api_key = api_key
        self.timeout = timeout
        self.name = f"{self.spec.model} at {self.spec.base_url}"
        parts = urlsplit(self.spec.base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port
        self._path = parts.path.rstrip("/")

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // CHARS_PER_TOKEN)

    # -- HTTP --------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return kind(self._host, self._port, timeout=self.timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        connection = self._connection()
        try:
            connection.request(method, self._path + path, body=json.dumps(body) if body is not None else None,
                               headers=self._headers())
            return connection, connection.getresponse()
        except (ConnectionRefusedError, socket.gaierror) as error:
            connection.close()
            raise ReaderError(f"the reader server at {self.spec.base_url} is not reachable ({error.strerror or error}); "
                              "is it running?") from error
        except (TimeoutError, socket.timeout) as error:
            connection.close()
            raise ReaderError(f"the reader server at {self.spec.base_url} did not answer within {self.timeout:g} s") from error
        except OSError as error:
            connection.close()
            raise ReaderError(f"the reader server at {self.spec.base_url} failed: {error}") from error

    def chat_batch(self, conversations, params, *, cancel=None, stats=None) -> list[str]:  # noqa: ANN001
        """The replies one request after another (a server batches its own requests)."""
        stats = stats if stats is not None else [GenerationStats() for _ in conversations]
        return ["".join(t.text for t in self.chat(m, params, cancel=cancel, stats=s)) for m, s in zip(conversations, stats)]

    def _failure(self, response: http.client.HTTPResponse) -> ReaderError:
        body = response.read(65536).decode("utf-8", errors="replace")
        try:
            detail = json.loads(body).get("error", {})
            message = detail.get("message", "") if isinstance(detail, dict) else str(detail)
        except (ValueError, AttributeError):
            message = " ".join(body.split())[:200]
        if response.status == 401:
            return ReaderError(f"the reader server at {self.spec.base_url} refused the API key ({message or 'unauthorised'})")
        if response.status == 404 and "model" in message.lower():
            return ReaderError(self._unknown_model(message))
        return ReaderError(f"the reader server at {self.spec.base_url} answered {response.status}: {message or response.reason}")

    def models(self) -> list[str]:
        connection, response = self._request("GET", "/models")
        try:
            if response.status != 200:
                raise self._failure(response)
            return [entry.get("id", "") for entry in json.loads(response.read()).get("data", [])]
        finally:
            connection.close()

    def _unknown_model(self, message: str) -> str:
        try:
            known = ", ".join(self.models()[:8]) or "none"
        except ReaderError:
            known = "unknown"
        return f"the reader server at {self.spec.base_url} has no model '{self.spec.model}' (it has: {known})"

    def check(self) -> None:
        """Raise ReaderError unless the server answers and has the model."""
        names = self.models()
        if names and self.spec.model not in names:
            raise ReaderError(self._unknown_model(""))

    # -- chat --------------------------------------------------------------------

    def chat(self, messages, params, *, cancel=None, stats=None) -> Iterator[Token]:  # noqa: ANN001
        stats = stats if stats is not None else GenerationStats()
        body = {
            "model": self.spec.model,
            "messages": messages,
            "stream": True,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "stream_options": {"include_usage": True},
        }
        started = time.perf_counter()
        connection, response = self._request("POST", "/chat/completions", body)
        try:
            if response.status != 200:
                raise self._failure(response)
            stats.finish_reason = "stop"
            # The server decodes with its own settings, but its text ends where it would
            # say a run a third time as a local reader's does (closing the connection
            # stops the server).
            loop_stop = LoopStop(params.loop_words)
            for event in _events(response, self.spec.base_url, self.timeout):
                if cancel is not None and cancel():
                    stats.finish_reason = "cancelled"
                    return
                if event.get("usage"):
                    stats.prompt_tokens = event["usage"].get("prompt_tokens", stats.prompt_tokens) or 0
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        if not stats.generated_tokens:
                            stats.time_to_first_token = time.perf_counter() - started
                            stats.prefill_seconds = stats.time_to_first_token
                        stats.generated_tokens += 1
                        text = loop_stop.push(text)
                        if text:
                            yield Token(-1, text)
                        if loop_stop.stopped:
                            stats.finish_reason = "repeat"
                            stats.decode_seconds = time.perf_counter() - started - stats.prefill_seconds
                            return
                    if choice.get("finish_reason"):
                        stats.finish_reason = choice["finish_reason"]
            held = loop_stop.flush()
            if held:
                yield Token(-1, held)
            stats.decode_seconds = time.perf_counter() - started - stats.prefill_seconds
        finally:
            connection.close()


def _events(response: http.client.HTTPResponse, where: str, timeout: float) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream, until `data: [DONE]`. A server
    that answers without streaming (one JSON body) is read as one event."""
    kind = response.getheader("Content-Type", "")
    try:
        if "text/event-stream" not in kind:
            whole = json.loads(response.read())
            for choice in whole.get("choices") or []:
                choice["delta"] = choice.get("message") or {}
            yield whole
            return
        for raw in response:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            try:
                yield json.loads(data)
            except ValueError:
                continue
    except (TimeoutError, socket.timeout) as error:
        raise ReaderError(f"the reader server at {where} stopped answering for {timeout:g} s") from error
    except (ConnectionError, http.client.IncompleteRead) as error:
        raise ReaderError(f"the reader server at {where} closed the connection mid-answer ({error})") from error
