"""`quire bench runtime`: speed, memory and a quality probe of the dense runtime,
for Quire and for transformers on the same GGUF, in one run on one machine.

Each measurement runs in its own subprocess so that peak RSS belongs to one model
and one implementation. The parent gathers JSON:
- machine: CPU, threads, fp32 matmul peak GFLOP/s, memory read bandwidth GB/s;
- per model: load time (converted safetensors for Quire, the GGUF for transformers),
  prefill tokens/s at each length, decode tokens/s after 2K tokens, peak RSS, and the
  ratios Quire / transformers; prefill as a fraction of the matmul peak and decode as
  a fraction of the bandwidth bound (bytes of weights and KV read per token);
- quality (Quire only; greedy decoding matches transformers token for token, which
  the tests check): pass-key retrieval at 2K and 8K and five reading questions;
- per backend (`backends`, e.g. torch and MLX in one run): Quire's torch results
  under "quire" as before, another backend's under "quire-<backend>", and each
  other backend's speed as a ratio to torch's in the same dtype, with whether its
  greedy tokens after 2K of context are torch's ("backend_ratios").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench import probes

DECODE_TOKENS = 32
DECODE_AFTER = 2048
# Quire and llama.cpp each measure decode, and prefill up to ROUNDS_UP_TO tokens, this
# many times and report the fastest (every round is kept in the JSON): on the 2-core
# box the same decode ran anywhere from 78 to 94 tok/s a round, and the two
# implementations compared one round each moved their ratio by 10-20% between runs.
# Longer prompts take 20-60 s a round and are measured once.
ROUNDS = 3
ROUNDS_UP_TO = 2048


def rounds_for(length: int) -> int:
    return ROUNDS if length <= ROUNDS_UP_TO else 1


def timing(length: int, rounds: list[float]) -> dict:
    """A measurement of `length` tokens from the seconds of each round: the fastest."""
    seconds = min(rounds)
    return {"seconds": seconds, "tokens_per_second": length / seconds, "rounds_seconds": rounds}


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


def _fit(lengths: list[int], window: int) -> list[int]:
    """Lengths that fit the model's window; 8K on an 8K-window model becomes
    window − 64 so that the prompt and a few generated tokens still fit."""
    return sorted({min(n, window - 64) for n in lengths})


def _prompts(tokenizer, lengths: list[int]) -> dict[int, list[int]]:
    """Real-looking token ids of exact lengths: the reading passage repeated."""
    ids = tokenizer.encode(probes.PASSAGE * 4)
    longest = max(lengths + [DECODE_AFTER])
    stream = (ids * (longest // len(ids) + 1))[:longest]
    return {n: stream[:n] for n in sorted(set(lengths + [DECODE_AFTER]))}


def _weight_bytes(model) -> tuple[int, int]:
    """(bytes of non-embedding weights, bytes of the output projection)."""
    if hasattr(model, "weight_bytes"):  # backends that count their own (MLX)
        return model.weight_bytes()
    total = 0
    for layer in model.layers:
        for value in vars(layer).values():
            if hasattr(value, "nbytes") and callable(value.nbytes):
                total += value.nbytes()
            elif value is not None and hasattr(value, "numel"):
                total += value.numel() * value.element_size()
    total += model.final_norm.numel() * model.final_norm.element_size()
    return total, model.lm_head.nbytes()


def _bytes_per_value(model) -> int:
    """Bytes of one activation (and KV) value."""
    embed = model.embed
    if hasattr(embed, "itemsize"):  # MLX, and torch's float tables
        return embed.itemsize
    return model.dtype.itemsize  # a quantised table: the activations' dtype


def _linear_parameters(model, weight_bytes: int) -> int:
    """Weights multiplied per token outside the output head (for FLOPs): counted
    from the matrices' shapes, which quantised weights do not show in bytes."""
    if not hasattr(model, "layers") or not hasattr(model.layers[0], "qkv"):
        return weight_bytes // _bytes_per_value(model)
    total = 0
    for layer in model.layers:
        for name in ("qkv", "out", "gate_up", "down"):
            dense = getattr(layer, name)
            total += dense.rows * dense.columns if hasattr(dense, "rows") else dense.weight.numel()
    return total


