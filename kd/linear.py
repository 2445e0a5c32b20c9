"""Linear layers that use every CPU core when decoding: the split matrix-vector product.

A decode step multiplies one row per sequence by every weight matrix, so its speed is how
fast the weights stream from memory. For fp32 matrix-vector shapes MKL (PyTorch's CPU BLAS)
runs on one core whatever `torch.get_num_threads()` says: measured on 2 cores, one row times
SmolLM2-135M's 210 projection matrices reads ~11 GB/s with 1 thread or 2, where a plain sum
reads ~26 GB/s. `linear` splits the product into n = threads independent pieces and runs
them as one batched matmul (bmm), which MKL spreads over the threads, one piece each:

* W (out, in) row-major, as loaded: n blocks of out/n rows; the outputs x W_j^T side by side
  are x W^T. Every output is still one dot product over a whole row (on the shapes measured
  the result equals F.linear bit for bit).
* W stored transposed, a view of a contiguous (in, out) tensor: n blocks of in/n columns of W,
  i.e. contiguous row blocks of W^T, and x W^T = sum_j x_j W_j^T over the matching slices of
  x (one fp32 add per output more than F.linear).

Which layout streams faster depends on the shape (MKL has one kernel for each). Measured on
2 cores, weights read from memory, GB/s of weights: 1536x576 (gate, up) 15 row-major vs 24
transposed; 576x576 (q, o) 17 vs 17; 192x576 (k, v) 12 vs 9; 576x1536 (down) 20 vs 17; the
49152x576 head 5.9 vs 4.0 ms. So `Transformer.decode_layout()` stores transposed exactly the
fp32 CPU matrices wider than tall (out > in): gate, up and the head. SmolLM2-135M decode
step, fp32, batch 1, 2 cores: 61 ms with F.linear, 41 with the split, 36 with decode_layout
too (docs/benchmarks.md, "Generation").

The split applies only without autograd (the training path is untouched), in fp32 (bf16
decoding has its own kernel, kd/sampling.py), on a CPU with 2+ threads.

    .venv/bin/python -m pytest -q tests/test_linear.py
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Most rows (tokens in one call) that `linear` splits: decode steps and short prefills. On 2
# cores with SmolLM2's matrices the split was 1.5x faster at 1 row, 1.3x at 128 and 256, and
# 10% slower at 1024, where MKL's own threaded matmul already keeps every core busy.
SPLIT_MAX_ROWS = 256


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b, as `F.linear`; few rows on a CPU get the product split across the cores (see
    the module docstring)."""
    n, (out_features, in_features) = torch.get_num_threads(), weight.shape
    rows = x.numel() // in_features
    if (
        n < 2
        or x.device.type != "cpu"
        or weight.dtype != torch.float32
        or torch.is_grad_enabled()
        or rows > SPLIT_MAX_ROWS
    ):
        return F.linear(x, weight, bias)
    if weight.t().is_contiguous() and in_features % n == 0:
        # Stored transposed: split the sum over `in`, x W^T = sum_j x_j W_j^T.
        x_parts = x.reshape(rows, n, in_features // n).transpose(0, 1)  # (n, rows, in/n)
        w_parts = weight.t().unflatten(0, (n, in_features // n))  # (n, in/n, out): W_j^T, views
        y = torch.bmm(x_parts, w_parts).sum(0)  # (rows, out)
    elif out_features % n == 0:
        # Row-major: split the outputs, x W^T = [x W_1^T, ..., x W_n^T].
        blocks = weight.unflatten(0, (n, out_features // n)).transpose(1, 2)  # (n, in, out/n)
        x_rows = x.reshape(1, rows, in_features).expand(n, -1, -1)  # (n, rows, in), no copy
        y = torch.bmm(x_rows, blocks)  # (n, rows, out/n)
        y = y.transpose(0, 1).reshape(rows, out_features)  # the blocks side by side
    else:
        return F.linear(x, weight, bias)
    y = y.view(*x.shape[:-1], out_features)
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) computed by `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
