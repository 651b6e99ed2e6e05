"""`quire bench qa`'s data and scoring: the committed question set loads and is
well formed, answers score by kind, loops and evidence are recognised, and the
fetch script reads a .deb without dpkg."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from bench.qa import report, summarise
from bench.qa_data import KINDS, QAQuestion, evidence_found, has_loop, load_questions, score_answer
from tools.fetch_qa_documents import ar_members, extract

ROOT = Path(__file__).resolve().parent.parent
QA = ROOT / "resources" / "bench" / "qa"


def test_the_question_set_covers_every_kind_and_document():
    questions = load_questions(QA / "questions.jsonl")
    manifest = json.loads((QA / "documents.json").read_text())
    keys = {d["key"] for d in manifest["documents"]}
    assert len(questions) >= 120 and len(keys) >= 8
    assert {q.kind for q in questions} == set(KINDS)
    for q in questions:
        assert set(q.docs) <= keys, q.id
        assert {e.doc for e in q.evidence} <= set(q.docs), q.id
        if q.kind == "cross":
            assert len({e.doc for e in q.evidence}) == 2, q.id
        if q.kind == "unanswerable":
            assert not (q.answers or q.facts or q.evidence), q.id
        else:
            assert q.evidence, q.id
    assert len({q.id for q in questions}) == len(questions)


def test_each_follow_up_names_a_question_of_the_set_on_its_documents():
    firsts = {q.id: q for q in load_questions(QA / "questions.jsonl")}
    follow_ups = load_questions(QA / "followups.jsonl")
    assert len(follow_ups) >= 20
    for q in follow_ups:
        assert q.after in firsts and q.docs == firsts[q.after].docs, q.id
        assert q.evidence and {e.doc for e in q.evidence} <= set(q.docs), q.id
        # The follow-up is not answered by its first question's accepted answers.
        assert not any(a.lower() in " ".join(firsts[q.after].answers).lower() for a in q.answers), q.id


def test_a_follow_up_is_asked_after_its_first_question_with_that_turn(tmp_path):
    from bench.qa import MethodResult, QARunner, run_qa

    class Runner(QARunner):
        def __init__(self) -> None:
            self.documents, self.calls = {}, []

        def _quire(self, text, keys, docs, history):
            self.calls.append((text, [(t.question, t.answer) for t in history]))
            return MethodResult("It is OCTAVE_HISTSIZE." if history else "1000 entries.", [], 0.1, 0.2, 10)

    first = QAQuestion.from_dict({"id": "o1", "kind": "lookup", "question": "How many entries?", "docs": [],
                                  "answers": ["1000"]})
    follow = QAQuestion.from_dict({"id": "f1", "kind": "lookup", "question": "Which variable overrides it?",
                                   "docs": [], "answers": ["OCTAVE_HISTSIZE"], "after": "o1"})
    runner = Runner()
    result = run_qa(runner, [follow], ["quire", "quire-alone"], ["own"], firsts={"o1": first})
    assert runner.calls == [("How many entries?", []), ("Which variable overrides it?", [("How many entries?", "1000 entries.")]),
                            ("Which variable overrides it?", [])]
    with_turn, alone = result["records"]
    assert (with_turn["score"], with_turn["first_score"], alone["score"]) == (1.0, 1.0, 0.0)
    assert "first_score" not in alone
    assert result["summary"]["own"]["quire"]["all"]["first_accuracy"] == 100.0
    with pytest.raises(ValueError, match="first question"):
        run_qa(runner, [follow], ["quire"], ["own"])


def question(kind: str, **fields) -> QAQuestion:
    return QAQuestion.from_dict({"id": "x", "kind": kind, "question": "?", "docs": ["a", "b"], **fields})


def test_scores_by_kind():
    lookup = question("lookup", answers=["--no-psqlrc", "-X"])
    assert score_answer(lookup, "Use  -X  to skip it.") == 1.0
    assert score_answer(lookup, "Use --psqlrc.") == 0.0
    table = question("table", answers=["m, n, k", "m, n and k"])
    assert score_answer(table, "They are `m`, `n` and `k`.") == 1.0  # code ticks are formatting
    assert score_answer(table, "They are `m`, `N`.") == 0.0
    assert score_answer(lookup, "Not found in these documents. Maybe -X?") == 0.0
    spread = question("spread", facts=[["Simpson"], ["Lobatto"], ["Gauss-Kronrod", "Gauss Kronrod"]])
    assert score_answer(spread, "quadv uses simpson's rule, quadgk gauss kronrod") == pytest.approx(2 / 3)
    unanswerable = question("unanswerable")
    assert score_answer(unanswerable, "The passages do not mention it.") == 1.0
    assert score_answer(unanswerable, "It is 42.") == 0.0
    with pytest.raises(ValueError):
        question("lookup")
    with pytest.raises(ValueError):
        question("riddle", answers=["x"])


def test_evidence_is_found_per_document_whitespace_and_case_aside():
    q = question("cross", facts=[["a"], ["b"]], evidence=[
        {"doc": "a", "page": 1, "sentence": "The default is 650 subintervals."},
        {"doc": "b", "page": 2, "sentence": "Set samples to 100."},
    ])
    passages = [("a", "Intro. the default  is\n650 subintervals. More."), ("a", "Set samples to 100.")]
    assert evidence_found(q, passages) == [True, False]  # the second sentence is in the wrong document
    assert evidence_found(q, [*passages, ("b", "x Set Samples to 100. y")]) == [True, True]


def test_loops_are_recognised():
    assert has_loop("She is married to Norton. " * 4)
    assert not has_loop("Irene Adler is an opera singer who outwits Holmes by disguising herself as a young man.")


def test_summary_and_table():
    records = [
        {"id": "1", "kind": "lookup", "scope": "own", "method": "quire", "score": 1.0, "evidence_hit": 1.0,
         "evidence_all": True, "loop": False, "ttft": 2.0, "total": 5.0, "prompt_tokens": 1000},
        {"id": "2", "kind": "cross", "scope": "own", "method": "quire", "score": 0.5, "evidence_hit": 0.5,
         "evidence_all": False, "loop": True, "ttft": 4.0, "total": 7.0, "prompt_tokens": 1200},
    ]
    summary = summarise(records)
    whole = summary["own"]["quire"]["all"]
    assert (whole["n"], whole["accuracy"], whole["evidence_hit"], whole["loops"]) == (2, 75.0, 75.0, 1)
    assert summary["own"]["quire"]["cross"]["both_passages"] == 0.0
    assert whole["ttft_median"] == 3.0
    table = report(summary)
    assert "| quire | 100.0 (1) | 50.0 (1) | 75.0 (2) | 75.0 | 1 | 3.0 | 6.0 | 1100 |" in table


def test_a_deb_is_read_without_dpkg():
    payload = b"Hello, policy.\n"
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as archive:
        info = tarfile.TarInfo("./usr/share/doc/x/policy.txt")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))

    def member(name: str, data: bytes) -> bytes:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        return header + data + (b"\n" if len(data) % 2 else b"")

    deb = b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("control.tar.xz", b"x") + member("data.tar.xz", tar_bytes.getvalue())
    assert set(ar_members(deb)) == {"debian-binary", "control.tar.xz", "data.tar.xz"}
    assert extract(deb, "usr/share/doc/x/policy.txt") == payload
    with pytest.raises(KeyError):
        extract(deb, "usr/share/doc/x/other.txt")


def test_a_stored_run_is_scored_again_without_asking(tmp_path, capsys):
    from bench.cli import main

    lookup = load_questions(QA / "questions.jsonl")[0]
    accepted = lookup.answers[0]
    base = {"kind": lookup.kind, "scope": "own", "question": lookup.question, "evidence_hit": 1.0,
            "evidence_all": True, "loop": False, "ttft": 1.0, "total": 2.0, "prompt_tokens": 900}
    stored = {"records": [
        {**base, "id": lookup.id, "method": "quire", "answer": f"It is `{accepted}`.", "score": 0.0},  # old scorer
        {**base, "id": lookup.id, "method": "bm25", "answer": "I do not know.", "score": 0.0},
    ], "model": "m", "reader": "r"}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(stored))
    out = tmp_path / "again.json"
    assert main(["bench", "qa", "--rescore", str(path), "--out", str(out)]) in (0, None)
    again = json.loads(out.read_text())
    assert [r["score"] for r in again["records"]] == [1.0, 0.0]
    assert again["summary"]["own"]["quire"]["all"]["accuracy"] == 100.0
    assert again["summary"]["own"]["bm25"]["all"]["accuracy"] == 0.0
    assert again["rescored"] is True and again["reader"] == "r"
    assert "1 of 2 scores moved" in capsys.readouterr().err


def test_the_retrieval_study_scores_the_passages_each_method_would_read():
    """`quire bench qa --retrieval`: the share of holding sentences in Quire's chosen
    passages and in BM25-RAG's chunks, without a reader."""
    from types import SimpleNamespace

    from bench.qa import QARunner, retrieval_study
    from engine.corpus.build import CorpusDocument
    from engine.corpus.retriever import Retriever

    filler = " ".join(f"Chapter {n} describes gardens, rivers and the weather of the valley." for n in range(120))
    held = "The lighthouse keeper trimmed the wick at midnight."
    docs = {"a": CorpusDocument("a", filler + " " + held + " " + filler, [(0, "1")], "A"),
            "b": CorpusDocument("b", filler, [(0, "1")], "B")}
    runner = QARunner.__new__(QARunner)
    runner.documents, runner._indexes = docs, {}
    runner.answerer = SimpleNamespace(retriever=Retriever())
    asked = QAQuestion.from_dict({"id": "q1", "kind": "lookup", "question": "When did the lighthouse keeper trim the wick?",
                                  "docs": ["a", "b"], "answers": ["midnight"],
                                  "evidence": [{"doc": "a", "page": 0, "sentence": held}]})
    missing = QAQuestion.from_dict({"id": "q2", "kind": "lookup", "question": "Who rang the bell?", "docs": ["b"],
                                    "answers": ["the sexton"], "evidence": [{"doc": "b", "page": 0, "sentence": held}]})
    unanswerable = QAQuestion.from_dict({"id": "q3", "kind": "unanswerable", "question": "Who?", "docs": ["a"]})
    study = retrieval_study(runner, [asked, missing, unanswerable], "own")
    assert [(r["id"], r["quire"], r["bm25_rag"]) for r in study["rows"]] == [("q1", 1.0, 1.0), ("q2", 0.0, 0.0)]
    assert study["evidence_hit"] == {"quire": 50.0, "bm25_rag": 50.0} and study["n"] == 2


def test_each_follow_up_has_its_standalone_form():
    """followups-standalone.jsonl: each follow-up with what it refers to written out
    (asked without the conversation, it measures what the reader can answer at all)."""
    follow_ups = {q.id: q for q in load_questions(QA / "followups.jsonl")}
    standalone = load_questions(QA / "followups-standalone.jsonl")
    assert sorted(q.id for q in standalone) == sorted(follow_ups)
    for q in standalone:
        f = follow_ups[q.id]
        assert q.after is None and q.question != f.question, q.id
        assert (q.kind, q.answers, q.docs, q.evidence) == (f.kind, f.answers, f.docs, f.evidence), q.id
