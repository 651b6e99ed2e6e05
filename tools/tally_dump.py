"""Record every block's final tally for each `quire bench niah` case, then judge
re-read rules against the records without running the model again.

`bench niah` keeps only the tally's 24 best blocks (AskStats.tally_top). A rule
for what to re-read (engine/corpus/reread.py) has to be judged on the whole
tally: a needle's second half, the haystack blocks beside a high one. So:

    # run the benchmark as usual, with the tally of each case recorded
    .venv/bin/python tools/tally_dump.py record bench-out/tallies-128k.pkl -- \\
        bench niah --haystack $H --lengths 131072 --kinds multivalue --depths 0 0.5 1.0 --needles 5 --baselines

    # re-plan each recorded case with the current code (and --sparse settings):
    # would it re-read, and would the re-read cover every needle's blocks?
    .venv/bin/python tools/tally_dump.py plan bench-out/tallies-128k.pkl --sparse '{"reread_pairs": false}'

A case's record: kind, length, depth, score, the re-read runs it made, the tally
(one value per block of the scope), seg_of_block, doc_of_block, and for each
needle the global blocks its sentence overlaps (needle 0 is the one asked for in
a multi-key case). The records are local measurement files; none is committed.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def record(out: Path, quire_args: list[str]) -> None:
    import engine.corpus.engine as corpus_engine
    from engine.bench import niah

    seen: dict = {}
    tally_top = corpus_engine._tally_top

    def keep_tally(scope, tally, count):
        seen["scope"], seen["tally"] = scope, np.array(tally, dtype=np.float64)
        return tally_top(scope, tally, count)

    run_case = niah._run_case
    rows: list[dict] = []

    def recorded_case(engine, documents, sizes, case, *rest):
        result = run_case(engine, documents, sizes, case, *rest)
        with_needles, spans = niah.place_needles(documents, case, sizes)
        scope = seen["scope"]
        doc_ids = [entry.document.doc_id for entry in scope.entries]
        spans_of: dict[int, list] = {}
        for block in range(scope.n_blocks):
            entry, first, end = scope.block_passage(block)
            start, stop = scope.entries[entry].manifest.char_span(first, end)
            spans_of.setdefault(entry, []).append((block, start, stop))
        needles = []
        for index, start, end in spans:
            entry = doc_ids.index(with_needles[index].doc_id)
            needles.append([b for b, s, e in spans_of[entry] if s < end and e > start])
        rows.append({
            "kind": case.kind, "length": case.length, "depth": case.depth, "score": result["sparse"]["score"],
            "reread_runs": result["sparse"]["reread_runs"], "tally": seen["tally"], "needles": needles,
            "seg_of_block": np.array(scope.seg_of_block), "doc_of_block": np.array(scope.doc_of_block),
        })
        with open(out, "wb") as f:
            pickle.dump(rows, f)
        return result

    corpus_engine._tally_top = keep_tally
    niah._run_case = recorded_case
    from app.cli import main

    sys.argv = ["quire", *quire_args]
    main()


def plan(paths: list[Path], sparse: dict) -> None:
    from engine.corpus.reread import plan_reread
    from engine.corpus.settings import SparseSettings

    settings = SparseSettings.from_dict(sparse)
    covered = total = 0
    for path in paths:
        with open(path, "rb") as f:
            rows = pickle.load(f)
        for row in rows:
            runs = plan_reread(row["tally"], settings, row["seg_of_block"], row["doc_of_block"])
            read = set(np.concatenate(runs).tolist()) if runs else set()
            wanted = row["needles"] if row["kind"] == "multivalue" else row["needles"][:1]
            whole = sum(all(b in read for b in blocks) for blocks in wanted)
            covered, total = covered + (whole if runs else 0), total + (len(wanted) if runs else 0)
            print(
                f"{row['kind']:<10} {row['length']:>8} depth {row['depth']:.2f} score {row['score']:.2f} "
                f"re-read then {row['reread_runs']} runs, now {len(runs)}"
                + (f", needles whole in it {whole}/{len(wanted)}" if runs else "")
            )
    print(f"re-reads planned now hold {covered} of {total} wanted needles whole")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run quire with each case's tally recorded")
    rec.add_argument("out", type=Path)
    rec.add_argument("quire_args", nargs=argparse.REMAINDER, help="after --: the quire command line")
    pl = sub.add_parser("plan", help="re-plan recorded cases with the current re-read rule")
    pl.add_argument("records", type=Path, nargs="+")
    pl.add_argument("--sparse", default="{}", help="SparseSettings overrides as JSON")
    args = parser.parse_args()
    if args.command == "record":
        quire_args = args.quire_args[1:] if args.quire_args[:1] == ["--"] else args.quire_args
        record(args.out, quire_args)
    else:
        plan(args.records, json.loads(args.sparse))


if __name__ == "__main__":
    main()
