"""Quire's benchmarks, a package beside the product: `quire bench …` (bench/cli.py,
registered as a plugin through pyproject's entry point "quire.commands"). These
modules may import app, engine and ingest; none of those imports them
(tests/test_boundaries.py). Each benchmark writes JSON; current figures go into
docs/results.json, rendered as docs/BENCHMARKS.md by `quire bench report`.

    cli.py               the subcommands and their options (the plugin); niah/scale wired to a model
    cli_qa.py            qa and tasks wired to the fetched documents and a model
    runtime.py           `runtime`: speed, memory, quality (probes.py) against transformers and llama.cpp (llamacpp.py)
    qa.py, qa_data.py    `qa`: real questions on real documents against RAG (resources/bench/qa/)
    tasks.py             `tasks`: summaries, find-all, comparisons (resources/bench/tasks/)
    niah.py, niah_data.py  `niah`, `scale`: needle-in-a-haystack recall, speed against corpus size
    ingest.py            `ingest`, `search`: reading speed, full-text search latency
    ocr.py               `ocr`: OCR speed and word error rate on a scan made from a real PDF
    gui.py, latency_probe.py  `gui`: the window's event-loop delay while it works
    report.py            `report`: the registry or a runtime JSON as Markdown
"""