def worker_ours(model_name: str, lengths: list[int], quality: bool, dtype: str, backend: str = "auto") -> dict:
    from engine.generate import GenerationStats, SamplingParams, prefill
    from engine.runtime import load_model

    # "quantised": a GGUF's quantised matrices stay quantised (the CPU's default load),
    # activations in the faster float type of this CPU, bf16 on a GPU.
    started = time.perf_counter()  # the load as the app pays it: load_model, end to end
    lm = load_model(model_name, dtype=dtype, backend=backend)
    load_seconds = time.perf_counter() - started
    window = lm.config.max_position_embeddings
    lengths = _fit(lengths, window)
    prompts = _prompts(lm.tokenizer, lengths)
    model = lm.model
    result: dict = {
        "load_seconds": load_seconds,
        "backend": lm.backend,
        "dtype": dtype,
        "quantised": bool(getattr(lm.model, "quantised", False)),
        "activations": str(getattr(lm.model, "dtype", "")).rsplit(".", 1)[-1],
        "family": lm.config.family,
        "window": window,
        "prefill": {},
        "parameters": lm.folder.parameter_count(),
    }
    warm = model.new_cache(64)  # warm-up: a prompt's path and one decode step
    prefill(model, prompts[min(prompts)][:32], warm)
    model.forward(prompts[min(prompts)][32:33], warm)
    for length in lengths:
        rounds = []
        for _ in range(rounds_for(length)):
            cache = model.new_cache(length + 1)
            started = time.perf_counter()
            prefill(model, prompts[length], cache)
            rounds.append(time.perf_counter() - started)
        result["prefill"][str(length)] = timing(length, rounds)
    cache = model.new_cache(DECODE_AFTER + DECODE_TOKENS + 1)
    logits = prefill(model, prompts[DECODE_AFTER], cache)
    rounds = []
    for _ in range(ROUNDS):
        cache.truncate(DECODE_AFTER)  # each round decodes the same tokens from the same prompt
        token = int(logits.argmax())
        generated = []
        started = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            token = int(model.forward([token], cache)[-1].argmax())
            generated.append(token)
        rounds.append(time.perf_counter() - started)
    result["decode"] = {"after_tokens": DECODE_AFTER, "tokens": DECODE_TOKENS, **timing(DECODE_TOKENS, rounds),
                        "token_ids": generated}
    weights, head = _weight_bytes(model)
    kv_read = DECODE_AFTER * lm.config.kv_bytes_per_token(bytes_per_value=_bytes_per_value(model))
    result["decode"]["bytes_per_token"] = weights + head + kv_read
    result["flops_per_token_linear"] = 2 * _linear_parameters(model, weights)
    c = lm.config
    result["attention_flops_coefficient"] = 2 * c.num_attention_heads * c.head_dim * len(c.global_layers)
    if quality:
        result["quality"] = _quality(lm, _fit([2048, 8192], window), GenerationStats, SamplingParams)
    result["peak_rss_mb"] = _peak_rss_mb()
    if lm.backend == "torch":
        from engine.backends.torch import measure

        result["device"] = str(model.device)
        peak = measure.device_peak_mb(model.device)
        if peak is not None:
            result["peak_device_mb"] = peak
    return result


def _quality(lm, passkey_lengths: list[int], stats_cls, params_cls) -> dict:
    def count(text: str) -> int:
        return len(lm.tokenizer.encode(text))

    chat = lm.tokenizer.chat_template is not None
    quality: dict = {"format": "chat" if chat else "completion", "passkey": {}, "reading": []}
    for length in passkey_lengths:
        hits = 0
        trials = []
        for depth, seed in ((0.1, 1), (0.5, 2), (0.9, 3)):
            text, key = probes.passkey_prompt(count, length - 40, depth, seed)
            params = params_cls(max_new_tokens=10)
            stats = stats_cls()
            if chat:
                answer = "".join(t.text for t in lm.chat([{"role": "user", "content": text}], params, stats=stats))
            else:
                answer = "".join(t.text for t in lm.complete(text, params, stats=stats))
            ok = key in answer
            hits += ok
            trials.append({"depth": depth, "prompt_tokens": stats.prompt_tokens, "answer": answer.strip(), "ok": ok})
        quality["passkey"][str(length)] = {"correct": hits, "of": len(trials), "trials": trials}
    correct = 0
    for question, accepted in probes.QUESTIONS:
        params = params_cls(max_new_tokens=24, stop_strings=("\n\n",))
        if chat:
            answer = "".join(t.text for t in lm.chat(probes.reading_messages(question), params))
        else:
            answer = "".join(t.text for t in lm.complete(probes.reading_completion(question), params))
        ok = probes.answer_is_correct(answer, accepted)
        correct += ok
        quality["reading"].append({"question": question, "answer": answer.strip(), "ok": ok})
    quality["reading_correct"] = correct
    return quality


