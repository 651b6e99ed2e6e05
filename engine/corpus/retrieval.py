"""Retrieval heads: the few attention (query) heads of a model that pick a stated
fact out of everything in memory, found once per model by measurement.

Per-channel key bounds (the Quest pass) rank blocks loosely: over a 128K-token scope
the block holding a planted fact sits, per layer and head, at a median rank of ~700
of ~4,000 under the bound, while in a handful of heads the exact best match ranks it
first nearly every time (docs/BENCHMARKS.md). Those heads are a property of the
model's weights, as studies of "retrieval heads" in long-context models report, so
they are measured once: a small corpus of generated prose with one fact per
document is cached, each fact is asked for, and every query head of every memory
layer scores every block exactly (its own queries against its KV head's keys). A head's score is how far the fact's block stands above
the rest (standard deviations, mean over the facts). The best heads are stored beside
the model's cache (`retrieval_heads.json`) and, on a scope larger than the shortlist,
score all its blocks exactly (`MemoryAttentionCache._scan_rows`: each question
query's best match in each block, which a question sums over its queries, the
`cover` score of SparseSettings.scan_score); their winners carry into every later
layer through the cross-layer vote. Calibration ranks a head by its best single
match (`_scan`).

The calibration facts are of another form than the benchmark's needles on purpose
(an archive code of a person, not a magic number for a key): the heads are chosen
for finding facts, not for one test's wording.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine.corpus.build import CorpusDocument
from engine.corpus.scope import CorpusScope, ScopeEntry
from engine.corpus.selection import global_layers
from engine.corpus.settings import SparseSettings
from engine.generate import prefill
from engine.paths import write_atomic

log = logging.getLogger(__name__)

CALIBRATION_VERSION = 2
FILE_NAME = "retrieval_heads.json"

_PEOPLE = ["Maren Holt", "Tobias Quill", "Ines Carvalho", "Rafael Okoro", "Lena Fischer", "Arjun Mehta",
           "Sofia Lindqvist", "Kwame Mensah", "Noor Haddad", "Elias Brandt", "Yuki Tanaka", "Clara Duval"]
_CODES = ["amber", "cobalt", "falcon", "juniper", "lantern", "meridian", "orchid", "quartz", "saffron",
          "thistle", "umber", "willow"]
_SUBJECTS = ["The committee", "A visiting engineer", "The old ferry", "Most of the villagers", "The library",
             "A small bakery", "The northern road", "Every winter the council", "The river pilot",
             "A travelling musician", "The weather station", "The printing house", "Our neighbour",
             "The night train", "A local historian", "The harbour office"]
_VERBS = ["argued about", "repaired", "wrote a letter about", "walked past", "kept a record of",
          "slowly rebuilt", "painted", "forgot", "measured", "photographed", "sold", "described"]
_OBJECTS = ["the stone bridge", "a box of maps", "the market hall", "the lighthouse stairs",
            "an unfinished canal", "the orchard wall", "the tide tables", "a set of brass scales",
            "the school roof", "the copper kettle", "a bundle of old newspapers", "the signal lamp"]
_TAILS = ["before the spring fair.", "while the rain kept falling.", "for reasons nobody recalled.",
          "in the summer of that year.", "with more patience than skill.", "after the floods had passed.",
          "and then moved on to other things.", "as the evening grew colder.", "to everyone's surprise.",
          "without telling the mayor."]


def calibration_documents(count: int = 8, sentences: int = 70, seed: int = 7) -> list[tuple[CorpusDocument, str, str, str]]:
    """(document, fact sentence, question, answer) × count: generated prose with one
    fact per document at a random sentence."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        person, code = _PEOPLE[index % len(_PEOPLE)], _CODES[(index * 5) % len(_CODES)]
        number = rng.randrange(100, 1000)
        fact = f"The archive code of {person} is {code}-{number}."
        lines = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
                 for _ in range(sentences)]
        lines.insert(rng.randrange(1, sentences - 1), fact)
        paragraphs = [" ".join(lines[i : i + 6]) for i in range(0, len(lines), 6)]
        text = "\n\n".join(paragraphs)
        document = CorpusDocument(f"calibration-{CALIBRATION_VERSION}-{index}", text, [(0, "1")], "calibration")
        out.append((document, fact, f"What is the archive code of {person}?", f"{code}-{number}"))
    return out


def measure_heads(engine, count: int = 8, cancel: Callable[[], bool] | None = None) -> list[tuple[int, int, float]]:
    """Every (layer, query head) of the model's memory layers with its mean standing
    of the fact's block (standard deviations above the scope's mean block score),
    strongest first. `cancel()` is checked between segments and layers (Cancelled)."""
    cases = calibration_documents(count)
    documents = [d for d, _, _, _ in cases]
    engine.build(documents, cancel=cancel)
    entries = [ScopeEntry(d, engine.builder.manifest_for(d)) for d in documents]
    scope = CorpusScope(engine.store, entries, engine.cache_settings.block_size)
    model = engine.model.model
    heads = [(layer, head) for layer in global_layers(model) if scope.has_layer(layer)
             for head in range(model.config.num_attention_heads)]
    standing: dict[tuple[int, int], list[float]] = {h: [] for h in heads}
    try:
        for index, (document, fact, question, _) in enumerate(cases):
            start = document.text.index(fact)
            fact_blocks = []
            for block in np.flatnonzero(scope.doc_of_block == index):
                entry, first, end = scope.block_passage(int(block))
                a, b = entries[entry].manifest.char_span(first, end)
                if a < start + len(fact) and b > start:
                    fact_blocks.append(int(block))

            def probe(layer: int, head: int, best: np.ndarray, blocks=fact_blocks) -> None:
                spread = float(best.std()) or 1.0
                standing[(layer, head)].append((float(best[blocks].max()) - float(best.mean())) / spread)

            prompt = engine.prefix_ids + engine.question_ids(question)
            cache = engine.memory.MemoryAttentionCache(
                model, scope, SparseSettings(), prefix_len=len(engine.prefix_ids), capacity=len(prompt) + 1,
                scan_heads=heads, probe=probe,
            )
            prefill(model, prompt, cache, cancel=cancel)
    finally:
        scope.close()
    scored = [(layer, head, float(np.mean(standing[(layer, head)]))) for layer, head in heads if standing[(layer, head)]]
    return sorted(scored, key=lambda item: -item[2])


def _saved(engine) -> list[tuple[int, int]] | None:
    try:
        saved = json.loads((Path(engine.root) / FILE_NAME).read_text())
        if saved.get("version") == CALIBRATION_VERSION:
            return [(int(layer), int(head)) for layer, head, _ in saved["heads"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def retrieval_heads_known(engine) -> bool:
    """Whether this model's retrieval heads are already measured and kept."""
    return _saved(engine) is not None


def retrieval_heads(engine, cancel: Callable[[], bool] | None = None) -> list[tuple[int, int]]:
    """The model's (layer, query head) pairs, best retrieval head first: read from the
    cache folder, or measured now (once per model; a few seconds to a minute, and
    `cancel` stops it: nothing is kept then)."""
    path = Path(engine.root) / FILE_NAME
    saved = _saved(engine)
    if saved is not None:
        return saved
    log.info("measuring the model's retrieval heads (once per model)")
    heads = measure_heads(engine, cancel=cancel)
    payload = {"version": CALIBRATION_VERSION, "heads": [[l, h, round(z, 3)] for l, h, z in heads]}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
    return [(layer, head) for layer, head, _ in heads]
