"""Tiny random Hugging Face checkpoints for tests: `transformers` builds and saves them.

`make_tiny_checkpoint(dir, "llama")` writes what `save_pretrained` writes for a model of
hidden size 64 and vocabulary 256 (config.json + model.safetensors, or shards with an index
when `max_shard_size` is small) and returns the directory. Architectures:

| arch    | what it covers                                                    |
| ------- | ----------------------------------------------------------------- |
| llama   | GQA (4 heads, 2 KV heads), tied embeddings, 2 layers (SmolLM2-like) |
| llama3  | Llama 3.1 RoPE scaling, untied lm_head, 3 layers                  |
| qwen2   | q/k/v biases, no o bias, tied embeddings, 2 layers                |
| mistral | sliding window of 8 positions, untied, 2 layers                   |

transformers initializes biases to 0 and norm weights to 1, which would hide a bias or norm
weight that never gets loaded; they are perturbed here. Everything is seeded.

Used by many test files: `from tests.tiny_models import make_tiny_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARCHS = ("llama", "llama3", "qwen2", "mistral")
_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


def _config(arch: str, overrides: dict):
    if arch == "llama":
        return LlamaConfig(**{**_COMMON, "tie_word_embeddings": True, **overrides})
    if arch == "llama3":
        # original_max_position_embeddings 32 puts the head_dim 16 wavelengths (6 .. ~20000)
        # in all three llama3 bands: kept, interpolated and divided by the factor.
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
            "rope_theta": 500000.0,
        }
        return LlamaConfig(
            **{
                **_COMMON,
                "num_hidden_layers": 3,
                "tie_word_embeddings": False,
                "rope_parameters": scaling,
                "eos_token_id": [2, 3],
                **overrides,
            }
        )
    if arch == "qwen2":
        return Qwen2Config(
            **{**_COMMON, "tie_word_embeddings": True, "rope_theta": 1000000.0, **overrides}
        )
    if arch == "mistral":
        return MistralConfig(
            **{**_COMMON, "tie_word_embeddings": False, "sliding_window": 8, **overrides}
        )
    raise ValueError(f"unknown tiny arch {arch!r}; use one of {', '.join(ARCHS)}")


def make_tiny_checkpoint(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    **config_overrides,
) -> Path:
    """Build a seeded random tiny `arch` model with transformers and save_pretrained it to
    out_dir."""
    cls = {
        "llama": LlamaForCausalLM,
        "llama3": LlamaForCausalLM,
        "qwen2": Qwen2ForCausalLM,
        "mistral": MistralForCausalLM,
    }
    config = _config(arch, config_overrides)
    torch.manual_seed(seed)
    model = cls[arch](config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
            elif name.endswith("norm.weight"):
                p.add_(torch.randn_like(p), alpha=0.1)  # around 1, as trained norms are
    out = Path(out_dir)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    return out
