"""llama.cpp as a peer in `quire bench runtime`: the same GGUF, measured the same way.

Ollama, LM Studio and GPT4All all run llama.cpp, so it is what Quire's speed is
compared with. llama-cpp-python is built from PyPI's source into a venv of its own
under data_dir()/bench/ the first time the benchmark needs it (several minutes on
two cores); `make test` never installs it. The build targets this CPU's vector
extensions by name (GGML_NATIVE=OFF): the native build crashed on first use on the
2-core box (issue 28).

`worker` runs inside that venv (it imports only llama_cpp, numpy and the standard
library) and prints one JSON line: load time, prefill tokens/s per length, decode
tokens/s after DECODE_AFTER tokens with greedy tokens, peak RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

VERSION = "0.3.36"


def _cmake_args() -> str:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    args = ["-DGGML_NATIVE=OFF"]
    if "avx2" in flags:
        args += ["-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"]
    if "avx512f" in flags:
        args.append("-DGGML_AVX512=ON")
    return " ".join(args)


def venv_python() -> Path:
    from engine.paths import data_dir

    return data_dir() / "bench" / f"llama-cpp-{VERSION}" / "bin" / "python"


def ensure(log=print) -> Path | str:
    """The venv's python with llama_cpp importable, building it if needed; or a
    one-line reason it could not be built."""
    python = venv_python()
    if python.is_file() and subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return python
    root = python.parent.parent
    log(f"building llama-cpp-python {VERSION} into {root} (several minutes)")
    made = subprocess.run([sys.executable, "-m", "venv", str(root)], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a venv: {made.stderr.strip()[-200:]}"
    env = dict(os.environ, CMAKE_ARGS=_cmake_args(), CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    built = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-cache-dir", f"llama-cpp-python=={VERSION}"],
        capture_output=True,
        text=True,
        env=env,
    )
    if built.returncode != 0:
        return "llama-cpp-python did not build: " + " ".join(built.stderr.strip().splitlines()[-3:])[-300:]
    return python


def run(
    gguf: Path,
    prompts: dict[int, list[int]],
    lengths: list[int],
    decode_tokens: int,
    decode_after: int,
    *,
    rounds: dict[int, int] | None = None,
    decode_rounds: int = 1,
    log=print,
) -> dict:
    """Prefill at `lengths` and decode after `decode_after` (all in `prompts`), in
    the venv, each measured `rounds[length]` / `decode_rounds` times, the fastest
    reported (as Quire's, bench/runtime.py); {"error": ...} when llama.cpp is not
    available."""
    python = ensure(log)
    if isinstance(python, str):
        return {"error": python}
    spec = {
        "gguf": str(gguf),
        "prompts": {str(n): ids for n, ids in prompts.items()},
        "lengths": sorted(lengths),
        "decode_tokens": decode_tokens,
        "decode_after": decode_after,
        "rounds": {str(n): (rounds or {}).get(n, 1) for n in lengths},
        "decode_rounds": decode_rounds,
    }
    done = subprocess.run(
        [str(python), __file__, "--worker"], input=json.dumps(spec), capture_output=True, text=True
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker(spec: dict) -> dict:
    import resource
    import time

    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    prompts = {int(n): ids for n, ids in spec["prompts"].items()}
    decode_after, decode_tokens = spec["decode_after"], spec["decode_tokens"]
    longest = max(max(prompts), decode_after) + decode_tokens + 8
    threads = os.cpu_count() or 1
    started = time.perf_counter()
    llm = Llama(
        model_path=spec["gguf"], n_ctx=longest, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    result: dict = {"load_seconds": time.perf_counter() - started, "threads": threads, "prefill": {}}
    llm.eval(prompts[min(prompts)][:32])  # warm-up
    def timing(length: int, rounds: list[float]) -> dict:  # the fastest round, as Quire's
        return {"seconds": min(rounds), "tokens_per_second": length / min(rounds), "rounds_seconds": rounds}

    for length in spec["lengths"]:
        rounds = []
        for _ in range(int(spec.get("rounds", {}).get(str(length), 1))):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompts[length])
            rounds.append(time.perf_counter() - t0)
        result["prefill"][str(length)] = timing(length, rounds)
    def last_logits() -> np.ndarray:  # the last evaluated token's, from llama.cpp itself
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))

    rounds = []
    for _ in range(int(spec.get("decode_rounds", 1))):
        llm.reset()  # each round prefills the prompt again, then decodes the same tokens
        llm.eval(prompts[decode_after])
        token = int(np.argmax(last_logits()))
        generated = []
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            llm.eval([token])
            token = int(np.argmax(last_logits()))
            generated.append(token)
        rounds.append(time.perf_counter() - t0)
    result["decode"] = {"after_tokens": decode_after, "tokens": decode_tokens, **timing(decode_tokens, rounds),
                        "token_ids": generated}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    print(json.dumps(worker(json.loads(sys.stdin.read()))))