def worker_reference(model_name: str, lengths: list[int], dtype: str) -> dict:
    from engine.backends.torch import measure
    from engine.model_store import open_model
    from engine.tokenizer import load_tokenizer

    folder = open_model(model_name)
    source = json.loads((folder.path / "source.json").read_text())
    gguf_path = Path(source["path"])
    window = folder.config.max_position_embeddings
    lengths = _fit(lengths, window)
    prompts = _prompts(load_tokenizer(folder.path), lengths)
    prompts = {n: ids for n, ids in prompts.items() if n in lengths or n == DECODE_AFTER}
    result = measure.transformers_run(gguf_path, prompts, DECODE_TOKENS, DECODE_AFTER, dtype)
    result["prefill"] = {k: v for k, v in result["prefill"].items() if int(k) in lengths}
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def worker_machine() -> dict:
    from engine.backends.torch import measure

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count() or 1,
        "torch_threads": measure.threads(),
        "matmul_fp32_gflops": measure.matmul_peak_gflops(dtype="float32"),
        "matmul_bf16_gflops": measure.matmul_peak_gflops(dtype="bfloat16"),
        "memory_read_gbs": measure.memory_bandwidth_gbs(),
    }


def worker_machine_mlx() -> dict:
    """MLX's own matmul peak: on Linux it is set by the BLAS the mlx-cpu wheel
    bundles, unless another one is preloaded (recorded as `ld_preload`)."""
    from engine.backends.mlx import measure

    return {
        "mlx_version": measure.version(),
        "mlx_device": measure.device(),
        "mlx_matmul_fp32_gflops": measure.matmul_peak_gflops(dtype="float32"),
        "mlx_matmul_bf16_gflops": measure.matmul_peak_gflops(dtype="bfloat16"),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }



