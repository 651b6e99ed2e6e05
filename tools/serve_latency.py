"""How `quire serve` answers: time to the first token against `quire ask`, and many
clients at once. Prints JSON.

    .venv/bin/python tools/serve_latency.py concurrency [--clients 20]
        a scripted service (tests/gui/fakes.py) behind the real server; every client
        asks at once: all answered? each its own answer? served in order of arrival?
    QUIRE_HOME=... .venv/bin/python tools/serve_latency.py first-token "question" [--runs 5] [--max-tokens 32]
        the real default model over the library under QUIRE_HOME: `quire serve` in a
        process of its own (streamed requests) against `quire ask` (one process per
        question, as a person runs it), the two taking turns.

Time to first token through the server is measured at the client, from sending the
request to the first streamed piece of text; the engine's own figure (from the
moment it starts the answer) comes back in `quire_stats`. For `quire ask` the
client figure is from starting the process to its first byte on stdout (loading the
model included: that is what a person waits for), the engine's from its --json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUIRE = [sys.executable, "-m", "app.cli"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stream(port: int, question: str, max_tokens: int, model: str = "quire") -> dict:
    """One streamed answer: seconds to the first text, in all, the text and quire_stats."""
    body = json.dumps({"model": model, "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": question}]})
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first = None
    text = ""
    stats = None
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[len(b"data: "):])
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = first if first is not None else time.perf_counter() - started
            text += chunk["choices"][0]["delta"]["content"]
        stats = chunk.get("quire_stats", stats)
    connection.close()
    return {"first_token_s": first, "total_s": time.perf_counter() - started, "text": text, "stats": stats}


def _ask(env: dict, question: str, max_tokens: int) -> dict:
    """One `quire ask` process: seconds to its first byte of answer, in all, and its stats."""
    began = time.perf_counter()
    process = subprocess.Popen([*QUIRE, "ask", question, "--json", "--max-tokens", str(max_tokens)], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first_byte = process.stdout.read(1)
    first = time.perf_counter() - began
    output = (first_byte + process.stdout.read()).decode()
    process.wait()
    stats = json.loads(output[output.index("\n{") + 1:])["stats"]
    return {"first_token_s": first, "total_s": time.perf_counter() - began, "stats": stats}


def first_token(question: str, runs: int, max_tokens: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    port = _free_port()
    started = time.perf_counter()
    server = subprocess.Popen([*QUIRE, "serve", "--port", str(port)], cwd=ROOT, env=env,
                              stderr=subprocess.PIPE, text=True)
    serve_runs, ask_runs = [], []
    try:
        server.stderr.readline()  # "quire serve: MODEL on DEVICE, …" once it listens
        ready = time.perf_counter() - started
        # Alternated, so that load from elsewhere on the machine falls on both alike;
        # the idle server between its answers costs nothing but memory.
        for _ in range(runs):
            serve_runs.append(_stream(port, question, max_tokens))
            ask_runs.append(_ask(env, question, max_tokens))
    finally:
        server.terminate()
        server.wait(30)

    def summary(rows: list[dict]) -> dict:
        clients = [r["first_token_s"] for r in rows]
        engine = [r["stats"]["time_to_first_token"] for r in rows]
        return {"first_token_s": [round(x, 3) for x in clients], "first_token_median_s": round(statistics.median(clients), 3),
                "engine_first_token_s": [round(x, 3) for x in engine],
                "engine_first_token_median_s": round(statistics.median(engine), 3),
                "total_s": [round(r["total_s"], 3) for r in rows]}

    return {"question": question, "runs": runs, "max_tokens": max_tokens, "server_ready_s": round(ready, 3),
            "serve": summary(serve_runs), "ask": summary(ask_runs), "serve_answer": serve_runs[-1]["text"]}


def concurrency(clients: int) -> dict:
    import tempfile

    os.environ["QUIRE_HOME"] = tempfile.mkdtemp(prefix="quire-serve-bench-")
    sys.path.insert(0, str(ROOT))
    from app.server import QuireServer
    from ingest.jobs import ingest_paths
    from ingest.library import Library
    from tests.gui.fakes import ScriptedService

    class EchoService(ScriptedService):
        def ask(self, question, documents, max_tokens, cancel, history=()):
            self.pieces = ["answer ", "to ", question]
            yield from super().ask(question, documents, max_tokens, cancel, history)

    book = Path(os.environ["QUIRE_HOME"]) / "book.txt"
    book.write_text("Ships leave the harbour at dawn and return with the evening tide.", encoding="utf-8")
    with Library() as library:
        ingest_paths(library, [book])
    service = EchoService(delay=0.01)
    arrived: list[str] = []
    answers: dict[int, str] = {}
    seconds: dict[int, float] = {}
    lock = threading.Lock()
    server = QuireServer(service, port=0).start()
    submit = server.answers.submit

    def recording_submit(job) -> None:
        with lock:
            arrived.append(job.question)
            submit(job)

    server.answers.submit = recording_submit
    port = server.httpd.server_address[1]

    def one(number: int) -> None:
        result = _stream(port, f"question {number}", 16)
        answers[number] = result["text"]
        seconds[number] = result["total_s"]

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    wall = time.perf_counter() - started
    server.close()
    served = [question for question, _ in service.asked]
    return {
        "clients": clients, "answered": len(answers),
        "own_answers": sum(text.split("\n\nSources:\n")[0] == f"answer to question {n}" for n, text in answers.items()),
        "served_in_arrival_order": served == arrived, "lost": clients - len(served),
        "wall_s": round(wall, 3), "slowest_client_s": round(max(seconds.values()), 3),
        "engine_seconds_per_answer": round(3 * service.delay, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    conc = sub.add_parser("concurrency")
    conc.add_argument("--clients", type=int, default=20)
    first = sub.add_parser("first-token")
    first.add_argument("question")
    first.add_argument("--runs", type=int, default=5)
    first.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    result = concurrency(args.clients) if args.what == "concurrency" else first_token(args.question, args.runs, args.max_tokens)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
