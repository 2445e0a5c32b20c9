"""The static KV cache of kd/model.py's attention (gpt-fast style).

Each attention layer gets buffers K and V of shape (B, n_kv_heads, S, head_dim), allocated once
by `Transformer.setup_cache` and written in place at the slots a call passes as `input_pos`;
attention then reads slots 0..L-1. Nothing is reallocated while decoding, so a decode step has
static shapes. The calling conventions are in kd/model.py's docstring.

Tests: `.venv/bin/python -m pytest -q tests/test_model.py -k cache`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Static K/V buffers (B, n_kv_heads, S, head_dim), written in place at slots `input_pos`."""

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        # Non-persistent: the cache follows model.to(...) but never enters a state dict.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Write k, v (B, n_kv_heads, T, head_dim) at slots input_pos (T,); return slots
        0..length-1, each (B, n_kv_heads, length, head_dim).

        The returned K/V are in the wider of the two dtypes: views (no copy) when the cache is
        at least as wide as the activations (an fp32 cache under bf16 ones stays fp32), a
        cast-up copy otherwise (a bf16 cache under fp32 activations).
        """
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        dtype = torch.promote_types(k.dtype, self.k.dtype)
        return self.k[:, :, :length].to(dtype), self.v[:, :, :length].to(dtype)
