"""dtype names and the probe that picks the faster compute dtype of this device.

`DTYPES` maps the names settings use (`precision`, `--dtype`) to torch dtypes. `fast_dtype`
decides what `precision = "auto"` means here. No torch.distributed: scripts that run one
process import this module alone (kd/parallel.py agrees on the choice across ranks).

Tests: `.venv/bin/python -m pytest -q tests/test_parallel.py -k fast_dtype`.
"""

import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def fast_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, and on a CPU where a bf16 matmul beats fp32; else fp32.

    CPUs differ by ~200x here: with AVX512-BF16 or AMX a bf16 matmul runs ~3x faster than fp32,
    while on an AVX2-only CPU (no bf16 instructions) oneDNN is bypassed and a bf16 matmul runs
    ~70x *slower* (1.6 vs 120 GFLOP/s on a 2-core AMD EPYC, docs/benchmarks.md). CPU feature
    flags do not tell which (AVX512 without BF16 is emulated, at a speed in between), so time
    it: a layer-sized matmul, best of three, ~0.01 s on a bf16 CPU, ~0.5 s on an AVX2 one."""
    if device.type != "cpu":
        return torch.bfloat16

    def best_time(dtype: torch.dtype) -> float:
        a, b = torch.randn(128, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        a @ b  # warm-up: oneDNN builds its kernel on the first call
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)

    return torch.bfloat16 if best_time(torch.bfloat16) < best_time(torch.float32) else torch.float32


def fast_precision(device: torch.device) -> str:
    """`fast_dtype` as a `precision` setting: "bf16" or "fp32"."""
    return "bf16" if fast_dtype(device) == torch.bfloat16 else "fp32"
