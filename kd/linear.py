"""Linear layers that use every CPU core when decoding: the split matrix-vector product.

A decode step multiplies one row per sequence by every weight matrix, so its speed is how
fast the weights stream from memory. For fp32 matrix-vector shapes MKL (PyTorch's CPU BLAS)
runs on one core whatever `torch.get_num_threads()` says: measured on 2 cores, one row times
SmolLM2-135M's 210 projection matrices reads ~11 GB/s with 1 thread or 2, where a plain sum
reads ~26 GB/s. `linear` cuts W (out, in) into n = threads blocks of out/n rows and runs the n
products x W_j^T as one batched matmul, which MKL spreads over the threads, a block each; side
by side they are x W^T. Every output is still one dot product over a whole row of W (on the
shapes measured the result equals F.linear bit for bit). SmolLM2-135M decode step, fp32,
batch 1, 2 cores: 58 -> 41 ms (docs/benchmarks.md, "Generation").

The output head is the largest matrix (V x H) and reads faster transposed in memory (MKL's
column-major matrix-vector kernel): `Transformer.decode_layout()` stores it that way, and
`linear` works on either layout (`unflatten` is a view of both). Head product on 2 cores,
V = 49152: 4.0 ms transposed, 5.9 ms row-major. The other matrices are as fast or faster
row-major (41 vs 48 ms per step with all of them transposed), so they stay as loaded.

The split applies only without autograd (the training path is untouched), in fp32 (bf16
decoding has its own kernel, kd/sampling.py), on a CPU with 2+ threads.

    .venv/bin/python -m pytest -q tests/test_model.py -k linear
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Most rows (tokens in one call) that `linear` splits: decode steps and short prefills. On 2
# cores with SmolLM2's matrices the split was 1.5x faster at 1 row, 1.3x at 128 and 256, and
# 10% slower at 1024, where MKL's own threaded matmul already keeps every core busy.
SPLIT_MAX_ROWS = 256


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b, as `F.linear`; few rows on a CPU get W's rows split across the cores (see above)."""
    n, out_features = torch.get_num_threads(), weight.shape[0]
    rows = x.numel() // x.shape[-1]
    if (n < 2 or x.device.type != "cpu" or weight.dtype != torch.float32 or torch.is_grad_enabled()
            or rows > SPLIT_MAX_ROWS or out_features % n):
        return F.linear(x, weight, bias)
    blocks = weight.unflatten(0, (n, out_features // n)).transpose(1, 2)  # (n, in, out/n): W_j^T, views
    y = torch.bmm(x.reshape(1, rows, -1).expand(n, -1, -1), blocks)  # (n, rows, out/n)
    y = y.transpose(0, 1).reshape(*x.shape[:-1], out_features)  # (..., out): the blocks side by side
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) computed by `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
