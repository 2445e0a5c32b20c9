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
| qwen3   | q/k norms, head_dim 32 (not hidden / heads), tied, 2 layers       |
| qwen3_untied | untied, q/k/v/o biases (attention_bias), 2 layers            |
| gemma2  | both softcaps, sliding window of 6, query_pre_attn_scalar 24, 3 layers |
| gemma3  | gemma3_text: layer_types sliding, sliding, full, sliding; window 6; |
|         | local RoPE base 100, global 10000 with linear scaling x4           |
| phi3    | fused qkv_proj and gate_up_proj, sliding window of 8, untied      |
| mixtral | 4 experts, top-2, untied                                          |
| qwen3_moe | 4 experts of width 32, top-2 renormalized; layer 1 dense (mlp_only_layers), tied |

transformers initializes biases to 0 and norm weights to 1 (Gemma's to 0), which would hide a
bias or norm weight that never gets loaded; they are perturbed here, and MoE routers drawn wide
(N(0, 1)) so that no token's top-k is a near-tie. Everything is seeded.

Used by many test files: `from tests.tiny_models import make_tiny_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

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

# original_max_position_embeddings 32 puts the head_dim 16 wavelengths (6 .. ~20000) in all
# three llama3 bands: kept, interpolated and divided by the factor.
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
    "rope_theta": 500000.0,
}
_GEMMA3_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
}
_SLIDING, _FULL = "sliding_attention", "full_attention"
# arch -> (transformers config class, model class, settings over _COMMON)
TINY = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
    "llama3": (
        LlamaConfig,
        LlamaForCausalLM,
        {
            "num_hidden_layers": 3,
            "tie_word_embeddings": False,
            "rope_parameters": _LLAMA3_ROPE,
            "eos_token_id": [2, 3],
        },
    ),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True, "rope_theta": 1e6}),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        {"tie_word_embeddings": False, "sliding_window": 8},
    ),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32, "tie_word_embeddings": True}),
    "qwen3_untied": (
        Qwen3Config,
        Qwen3ForCausalLM,
        {"head_dim": 32, "tie_word_embeddings": False, "attention_bias": True},
    ),
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        {
            "num_hidden_layers": 3,
            "sliding_window": 6,
            "query_pre_attn_scalar": 24,
            # Wider weights and small caps put the tiny model's scores and logits on the bend of
            # tanh: turning either cap off moves the logits by more than 1.
            "initializer_range": 0.1,
            "attn_logit_softcapping": 1.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        {
            "num_hidden_layers": 4,
            "layer_types": [_SLIDING, _SLIDING, _FULL, _SLIDING],
            "sliding_window": 6,
            "rope_parameters": _GEMMA3_ROPE,
        },
    ),
    "phi3": (
        Phi3Config,
        Phi3ForCausalLM,
        {"sliding_window": 8, "pad_token_id": 0, "eos_token_id": 2},
    ),
    "mixtral": (
        MixtralConfig,
        MixtralForCausalLM,
        {"num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False},
    ),
    "qwen3_moe": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        {
            "num_hidden_layers": 3,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],  # layers 0 and 2 are MoE, 1 a dense MLP
            "tie_word_embeddings": True,
        },
    ),
}
ARCHS = tuple(TINY)


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
    if arch not in TINY:
        raise ValueError(f"unknown tiny arch {arch!r}; use one of {', '.join(ARCHS)}")
    config_class, model_class, settings = TINY[arch]
    config = config_class(**{**_COMMON, **settings, **config_overrides})
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
            elif name.endswith("norm.weight"):
                p.add_(torch.randn_like(p), alpha=0.1)  # around 1, as trained norms are
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                # A decisive router: no near-tie in the top-k that rounding could flip.
                p.normal_(0.0, 1.0)
    out = Path(out_dir)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    return out
