"""Render benchmark JSON as Markdown, so the documents show what the JSON holds.

`record_markdown` renders docs/results.json, the registry of current figures (one row
per target of each issue), as docs/BENCHMARKS.md; `runtime_markdown` renders a
`quire bench runtime` JSON file as its tables (the studies in docs/lab/ quote them)."""

from __future__ import annotations

from bench import probes

RECORD_KEYS = ("area", "target", "figure", "met", "command", "machine", "date", "study")
MET_VALUES = ("met", "missed", "recorded", "not measured")

_RECORD_INTRO = """\
# Benchmarks

The current figure for each target, one row per target of each issue. Generated from
docs/results.json by `quire bench report docs/results.json > docs/BENCHMARKS.md`: edit
the JSON, not this file. Re-run a row's command on its machine to check a figure; how
each figure was reached, and every earlier one, is in the study linked under its area
(docs/lab/)."""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def record_markdown(rows: list[dict[str, str]]) -> str:
    """docs/BENCHMARKS.md from the rows of docs/results.json, areas in their first order."""
    for row in rows:
        missing = [key for key in RECORD_KEYS if key not in row]
        if missing:
            raise ValueError(f"a results row lacks {', '.join(missing)}: {row.get('target', row)}")
        if row["met"] not in MET_VALUES:
            raise ValueError(f"met must be one of {', '.join(MET_VALUES)}, not {row['met']!r}: {row['target']}")
    areas: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        areas.setdefault(row["area"], []).append(row)
    lines = [_RECORD_INTRO]
    for area, area_rows in areas.items():
        studies = list(dict.fromkeys(row["study"] for row in area_rows))
        links = ", ".join(f"[{study.split('#')[0]}]({study})" for study in studies)
        lines += ["", f"## {area}", "", f"Study: {links}", "",
                  "| target | figure | met? | command | machine | date |", "|---|---|---|---|---|---|"]
        for row in area_rows:
            cells = [row["target"], row["figure"], row["met"], f"`{row['command']}`", row["machine"], row["date"]]
            lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def runtime_markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"Machine: {machine.get('platform')}, {machine.get('cpu_count')} cores "
        f"({machine.get('torch_threads')} torch threads); fp32 matmul peak "
        f"{_fmt(machine.get('matmul_fp32_gflops'))} GFLOP/s, bf16 matmul peak "
        f"{_fmt(machine.get('matmul_bf16_gflops'))} GFLOP/s, memory read bandwidth "
        f"{_fmt(machine.get('memory_read_gbs'), 1)} GB/s.",
        "",
    ]
    lengths = sorted({int(k) for e in report["models"].values() for impl in ("quire", "quire-mlx")
                      for r in e.get(impl, {}).values() if "prefill" in r
                      for k in r["prefill"]})
    header = "| model | impl | dtype | load s | " + " | ".join(f"prefill {n} tok/s" for n in lengths)
    header += " | decode tok/s (after 2K) | peak RSS MB |"
    lines += [header, "|" + "---|" * (6 + len(lengths))]
    for name, entry in report["models"].items():
        by_impl = {impl: entry.get(impl, {}) for impl in ("quire", "quire-mlx", "transformers")}
        if "llama.cpp" in entry:  # one run, on the GGUF as it is
            by_impl["llama.cpp"] = {"GGUF": entry["llama.cpp"]}
        for impl, runs in by_impl.items():
            for dtype, r in runs.items():
                if "error" in r:
                    lines.append(f"| {name} | {impl} | {dtype} | error: {r['error']} |" + " |" * (2 + len(lengths)))
                    continue
                cells = [_fmt(r["prefill"].get(str(n), {}).get("tokens_per_second")) for n in lengths]
                if dtype == "quantised" and r.get("quantised") is False:
                    dtype = "quantised (none: a float folder)"  # an HF folder, or one converted by an older Quire
                # An 8K-window model is measured at window − 64: show where that happened.
                for i, n in enumerate(lengths):
                    if str(n) not in r["prefill"]:
                        near = [k for k in r["prefill"] if abs(int(k) - n) <= 64]
                        if near:
                            cells[i] = f"{_fmt(r['prefill'][near[0]]['tokens_per_second'])} (at {near[0]})"
                lines.append(
                    f"| {name} | {impl} | {dtype} | {_fmt(r['load_seconds'], 2)} | " + " | ".join(cells)
                    + f" | {_fmt(r['decode']['tokens_per_second'], 1)} | {_fmt(r['peak_rss_mb'])} |"
                )
    peers = [(name, dtype, d) for name, e in report["models"].items() for dtype, d in e.get("derived", {}).items()
             if "decode_vs_llama_cpp" in d]
    if peers:
        lines += ["", "Quire ÷ llama.cpp (same GGUF, same token ids; above 1 Quire is faster or larger):", "",
                  "| model | Quire dtype | prefill | decode | load time | peak RSS | greedy tokens equal |",
                  "|---|---|---|---|---|---|---|"]
        for name, dtype, d in peers:
            prefill = ", ".join(f"{k}: {v:.2f}x" for k, v in d["prefill_vs_llama_cpp"].items())
            lines.append(f"| {name} | {dtype} | {prefill} | {d['decode_vs_llama_cpp']:.2f}x | "
                         f"{d['load_vs_llama_cpp']:.2f}x | {d['peak_rss_vs_llama_cpp']:.2f}x | "
                         f"{d.get('decode_same_tokens_as_llama_cpp', '–')} |")
    lines += ["", "Ratios (Quire ÷ transformers) and fractions of the machine's limits:", ""]
    lines += ["| model | Quire dtype | prefill vs transformers same dtype | prefill vs transformers fp32 "
              "| decode vs same dtype | decode vs transformers fp32 | prefill share of matmul peak "
              "| decode share of bandwidth bound | greedy tokens equal |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in report["models"].items():
        fp32 = entry.get("transformers", {}).get("float32", {})
        for dtype, d in entry.get("derived", {}).items():
            ours = entry["quire"][dtype]
            vs_fp32 = []
            for length, m in ours["prefill"].items():
                ref = fp32.get("prefill", {}).get(length)
                if ref:
                    vs_fp32.append(f"{length}: {m['tokens_per_second'] / ref['tokens_per_second']:.2f}x")
            decode_fp32 = (ours["decode"]["tokens_per_second"] / fp32["decode"]["tokens_per_second"]
                           if fp32.get("decode") else None)
            same = ", ".join(f"{k}: {v:.2f}x" for k, v in d.get("prefill_vs_same_dtype", {}).items())
            peak = ", ".join(f"{k}: {v:.0%}" for k, v in d.get("prefill_fraction_of_matmul_peak", {}).items())
            lines.append(
                f"| {name} | {dtype} | {same or '–'} | {', '.join(vs_fp32) or '–'} | "
                f"{_fmt(d.get('decode_vs_same_dtype'), 2)}x | {_fmt(decode_fp32, 2)}x | {peak} | "
                f"{d.get('decode_fraction_of_bandwidth_bound', 0):.0%} | {d.get('decode_same_tokens_as_transformers', '–')} |"
            )
    lines += ["", "Quality probe (Quire, default dtype, greedy):", "",
              "| model | format | pass-key | reading (of 5) | answers to the reading questions |", "|---|---|---|---|---|"]
    for name, entry in report["models"].items():
        first = next(iter(entry["quire"].values()))
        q = first.get("quality")
        if not q:
            continue
        passkey = ", ".join(f"{k}: {v['correct']}/{v['of']}" for k, v in q["passkey"].items())
        reading = sum(probes.rescore(a["question"], a["answer"]) for a in q["reading"])
        answers = "; ".join(a["answer"].replace("|", "/").replace("\n", " ")[:60] for a in q["reading"])
        lines.append(f"| {name} | {q['format']} | {passkey} | {reading} | {answers} |")
    return "\n".join(lines) + "\n"
