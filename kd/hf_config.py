"""config.json in and out: a Hugging Face config as kd's `ModelConfig`, and back.

`load_config(dir)` reads a model directory's config.json; `config_from_dict` accepts what
checkpoints on disk hold (classic `rope_theta` + `rope_scaling`, Gemma's `hidden_activation`,
Gemma 3's `rope_local_base_freq` / `sliding_window_pattern`) and what transformers 5 writes
(`rope_parameters`, per layer type for Gemma 3), checks every value's type, and fills a key the
file leaves out with transformers' default for the family (FAMILY_DEFAULTS), with a one-line
warning where it changes the math. `config_to_dict` writes a config.json that transformers 4.x
and 5.x both load. Unsupported families and settings are one-line errors naming the key.

Tests: `.venv/bin/python -m pytest -q tests/test_model.py tests/test_families.py`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from kd.model_config import SUPPORTED_MODEL_TYPES, ModelConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
_GEMMA = {
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}
# What transformers (5.x: LlamaConfig, MistralConfig, ...) takes for a key that config.json
# leaves out, where that differs from ModelConfig's own default (Llama's). Llama without
# num_key_value_heads has one K/V head per query head, as ModelConfig's None does.
FAMILY_DEFAULTS = {
    "llama": {},
    "mistral": {
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "sliding_window": 4096,
        "max_position_embeddings": 131072,
    },
    "qwen2": {
        "vocab_size": 151936,
        "intermediate_size": 22016,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
    },
    "qwen3": {
        "vocab_size": 151936,
        "intermediate_size": 22016,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "max_position_embeddings": 32768,
    },
    "gemma2": {
        **_GEMMA,
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "max_position_embeddings": 8192,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "gemma3_text": {
        **_GEMMA,
        "vocab_size": 262208,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "max_position_embeddings": 131072,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
    },
    "phi3": {
        "vocab_size": 32064,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "eos_token_id": 32000,
        "pad_token_id": 32000,
    },
    "mixtral": {
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "num_local_experts": 8,
    },
    "qwen3_moe": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 24,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "num_local_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
    },
}
# Keys only some families have: config_to_dict writes each for those families only.
FAMILY_KEYS = {
    "use_sliding_window": ("qwen2", "qwen3", "qwen3_moe"),
    "max_window_layers": ("qwen2", "qwen3", "qwen3_moe"),
    "layer_types": ("qwen2", "qwen3", "gemma2", "gemma3_text", "qwen3_moe"),
    "attention_bias": ("llama", "qwen3", "gemma2", "gemma3_text", "qwen3_moe"),
    "mlp_bias": ("llama",),
    "query_pre_attn_scalar": ("gemma2", "gemma3_text"),
    "attn_logit_softcapping": ("gemma2", "gemma3_text"),
    "final_logit_softcapping": ("gemma2", "gemma3_text"),
    "rope_local_base_freq": ("gemma3_text",),
    "sliding_window_pattern": ("gemma3_text",),
    "num_local_experts": ("mixtral", "qwen3_moe"),
    "num_experts_per_tok": ("mixtral", "qwen3_moe"),
    "router_aux_loss_coef": ("mixtral", "qwen3_moe"),
    "router_jitter_noise": ("mixtral",),
    "moe_intermediate_size": ("qwen3_moe",),
    "norm_topk_prob": ("qwen3_moe",),
    "decoder_sparse_step": ("qwen3_moe",),
    "mlp_only_layers": ("qwen3_moe",),
}
GEMMA_FAMILIES = ("gemma2", "gemma3_text")
# Keys that change the math: a config.json without one is named in a warning (it loads with
# the family's default, as in transformers, but a checkpoint without it is suspect: the
# SmolLM2 teacher without rope_theta loads and answers nonsense).
MATH_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
)
# Defaults that are not worth a warning: they do not change the math.
QUIET_DEFAULTS = ("max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


def load_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a HF model directory (from its config.json)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {path} is not a HF model directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} holds a {type(config).__name__}, not a JSON object")
    return config_from_dict(config, where=str(config_file))


def config_from_dict(config: dict, *, where: str = "config") -> ModelConfig:
    """A HF config.json's dict as a ModelConfig; `where` names it in errors and warnings.

    Accepts both spellings of RoPE (`_read_rope`) and Gemma's `hidden_activation`. Keys this
    model does not use (initializer_range, use_cache, ...) are ignored; a key it uses must have
    its type ("hidden_size": "576" is an error); a missing one takes the family's default
    (FAMILY_DEFAULTS), with a warning where it changes the math.
    """
    d = dict(config)
    family = d.get("model_type")
    if family is None:
        raise ValueError(
            f"{where} has no key model_type; use one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not isinstance(family, str):
        raise ValueError(
            f"{where}: config key model_type = {json.dumps(family)} must be a string; use one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if family == "gemma3":
        raise ValueError(
            f"{where}: model_type 'gemma3' is Gemma 3's image-text model; kd distills text "
            "models: extract its language model with scripts/gemma3_text.py, or use a text-only "
            "Gemma 3 (model_type gemma3_text: the 270M and 1B)"
        )
    if d.get("use_bidirectional_attention"):
        raise ValueError(
            f"{where}: config key use_bidirectional_attention=true (an embedding model) is not "
            "supported; kd's models are causal language models"
        )
    if family in GEMMA_FAMILIES and "hidden_activation" in d:
        d["hidden_act"] = d.pop("hidden_activation")  # Gemma's name for the gate activation
    if family == "qwen3_moe" and "num_experts" in d:  # its checkpoints' name (transformers 4)
        d.setdefault("num_local_experts", d.pop("num_experts"))
    _read_rope(d, where)
    if d.get("torch_dtype") is None and d.get("dtype") is not None:
        d["torch_dtype"] = d["dtype"]
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    d = {k: v for k, v in d.items() if k in known}
    _check_types(d, where)
    defaults = FAMILY_DEFAULTS.get(family, {})
    math_keys = [*MATH_KEYS, *(k for k in defaults if k not in MATH_KEYS)]
    for key in [k for k in math_keys if k not in d and k not in QUIET_DEFAULTS]:
        default = defaults.get(key, getattr(ModelConfig, key, None))
        if key == "num_key_value_heads" and key not in defaults:
            default = "num_attention_heads"
        name = "hidden_activation" if key == "hidden_act" and family in GEMMA_FAMILIES else key
        _warn(f"{where} has no {name}; using {family}'s default, {default}, as transformers does")
    return ModelConfig(**{**defaults, **d})


def _read_rope(d: dict, where: str) -> None:
    """RoPE settings in either spelling into rope_theta, rope_scaling and (Gemma 3)
    rope_local_base_freq, in place.

    Checkpoints on disk have `rope_theta` + `rope_scaling` (Gemma 3 also `rope_local_base_freq`,
    the base of its sliding layers). transformers 5 writes `rope_parameters` = {rope_type,
    rope_theta, <scaling keys>}, for Gemma 3 one per layer type: {"full_attention": {...},
    "sliding_attention": {...}}; when present it wins.
    """
    rope = d.pop("rope_parameters", None)
    if rope is not None and not isinstance(rope, dict):
        raise ValueError(f"{where}: config key rope_parameters must be an object, not {rope!r}")
    rope = dict(rope or {})
    if "full_attention" in rope or "sliding_attention" in rope:
        local = dict(rope.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise ValueError(
                f"{where}: config key rope_parameters.sliding_attention.rope_type="
                f"{local['rope_type']!r} is not supported; sliding layers use plain RoPE"
            )
        if "rope_theta" in local:
            d["rope_local_base_freq"] = local["rope_theta"]
        rope = dict(rope.get("full_attention") or {})
    partial = rope.pop("partial_rotary_factor", d.pop("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(
            f"{where}: config key partial_rotary_factor={partial} is not supported; kd rotates "
            "every channel of a head"
        )
    if not rope:
        return
    if "rope_theta" in rope:
        d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = (
        rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
    )


_warned: set[str] = set()


def _warn(message: str) -> None:
    """One line on stderr, once per process."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def _check_types(d: dict, where: str) -> None:
    """Every value has its field's type: ints are ints (not "576", not true), floats numbers."""
    hints = typing.get_type_hints(ModelConfig)
    for key, value in d.items():
        kinds = typing.get_args(hints[key]) or (hints[key],)
        kinds = {typing.get_origin(k) or k for k in kinds}
        if value is None and type(None) in kinds:
            continue
        ok = any(
            (kind is int and isinstance(value, int) and not isinstance(value, bool))
            or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (kind in (bool, str, dict, list) and isinstance(value, kind))
            for kind in kinds
        )
        if not ok:
            expected = " or ".join(sorted(k.__name__ for k in kinds if k is not type(None)))
            raise ValueError(
                f"{where}: config key {key} = {json.dumps(value)} has the wrong type (want "
                f"{expected}); fix it"
            )


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """A config.json dict that transformers (4.x and 5.x) loads: classic keys plus
    rope_parameters, and each family's own keys only (FAMILY_KEYS)."""
    family = config.model_type
    d = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
    for key, families in FAMILY_KEYS.items():
        if family not in families:
            d.pop(key, None)
    # Where the family's default is a window or a cap, null means "none" and must be explicit.
    if family in ("mistral", "phi3"):
        d["sliding_window"] = config.sliding_window
    if family == "gemma2":
        d["attn_logit_softcapping"] = config.attn_logit_softcapping
        d["final_logit_softcapping"] = config.final_logit_softcapping
    if family in GEMMA_FAMILIES:
        d["hidden_activation"] = d.pop("hidden_act")
    if family == "qwen3_moe":  # transformers 4 reads num_experts, 5 num_local_experts
        d["num_experts"] = config.num_local_experts
    if config.torch_dtype is not None:
        d["dtype"] = config.torch_dtype
    rope = {"rope_type": "default", "rope_theta": config.rope_theta, **(config.rope_scaling or {})}
    if family == "gemma3_text":
        local_theta = config.rope_local_base_freq or config.rope_theta
        local = {"rope_type": "default", "rope_theta": local_theta}
        d["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
    else:
        d["rope_parameters"] = rope
    d["architectures"] = [ARCHITECTURES[family]]
    return d
