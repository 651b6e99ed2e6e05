"""torch-side measurements for `quire bench runtime`: the machine's physical limits
(fp32 matmul peak, memory bandwidth) and the transformers reference runs (prefill and
decode on the same GGUF), kept here because only backends may import torch."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def matmul_peak_gflops(size: int = 2048, repeats: int = 8, dtype: str = "float32") -> float:
    """Best GFLOP/s of one square matmul over all the threads torch uses."""
    a = torch.randn(size, size).to(getattr(torch, dtype))
    b = torch.randn(size, size).to(getattr(torch, dtype))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def memory_bandwidth_gbs(megabytes: int = 1024, repeats: int = 5) -> float:
    """Best read bandwidth (GB/s) of a reduction over a buffer far larger than cache."""
    buffer = torch.ones(megabytes * 1024 * 1024 // 4)
    buffer.sum()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best / 1e9


def transformers_run(
    gguf_path: Path, prompts: dict[int, list[int]], decode_tokens: int, decode_after: int, dtype: str = "float32"
) -> dict:
    """Load the GGUF with transformers (in `dtype`, its default attention) and time prefill
    of each prompt and greedy decode after `decode_after` tokens.

    Prefill asks for the last position's logits only (`logits_to_keep=1`), which is
    what transformers' own generate() does; decode is a bare loop over the model with
    its KV cache, which is the fastest way to drive it (generate() adds overhead).
    """
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=getattr(torch, dtype)
    )
    model.eval()
    load_seconds = time.perf_counter() - started
    result: dict = {"load_seconds": load_seconds, "prefill": {}, "attention": model.config._attn_implementation}
    with torch.inference_mode():
        model(torch.tensor([prompts[min(prompts)][:32]]), use_cache=True, logits_to_keep=1)
        for length, ids in sorted(prompts.items()):
            started = time.perf_counter()
            model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            seconds = time.perf_counter() - started
            result["prefill"][str(length)] = {"seconds": seconds, "tokens_per_second": length / seconds}
        ids = prompts[decode_after]
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        generated = []
        started = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
            generated.append(int(token))
        seconds = time.perf_counter() - started
    result["decode"] = {
        "after_tokens": decode_after,
        "tokens": decode_tokens,
        "seconds": seconds,
        "tokens_per_second": decode_tokens / seconds,
        "token_ids": generated,
    }
    return result


def device_peak_mb(device: object) -> float | None:
    """Peak memory torch allocated on a CUDA `device` so far (MB); None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e6


def threads() -> int:
    return torch.get_num_threads()
