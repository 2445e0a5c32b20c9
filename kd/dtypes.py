"""dtype names and the probe that picks the faster compute dtype of this device.

`DTYPES` maps the names settings use (`precision`, `--dtype`) to torch dtypes. `fast_dtype`
decides what `precision = "auto"` means here. No torch.distributed: scripts that run one
process import this module alone (kd/parallel.py agrees on the choice across ranks).

Tests: `.venv/bin/python -m pytest -q tests/test_parallel.py -k fast_dtype`.
"""

import math
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def fast_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, and on a CPU where a bf16 matmul beats fp32; else fp32.

    CPUs differ by ~200x here: with AVX512-BF16 or AMX a bf16 matmul runs ~3x faster than fp32,
    while on an AVX2-only CPU (no bf16 instructions) oneDNN is bypassed and a bf16 matmul runs
    ~70x *slower* (1.6 vs 120 GFLOP/s on a 2-core AMD EPYC, docs/benchmarks.md). CPU feature
    flags do not tell which (AVX512 without BF16 is emulated, at a speed in between), so time
    it: a layer-sized matmul in each dtype, alternately, the best of up to 7 rounds (~0.01 s
    each on a bf16 CPU). Alternating rounds and taking the best of each keep a busy machine
    from deciding: another process that takes the core during one timing delays that timing
    only. An AVX2 CPU stops after the first round, where bf16 is already 10x slower."""
    if device.type != "cpu":
        return torch.bfloat16
    operands = {
        dtype: (torch.randn(128, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype))
        for dtype in (torch.bfloat16, torch.float32)
    }
    for a, b in operands.values():
        a @ b  # warm-up: oneDNN builds its kernel on the first call
    best = dict.fromkeys(operands, math.inf)
    for _ in range(7):
        for dtype, (a, b) in operands.items():
            t0 = time.perf_counter()
            a @ b
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
        if best[torch.bfloat16] > 10 * best[torch.float32]:
            break
    return torch.bfloat16 if best[torch.bfloat16] < best[torch.float32] else torch.float32


def fast_precision(device: torch.device) -> str:
    """`fast_dtype` as a `precision` setting: "bf16" or "fp32"."""
    return "bf16" if fast_dtype(device) == torch.bfloat16 else "fp32"
