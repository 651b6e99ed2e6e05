"""`quire bench qa` and `quire bench tasks` (bench/cli.py): the wiring of bench/qa.py
and bench/tasks.py — read the benchmark's documents (fetched by
tools/fetch_qa_documents.py) with the library's readers, cache them, and answer every
question by every method over every scope."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from engine.corpus.build import CorpusDocument
from ingest.document import PAGE_SEPARATOR
from ingest.readers import read_document

RESOURCES = Path(__file__).resolve().parent.parent / "resources" / "bench" / "qa"


ROOT_TASKS = RESOURCES.parent / "tasks"


def qa_documents(folder: Path, manifest: dict) -> dict[str, CorpusDocument]:
    """The benchmark's documents, read as the library reads them (same text, so the
    same cache), keyed as questions.jsonl names them."""
    documents = {}
    for entry in manifest["documents"]:
        path = folder / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run tools/fetch_qa_documents.py --out {folder}")
        document = read_document(path)
        text = PAGE_SEPARATOR.join(page.text for page in document.pages)
        pages = [(page.start, page.label or str(page.index + 1)) for page in document.pages]
        documents[entry["key"]] = CorpusDocument(entry["key"], text, pages, entry["title"])
    return documents


def _reader(args: argparse.Namespace):  # noqa: ANN202 - engine.reader.Reader | None
    """--reader: who writes the answers (all methods alike); None for the model itself."""
    from engine.reader import make_reader

    return make_reader(getattr(args, "reader", None) or "", api_key=getattr(args, "reader_key", None) or "")


def run(args: argparse.Namespace) -> dict | None:
    """`quire bench qa`: bench/qa.py over the qa documents."""
    from bench.qa import METHODS, QARunner, report, run_qa
    from bench.qa_data import load_questions
    from engine.corpus.answerer import Answerer
    from engine.paths import data_dir
    from engine.runtime import DEFAULT_MODEL, load_model

    firsts = {q.id: q for q in load_questions(RESOURCES / "questions.jsonl")}
    questions = load_questions(args.questions or RESOURCES / "questions.jsonl")
    if getattr(args, "rescore", None):
        return rescore(json.loads(Path(args.rescore).read_text()), questions, args.markdown)
    if args.ids:
        questions = [q for q in questions if q.id in set(args.ids) or any(q.id.startswith(i) for i in args.ids)]
    if args.qa_kinds:
        questions = [q for q in questions if q.kind in args.qa_kinds]
    if args.limit:
        questions = questions[: args.limit]
    manifest = json.loads((RESOURCES / "documents.json").read_text())
    print(f"reading {len(manifest['documents'])} documents", file=sys.stderr, flush=True)
    documents = qa_documents(Path(args.qa_documents), manifest)
    model = load_model((args.model or [DEFAULT_MODEL])[0])
    answerer = Answerer(model, reader=_reader(args))
    wanted = sorted({k for q in questions for k in q.docs} if args.scopes == ["own"] else set(documents))

    def progress(p) -> None:
        print(f"\r  caching: {p.tokens_done:,}/{p.tokens_total:,} tokens", end="", file=sys.stderr, flush=True)

    if "quire-cache" in args.methods and not args.retrieval:  # only cached reading reads the cache
        started = time.perf_counter()
        answerer.cache.build([documents[k] for k in wanted], on_progress=progress)
        print(f"\ncache ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    embedder = None
    if "embed" in args.methods:
        from engine.backends.torch.embed import MiniLMEmbedder, model_folder

        embedder = MiniLMEmbedder(model_folder(data_dir() / "models"))
    runner = QARunner(answerer, documents, max_tokens=args.qa_tokens, embedder=embedder, dense_limit=args.dense_limit)

    def show(record: dict) -> None:
        hit = record["evidence_hit"]
        print(f"{record['id']:<16} {record['scope']:<7} {record['method']:<5} score={record['score']:.2f} "
              f"hit={'-' if hit is None else f'{hit:.2f}'} ttft={record['ttft']:.1f}s | {record['answer'][:90]!r}",
              file=sys.stderr, flush=True)

    if args.retrieval:
        from bench.qa import retrieval_study

        studies = [retrieval_study(runner, questions, scope, on_row=lambda row: print(row, file=sys.stderr, flush=True))
                   for scope in args.scopes]
        for study in studies:
            print(f"{study['scope']}: evidence hit % over {study['n']} questions: {study['evidence_hit']}", file=sys.stderr)
        return {"retrieval": studies, "model": model.folder.name}
    methods = [m for m in METHODS if m in args.methods]
    result = run_qa(runner, questions, methods, args.scopes, on_answer=show, firsts=firsts)
    result["model"] = model.folder.name
    result["reader"] = answerer.reader.name
    result["documents"] = {k: runner.token_count(k) for k in documents}
    table = report(result["summary"])
    print(table, file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return result


def rescore(run: dict, questions, markdown: str | None = None) -> dict:  # noqa: ANN001 - QAQuestion list
    """A stored run's answers scored again by today's scorer (bench/qa_data.py), its
    summary recomputed; nothing is asked again. What changed is said on stderr."""
    from bench.qa import report, summarise
    from bench.qa_data import score_answer

    by_id = {q.id: q for q in questions}
    records, moved = [], 0
    for record in run["records"]:
        question = by_id.get(record["id"])
        if question is None:
            raise ValueError(f"{record['id']} is not in the question file: give the run's --questions")
        score = round(score_answer(question, record["answer"]), 3)  # as a run stores it
        if score != record["score"]:
            moved += 1
            print(f"{record['id']:<16} {record['scope']:<7} {record['method']:<5} {record['score']:.2f} -> {score:.2f}",
                  file=sys.stderr)
        records.append({**record, "score": score})
    print(f"{moved} of {len(records)} scores moved", file=sys.stderr)
    summary = summarise(records)
    table = report(summary)
    print(table, file=sys.stderr)
    if markdown:
        Path(markdown).write_text(table)
    return {**run, "records": records, "summary": summary, "rescored": True}


def run_tasks(args: argparse.Namespace) -> dict | None:
    """`quire bench tasks`: bench/tasks.py over the qa documents."""
    from bench.tasks import METHODS, TaskRunner, load_items, run_tasks as run
    from engine.corpus.answerer import Answerer
    from engine.runtime import DEFAULT_MODEL, load_model

    items = load_items(args.questions or ROOT_TASKS / "tasks.jsonl")
    if args.ids:
        items = [i for i in items if any(i["id"].startswith(x) for x in args.ids)]
    manifest = json.loads((RESOURCES / "documents.json").read_text())
    documents = qa_documents(Path(args.qa_documents), manifest)
    model = load_model((args.model or [DEFAULT_MODEL])[0])
    runner = TaskRunner(Answerer(model, reader=_reader(args)), documents, dense_limit=args.dense_limit)
    methods = [m for m in METHODS if m in (args.methods or METHODS)]

    def show(row: dict) -> None:
        score = row.get("recall", row.get("coverage"))
        print(f"{row['id']:<30} {row['method']:<6} {'-' if score is None else f'{score:.2f}'} {row['seconds']:.0f}s"
              f" | {row.get('answer', '')[:100]!r}", file=sys.stderr, flush=True)

    result = run(runner, items, methods, on_row=show)
    result["model"] = model.folder.name
    print(json.dumps(result["summary"], indent=1), file=sys.stderr)
    return result
