"""Diagnostic: where the needle's block ranks, per memory layer and KV head, under
several first-pass scores, while `Engine.ask` answers NIAH cases.

    python tools/needle_ranks.py HAYSTACK_DIR LENGTH CASES exact|bounds

Scores: "quest" (per-channel min/max upper bound, the bound pass), "mid" (the box
centre), "a0.1/a0.25/a0.5" (centre plus that share of the bound's spread), and with
`exact`: "exact" (best q·k over the block's tokens, every block gathered), "mean"
(q·mean key) and "lse". "selected" says whether the block was attended. Writes
/tmp/needle-ranks-LENGTH.json. Not part of the app; docs/BENCHMARKS.md quotes it.
"""
import sys, json, random, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from pathlib import Path
import numpy as np, torch
from engine.bench import niah
from engine.bench.niah_data import make_case
from engine.corpus.engine import Engine
from engine.runtime import load_model, DEFAULT_MODEL
from engine.backends.torch import memory as tm
from engine.generate import SamplingParams

hay, length, cases, exact = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "exact"
model = load_model(DEFAULT_MODEL)
engine = Engine(model)
count = lambda t: len(model.tokenizer.encode(t))
docs = niah.haystack_documents(niah.essay_documents(hay), length, count)
sizes = [count(d.text) for d in docs]
engine.build(docs)
rng = random.Random(1)
rows = []
state = {}
orig = tm.MemoryAttentionCache._select
def select(self, layer, q, positions, rotary, scale):
    scope = self.scope
    needle = state["blocks"]
    queries = self._selection_queries(q, positions, rotary, scale)
    low, high = (torch.from_numpy(np.asarray(a)).float() for a in scope.bounds(layer))
    upper = torch.einsum("bhd,hjd->hbj", high, queries.clamp(min=0)) + torch.einsum("bhd,hjd->hbj", low, queries.clamp(max=0))
    quest = upper.amax(dim=2)
    mid = (low + high) / 2
    radius = (high - low) / 2
    centre = torch.einsum("bhd,hjd->hbj", mid, queries)
    spread = torch.einsum("bhd,hjd->hbj", radius, queries.abs())
    midscore = centre.amax(dim=2)
    alphas = {a: (centre + a * spread).amax(dim=2) for a in (0.1, 0.25, 0.5)}
    out = {"layer": layer}
    for head in range(self.kv_heads):
        r = {}
        def rank(score):
            order = torch.argsort(score, descending=True)
            pos = torch.empty_like(order); pos[order] = torch.arange(len(order))
            return int(pos[needle].min())
        r["quest"] = rank(quest[head]); r["mid"] = rank(midscore[head])
        for a, sc in alphas.items(): r[f"a{a}"] = rank(sc[head])
        if exact:
            allb = np.arange(scope.n_blocks)
            keys, _, owner = scope.gather(layer, head, allb)
            s = queries[head] @ torch.from_numpy(keys).T
            best = torch.full((scope.n_blocks,), -1e9).scatter_reduce_(0, torch.from_numpy(owner), s.amax(0), "amax")
            r["exact"] = rank(best)
            mean = torch.zeros(scope.n_blocks, keys.shape[1]).index_add_(0, torch.from_numpy(owner), torch.from_numpy(keys)) / scope.block_size
            r["mean"] = rank((queries[head] @ mean.T).amax(0))
            # softmax-mass style: logsumexp over queries of max token
            r["lse"] = rank(torch.full((scope.n_blocks,), -1e9).scatter_reduce_(0, torch.from_numpy(owner), torch.logsumexp(s, 0), "amax"))
        out[head] = r
    orig(self, layer, q, positions, rotary, scale)
    for head in range(self.kv_heads):
        out[head]["selected"] = bool(np.isin(needle, self.stats.selected[layer][head]).any())
    state["rows"].append(out)
tm.MemoryAttentionCache._select = select
for c in range(cases):
    depth = [0.0, 0.25, 0.5, 0.75, 1.0][c % 5]
    case = make_case("single", length, depth, rng)
    with_needles, spans = niah.place_needles(docs, case, sizes)
    engine.build(with_needles)
    scope = engine.open_scope(with_needles)
    d, cs, ce = spans[0]
    blocks = []
    for b in np.flatnonzero(scope.doc_of_block == d):
        e, f, t = scope.block_passage(int(b))
        a, z = scope.entries[e].manifest.char_span(f, t)
        if a < ce and z > cs:
            blocks.append(b)
    state["blocks"] = torch.tensor(blocks); state["rows"] = []
    t0 = time.time()
    answer, ev, st = niah.collect_answer(engine.ask(case.question, with_needles, SamplingParams(max_new_tokens=40)))
    ok = all(v in answer for v in case.expected)
    rows.append({"depth": depth, "ok": ok, "answer": answer, "n_blocks": scope.n_blocks, "needle_blocks": blocks and [int(x) for x in blocks], "layers": state["rows"]})
    print(f"case {c} depth {depth} ok={ok} blocks={scope.n_blocks} {time.time()-t0:.1f}s", flush=True)
    for row in state["rows"]:
        print("  L%02d " % row["layer"] + " | ".join(" ".join(f"{k}={v}" for k, v in row[h].items()) for h in range(2)), flush=True)
json.dump(rows, open(f"/tmp/needle-ranks-{length}.json", "w"))
