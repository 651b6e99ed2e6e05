"""A scripted service for GUI tests where the model is not the point: it streams a
fixed answer (optionally slowly, or failing part-way), cites the first passage of
each document in scope, and "caches" documents (instantly, or `build_delay`
seconds each, checking cancel between them), with real progress events. Same methods as app.service.Service."""

from __future__ import annotations

import threading
import time

from engine.corpus.build import BuildProgress, BuildSummary
from engine.corpus.answerer import AskStats, Evidence
from engine.errors import Cancelled
from engine.generate import Token


class ScriptedService:
    device = "cpu"

    def __init__(self, settings=None, *, pieces=("The ", "answer ", "is ", "**42**."), delay: float = 0.0,
                 fail_after: int | None = None, error: BaseException | None = None) -> None:
        self.model_name = "scripted-model"
        self.pieces = list(pieces)
        self.delay = delay
        self.fail_after = fail_after
        self.error = error or RuntimeError("the scripted service broke")
        self.cached: set[str] = set()
        self.bytes_per_document = 1024
        self.build_delay = 0.0
        self.builds: list[list[int]] = []  # the documents each build was asked to cache
        self.asked: list[tuple[str, list]] = []
        self.histories: list[list[tuple[str, str]]] = []  # the earlier turns each question came with
        self.tasks: list[tuple[str, dict, list]] = []
        self.chats: list[list[dict]] = []  # the messages of each chat() (the model alone)
        self.started = threading.Event()

    def is_cached(self, document) -> bool:
        return document.content_key in self.cached

    def build(self, documents, on_progress, cancel) -> BuildSummary:
        total = sum(len(d.text) for d in documents)
        done = 0
        self.builds.append([d.doc_id for d in documents])
        for index, document in enumerate(documents):
            if cancel and cancel():
                raise Cancelled("cache build cancelled")
            time.sleep(self.build_delay)
            if on_progress:
                on_progress(BuildProgress(index, len(documents), done, total, index, 0, 0.0, document.doc_id, 0.5))
            done += len(document.text)
            self.cached.add(document.content_key)
        return BuildSummary(documents=len(documents), tokens=done)

    def chat(self, messages, max_tokens, cancel):
        """The model alone: echoes the last user message's first words after the pieces."""
        self.chats.append(messages)
        for number, piece in enumerate(self.pieces):
            if cancel and cancel():
                yield AskStats(generated_tokens=number, finish_reason="cancelled")
                return
            yield Token(number, piece)
        yield AskStats(prompt_tokens=sum(len(m["content"].split()) for m in messages), generated_tokens=len(self.pieces),
                       finish_reason="stop")

    def ask(self, question, documents, max_tokens, cancel, history=()):
        self.asked.append((question, [d.doc_id for d in documents]))
        self.histories.append([(turn.question, turn.answer) for turn in history])
        self.started.set()
        for number, piece in enumerate(self.pieces):
            if self.fail_after is not None and number == self.fail_after:
                raise self.error
            if cancel and cancel():
                yield AskStats(generated_tokens=number, finish_reason="cancelled")
                return
            if self.delay:
                time.sleep(self.delay)
            yield Token(number, piece)
        for document in documents:
            end = min(len(document.text), 60)
            page_label = document.pages[0][1] if document.pages else None
            yield Evidence(document.doc_id, document.title, page_label, 0, 0, end, document.text[:end], 1.0 / len(documents))
        yield AskStats(prompt_tokens=12, memory_tokens=sum(len(d.text) for d in documents), generated_tokens=len(self.pieces),
                       time_to_first_token=0.25, decode_tokens_per_second=20.0, finish_reason="stop")

    def run_task(self, task, documents, options, max_tokens, cancel):
        """Whole-document tasks: the real find-all (it needs no model); summarise and
        compare stream the scripted pieces with progress, like ask."""
        from engine.corpus.tasks import TaskProgress, TaskStats, find_all

        self.tasks.append((task, dict(options), [d.doc_id for d in documents]))
        if task == "find-all":
            yield from find_all(options["term"], documents, cancel)
            return
        yield TaskProgress("reading", 0, 2)
        yield TaskProgress("reading", 1, 2, 1.0)
        for number, piece in enumerate(self.pieces):
            yield Token(number, piece)
        yield TaskStats(task, documents=len(documents), parts=2)

    def cache_bytes(self) -> int:
        return self.bytes_per_document * len(self.cached)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def settings_summary(self) -> dict:
        return {"model": self.model_name, "device": self.device, "backend": "scripted"}