def _spawn(args: list[str]) -> dict:
    command = [sys.executable, "-m", "bench.runtime", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(
    models: list[str] | None = None,
    lengths: list[int] | None = None,
    include_reference: bool = True,
    include_quality: bool = True,
    dtypes: list[str] | None = None,
    backends: list[str] | None = None,
    include_llama_cpp: bool = True,
) -> dict:
    """Measure every model in every dtype and backend, Quire and transformers alike.

    The first dtype is Quire's default ("auto" resolves to the faster of fp32 and
    bf16 on this machine); the quality probe runs only in that one, on the first
    backend. `backends` ("auto", "torch", "mlx"; default ["auto"]) run in the order
    given, each in its own subprocess per model and dtype.
    """
    from engine.install import DEFAULT_MODELS
    from engine.runtime import resolve_backend

    lengths = lengths or [512, 2048, 8192]
    models = models or [spec.name for spec in DEFAULT_MODELS]
    dtypes = dtypes or ["quantised", "bfloat16"]
    backends = list(dict.fromkeys(resolve_backend(b) for b in (backends or ["auto"])))
    machine = _spawn(["--worker", "machine"])
    if "mlx" in backends:
        machine.update(_spawn(["--worker", "machine-mlx"]))
    report: dict = {
        "benchmark": "runtime", "machine": machine, "lengths": lengths, "dtypes": dtypes, "backends": backends, "models": {}
    }
    for name in models:
        entry: dict = {_impl(b): {} for b in backends} | {"transformers": {}}
        for i, dtype in enumerate(dtypes):
            for j, backend in enumerate(backends):
                quality = include_quality and i == 0 and j == 0
                entry[_impl(backend)][dtype] = _spawn(
                    ["--worker", "ours", "--model", name, "--dtype", dtype, "--backend", backend,
                     "--lengths", *map(str, lengths)]
                    + ([] if quality else ["--no-quality"])
                )
            if include_reference and dtype != "quantised":  # transformers runs GGUFs dequantised
                entry["transformers"][dtype] = _spawn(
                    ["--worker", "reference", "--model", name, "--dtype", dtype, "--lengths", *map(str, lengths)]
                )
        if include_llama_cpp:
            entry["llama.cpp"] = _llama_cpp(name, lengths)
        if "quire" in entry:
            _derive(entry, machine)
        _backend_ratios(entry, backends)
        report["models"][name] = entry
    return report


def _llama_cpp(model_name: str, lengths: list[int]) -> dict:
    """llama.cpp on the model's GGUF, fed the same token ids as Quire."""
    from bench import llamacpp
    from engine.model_store import open_model
    from engine.tokenizer import load_tokenizer

    folder = open_model(model_name)
    if folder.source_gguf is None:
        return {"error": "no GGUF for this model (llama.cpp reads GGUF files only)"}
    lengths = _fit(lengths, folder.config.max_position_embeddings)
    prompts = _prompts(load_tokenizer(folder.path), lengths)
    return llamacpp.run(folder.source_gguf, prompts, lengths, DECODE_TOKENS, DECODE_AFTER,
                        rounds={n: rounds_for(n) for n in lengths}, decode_rounds=ROUNDS,
                        log=lambda m: print(m, file=sys.stderr))


def _impl(backend: str) -> str:
    """The report key of a backend's results: "quire" for torch (the key reports
    have always used), "quire-<backend>" for the others."""
    return "quire" if backend == "torch" else f"quire-{backend}"


def _backend_ratios(entry: dict, backends: list[str]) -> None:
    """Each non-torch backend's prefill and decode speed ÷ torch's, same dtype, and
    whether its greedy tokens after 2K of context are torch's."""
    torch_results = entry.get("quire", {})
    ratios: dict = {}
    for backend in backends:
        if backend == "torch":
            continue
        for dtype, other in entry[_impl(backend)].items():
            base = torch_results.get(dtype, {})
            if "error" in other or not base or "error" in base:
                continue
            ratios.setdefault(backend, {})[dtype] = {
                "prefill_vs_torch": {
                    n: m["tokens_per_second"] / base["prefill"][n]["tokens_per_second"]
                    for n, m in other["prefill"].items() if n in base["prefill"]
                },
                "decode_vs_torch": other["decode"]["tokens_per_second"] / base["decode"]["tokens_per_second"],
                "load_vs_torch": other["load_seconds"] / base["load_seconds"],
                "decode_same_tokens_as_torch": other["decode"]["token_ids"] == base["decode"]["token_ids"],
            }
    if ratios:
        entry["backend_ratios"] = ratios


def _derive(entry: dict, machine: dict) -> None:
    """Ratios to transformers (same dtype, and transformers' fastest dtype) and
    fractions of the machine's physical limits."""
    derived: dict = {}
    refs = {d: r for d, r in entry["transformers"].items() if "error" not in r}
    for dtype, ours in entry["quire"].items():
        if "error" in ours:
            continue
        d: dict = {"prefill_vs_same_dtype": {}, "prefill_vs_best": {}, "prefill_fraction_of_matmul_peak": {}}
        activations = ours.get("activations", dtype)  # quantised weights multiply in this dtype
        peak = machine.get(f"matmul_{'bf16' if activations == 'bfloat16' else 'fp32'}_gflops")
        for length, m in ours["prefill"].items():
            n = int(length)
            same = refs.get(dtype, {}).get("prefill", {}).get(length)
            if same:
                d["prefill_vs_same_dtype"][length] = m["tokens_per_second"] / same["tokens_per_second"]
            best = max((r["prefill"][length]["tokens_per_second"] for r in refs.values() if length in r["prefill"]), default=0)
            if best:
                d["prefill_vs_best"][length] = m["tokens_per_second"] / best
            flops = ours["flops_per_token_linear"] * n + ours["attention_flops_coefficient"] * n * n
            if peak:
                d["prefill_fraction_of_matmul_peak"][length] = flops / m["seconds"] / 1e9 / peak
        if dtype in refs:
            d["decode_vs_same_dtype"] = ours["decode"]["tokens_per_second"] / refs[dtype]["decode"]["tokens_per_second"]
            d["decode_same_tokens_as_transformers"] = ours["decode"]["token_ids"] == refs[dtype]["decode"]["token_ids"]
            d["load_vs_same_dtype"] = refs[dtype]["load_seconds"] / ours["load_seconds"]
        if refs:
            d["decode_vs_best"] = ours["decode"]["tokens_per_second"] / max(r["decode"]["tokens_per_second"] for r in refs.values())
        peer = entry.get("llama.cpp", {})
        if "decode" in peer:
            d["prefill_vs_llama_cpp"] = {
                n: m["tokens_per_second"] / peer["prefill"][n]["tokens_per_second"]
                for n, m in ours["prefill"].items()
                if n in peer["prefill"]
            }
            d["decode_vs_llama_cpp"] = ours["decode"]["tokens_per_second"] / peer["decode"]["tokens_per_second"]
            d["load_vs_llama_cpp"] = ours["load_seconds"] / peer["load_seconds"]
            d["peak_rss_vs_llama_cpp"] = ours["peak_rss_mb"] / peer["peak_rss_mb"]
            d["decode_same_tokens_as_llama_cpp"] = ours["decode"]["token_ids"] == peer["decode"]["token_ids"]
        bandwidth = machine.get("memory_read_gbs")
        if bandwidth:
            bound = bandwidth * 1e9 / ours["decode"]["bytes_per_token"]
            d["decode_bandwidth_bound_tokens_per_second"] = bound
            d["decode_fraction_of_bandwidth_bound"] = ours["decode"]["tokens_per_second"] / bound
        derived[dtype] = d
    entry["derived"] = derived


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=["ours", "reference", "machine", "machine-mlx"], required=True)
    parser.add_argument("--model")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    if args.worker == "machine":
        result = worker_machine()
    elif args.worker == "machine-mlx":
        result = worker_machine_mlx()
    elif args.worker == "ours":
        result = worker_ours(args.model, args.lengths, not args.no_quality, args.dtype, args.backend)
    else:
        result = worker_reference(args.model, args.lengths, args.dtype)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
