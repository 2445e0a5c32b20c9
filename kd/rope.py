"""Rotary position embeddings (RoFormer, arXiv 2104.09864) in the rotate-half layout.

A position p rotates each pair of channels (x_i, x_{i+d/2}) of a query or key head by the
angle p * f_i, with inverse frequencies f_i = theta^(-2i/d), i = 0..d/2-1. The dot product of
a rotated query and key then depends only on their distance. Scaling variants change f:

- "linear" (position interpolation, arXiv 2306.15595; Gemma 3's global layers): f / factor.
- "llama3" (Llama 3.1, arXiv 2407.21783): long wavelengths divided by `factor`, short ones
  kept, a smooth blend between.

Which theta and scaling a layer uses is the config's business (`ModelConfig.rope`: Gemma 3
has one base for its sliding-window layers and another for its global ones). Everything here
runs in fp32 and casts back, as in Meta's reference.

Tests: `.venv/bin/python -m pytest -q tests/test_model.py -k rope`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The keys each supported rope_type needs besides rope_type itself.
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict | None, device: torch.device | None = None
) -> Tensor:
    """Inverse frequencies theta^(-2i/d), i = 0..d/2-1, in fp32, scaled as `scaling` says.

    Llama 3.1 (transformers `_compute_llama3_parameters`): wavelengths 2*pi/f longer than
    L/low_freq_factor (L = original context) are divided by `factor`, shorter than
    L/high_freq_factor are kept, and those in between interpolate smoothly with
    s = (L/wavelen - low) / (high - low): f' = (1 - s) f / factor + s f.
    """
    d = head_dim
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d)
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of angle p * f for positions (B, T): each (B, 1, T, head_dim), fp32."""
    angles = positions[..., None].float() * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, head_dim): rotate-half layout
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by angle p*f_i, in fp32: x cos + rotate_half(x) sin."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
