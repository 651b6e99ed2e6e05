"""Time QuantDense (int4, int8) against a bf16 matmul on a 7B's matrix shapes, on the
CPU or a CUDA GPU: the measurements behind qdense.py's choices
(docs/lab/quantised-weights.md).

    python tools/quant_kernels.py [--device cuda] [--rows 1 16 512 2048] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from engine import quant
from engine.backends.torch.qdense import QuantDense

# DeepSeek-R1-Distill-Qwen-7B (qwen2): q/k/v fused, attention out, gate/up fused, down.
SHAPES = {"qkv": (4608, 3584), "out": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}


def _int4(n: int, k: int, rng: np.random.Generator) -> quant.Int4:
    return quant.Int4(
        rng.integers(0, 256, (n, k // 2), dtype=np.uint8),
        rng.uniform(1e-3, 1e-2, (n, k // quant.GROUP)).astype(np.float32),
        rng.uniform(-1e-2, 1e-2, (n, k // quant.GROUP)).astype(np.float32),
    )


def _time(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of one call, after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 512, 2048])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "shapes": {}}
    for name, (n, k) in SHAPES.items():
        int4 = _int4(n, k, rng)
        int8 = quant.quantise_int8(int4.dequantize())
        bf16 = torch.from_numpy(int4.dequantize()).to(torch.bfloat16).to(device)
        layers = {
            "bf16": lambda x, w=bf16: F.linear(x, w),
            "int4": QuantDense(int4, None, torch.bfloat16).to(device),
            "int8": QuantDense(int8, None, torch.bfloat16).to(device),
        }
        sizes = {"bf16": n * k * 2, "int4": n * k // 2, "int8": n * k}
        entry = {}
        for rows in args.rows:
            x = torch.randn(rows, k, dtype=torch.bfloat16, device=device)
            expected = F.linear(x, bf16).float()
            for label, layer in layers.items():
                error = ((layer(x).float() - expected).norm() / expected.norm()).item()
                seconds = _time(lambda layer=layer, x=x: layer(x), device, args.repeats)
                entry[f"{label}@{rows}"] = {
                    "ms": seconds * 1e3,
                    "weight_gbs": sizes[label] / seconds / 1e9,
                    "tflops": 2 * rows * n * k / seconds / 1e12,
                    "relative_error": error,
                }
                print(f"{name:8s} {label:5s} rows {rows:5d}: {seconds * 1e3:8.3f} ms  "
                      f"{sizes[label] / seconds / 1e9:7.1f} GB/s  {2 * rows * n * k / seconds / 1e12:7.2f} TFLOP/s  err {error:.1e}", flush=True)
        results["shapes"][name] = entry
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
