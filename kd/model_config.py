"""A model's architecture: `ModelConfig`, whose fields are the keys of a HF `config.json`.

Every supported family is the Llama block (kd/model.py) plus a few features, and the model
code asks the config for a feature, never for a family. What each family adds, after
transformers' `modeling_<family>.py`:

| family        | adds to the Llama block                                                   |
| ------------- | ------------------------------------------------------------------------- |
| llama         | nothing (also SmolLM2); optional q/k/v/o and MLP biases                    |
| mistral       | a sliding window on every layer                                            |
| qwen2         | q/k/v biases; a sliding window on layers >= max_window_layers, if enabled  |
| qwen3         | q/k RMSNorm per head; the same optional window                             |
| gemma2        | Gemma norms (below), GeGLU, attention- and final-logit softcapping,       |
|               | local (sliding) and global layers alternating                              |
| gemma3_text   | Gemma norms, GeGLU, q/k norms, 5 local layers per global one, a RoPE base |
|               | per kind of layer                                                         |
| phi3          | fused qkv_proj and gate_up_proj; a sliding window on every layer           |
| mixtral       | sparse MoE feed-forward (kd/moe.py) on every layer; an optional window     |
| qwen3_moe     | Qwen3's block with a sparse MoE feed-forward where decoder_sparse_step and |
|               | mlp_only_layers say                                                        |

Gemma norms: RMSNorm scaled by (1 + w) instead of w, a norm after attention and after the MLP
as well as before each ("sandwich"), and embeddings multiplied by sqrt(hidden_size).

A field left at its default takes Llama's value; transformers' other family defaults, for
keys a config.json leaves out, are applied by kd/hf_config.py (FAMILY_DEFAULTS).

Tests: `.venv/bin/python -m pytest -q tests/test_model.py tests/test_families.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kd.rope import ROPE_TYPES

# What each family adds to the Llama block (see the table above).
FAMILY_FEATURES: dict[str, frozenset[str]] = {
    "llama": frozenset(),
    "mistral": frozenset({"window_on_every_layer"}),
    "qwen2": frozenset({"qkv_bias"}),
    "qwen3": frozenset({"qk_norm"}),
    "gemma2": frozenset({"gemma_norms"}),
    "gemma3_text": frozenset({"gemma_norms", "qk_norm"}),
    "phi3": frozenset({"fused_projections", "window_on_every_layer"}),
    "mixtral": frozenset({"moe", "window_on_every_layer"}),
    "qwen3_moe": frozenset({"moe", "qk_norm"}),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILY_FEATURES)
# Families whose attention_bias key puts a bias on all four of q, k, v and o.
ATTENTION_BIAS_FAMILIES = ("llama", "qwen3", "gemma2", "gemma3_text", "qwen3_moe")
# Families whose sliding window is used only with use_sliding_window = true.
OPTIONAL_WINDOW_FAMILIES = ("qwen2", "qwen3", "qwen3_moe")
LAYER_TYPES = ("full_attention", "sliding_attention")
# hidden_act values: "silu" (SwiGLU) and "gelu_pytorch_tanh" (GeGLU, GELU's tanh approximation).
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclass
class ModelConfig:
    """Architecture hyperparameters; every field is the HF `config.json` key of the same name."""

    model_type: str = "llama"  # one of SUPPORTED_MODEL_TYPES ("llama" also covers SmolLM2)
    vocab_size: int = 32000  # number of token embeddings / output logits
    hidden_size: int = 4096  # residual stream width H
    intermediate_size: int = 11008  # gated MLP inner width
    num_hidden_layers: int = 32  # transformer blocks
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: int | None = None  # K/V heads for GQA; None -> num_attention_heads
    head_dim: int | None = None  # per-head width; None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 2048  # context length the model was trained for
    rms_norm_eps: float = 1e-6  # epsilon inside RMSNorm's square root
    rope_theta: float = 10000.0  # RoPE base; frequencies theta^(-2i/d)
    rope_scaling: dict | None = None  # None or {"rope_type": "linear" | "llama3", <its keys>}
    rope_local_base_freq: float | None = None  # gemma3_text: RoPE base of sliding layers
    attention_bias: bool = False  # ATTENTION_BIAS_FAMILIES: bias on q, k, v, o (others: unused)
    mlp_bias: bool = False  # llama only: bias on gate, up and down projections
    tie_word_embeddings: bool = False  # output weight = input embedding weight
    sliding_window: int | None = None  # layers of type "sliding_attention" see N positions
    use_sliding_window: bool = False  # qwen2/qwen3: sliding_window is ignored unless true
    max_window_layers: int = 28  # qwen2/qwen3: layers >= this slide (if no layer_types)
    sliding_window_pattern: int = 6  # gemma3_text: every Nth layer is global (if no layer_types)
    # "full_attention" or "sliding_attention" once per layer; None -> the family's pattern
    layer_types: list[str] | None = None
    hidden_act: str = "silu"  # gate activation: ACTIVATIONS (Gemma's key: hidden_activation)
    query_pre_attn_scalar: float | None = None  # gemma: scores scaled by this ** -0.5
    attn_logit_softcapping: float | None = None  # gemma2: scores -> c tanh(scores / c)
    final_logit_softcapping: float | None = None  # gemma2: logits -> c tanh(logits / c)
    num_local_experts: int = 0  # MoE: experts per MoE layer (Qwen3-MoE's key: num_experts)
    num_experts_per_tok: int = 2  # MoE: k, the experts each token is routed to
    moe_intermediate_size: int | None = None  # qwen3_moe: expert width (mixtral: intermediate)
    norm_topk_prob: bool = False  # qwen3_moe: renormalize the k weights (mixtral always does)
    decoder_sparse_step: int = 1  # qwen3_moe: layer i is MoE if (i + 1) % step == 0 ...
    mlp_only_layers: list[int] | None = None  # qwen3_moe: ... and i is not listed here
    router_aux_loss_coef: float = 0.001  # MoE: the load-balancing loss's weight in training
    router_jitter_noise: float = 0.0  # mixtral: multiplicative router noise; only 0 supported
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2  # an id or a list of ids that end generation
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, kept for the round trip

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config key model_type={self.model_type!r} is not supported; "
                f"use one of {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"config key hidden_act={self.hidden_act!r} is not supported; use one of "
                f"{', '.join(ACTIVATIONS)}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config key num_attention_heads={self.num_attention_heads} must be a multiple "
                f"of num_key_value_heads={self.num_key_value_heads}"
            )
        if self.mlp_bias and self.model_type != "llama":
            raise ValueError(
                f"config key mlp_bias=true is only defined for llama, not {self.model_type}"
            )
        for key in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"config key {key}={getattr(self, key)} must be > 0 (or null)")
        if "moe" in self.features:
            self._check_moe()
        self.rope_scaling = _rope_scaling(self.rope_scaling)
        if self.layer_types is None:
            self.layer_types = [self._default_layer_type(i) for i in range(self.num_hidden_layers)]
        bad = set(self.layer_types) - set(LAYER_TYPES)
        if bad or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"config key layer_types={self.layer_types} must list 'full_attention' or "
                f"'sliding_attention' once per layer ({self.num_hidden_layers})"
            )

    def _check_moe(self) -> None:
        if self.num_local_experts < 1:
            raise ValueError(
                f"config key num_local_experts (num_experts)={self.num_local_experts}: a "
                f"{self.model_type} model needs at least one expert"
            )
        if self.router_jitter_noise != 0.0:
            raise ValueError(
                f"config key router_jitter_noise={self.router_jitter_noise} is not supported; "
                "set it to 0.0 (kd routes deterministically)"
            )
        bad = [i for i in self.mlp_only_layers or [] if not 0 <= i < self.num_hidden_layers]
        if bad or self.decoder_sparse_step < 1:
            raise ValueError(
                f"config keys mlp_only_layers={self.mlp_only_layers} and decoder_sparse_step="
                f"{self.decoder_sparse_step}: want layer indices in 0..{self.num_hidden_layers - 1}"
                " and a step >= 1"
            )

    def sparse(self, layer: int) -> bool:
        """Whether `layer`'s feed-forward is a sparse MoE (transformers' rule) or a dense MLP."""
        if "moe" not in self.features:
            return False
        if self.model_type == "mixtral":
            return True
        return (
            layer not in (self.mlp_only_layers or [])
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def _default_layer_type(self, layer: int) -> str:
        """A layer's attention type when config.json lists none, as transformers derives it."""
        if self.model_type == "gemma2":  # local, global, local, ...
            sliding = (layer + 1) % 2 != 0
        elif self.model_type == "gemma3_text":  # every sliding_window_pattern-th layer is global
            sliding = (layer + 1) % self.sliding_window_pattern != 0
        elif self.model_type in OPTIONAL_WINDOW_FAMILIES:
            sliding = (
                self.use_sliding_window
                and self.sliding_window is not None
                and layer >= self.max_window_layers
            )
        else:
            sliding = "window_on_every_layer" in FAMILY_FEATURES[self.model_type]
        return "sliding_attention" if sliding else "full_attention"

    @property
    def features(self) -> frozenset[str]:
        return FAMILY_FEATURES[self.model_type]

    @property
    def qkv_bias(self) -> bool:
        # Qwen2 always has q/k/v biases and never an o bias (transformers' Qwen2Attention).
        return "qkv_bias" in self.features or self.o_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type in ATTENTION_BIAS_FAMILIES and self.attention_bias

    @property
    def attention_scale(self) -> float:
        """The factor on q.k: 1/sqrt(query_pre_attn_scalar) for Gemma, 1/sqrt(head_dim) else."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def window(self, layer: int) -> int | None:
        """Sliding-window length of `layer`, or None for full causal attention (as transformers)."""
        if self.layer_types[layer] != "sliding_attention":
            return None
        if self.model_type in OPTIONAL_WINDOW_FAMILIES and not self.use_sliding_window:
            return None
        return self.sliding_window

    def rope(self, layer: int) -> tuple[float, dict | None]:
        """(theta, scaling) of `layer`'s RoPE: Gemma 3's sliding layers have a base of their own
        and no scaling; every other layer uses rope_theta and rope_scaling."""
        if self.rope_local_base_freq is not None and self.layer_types[layer] == "sliding_attention":
            return self.rope_local_base_freq, None
        return self.rope_theta, self.rope_scaling


def _rope_scaling(scaling: dict | None) -> dict | None:
    """rope_scaling as {"rope_type": ..., <its keys>}, or None for plain RoPE."""
    if scaling is None:
        return None
    scaling = dict(scaling)
    legacy_type = scaling.pop("type", None)  # the pre-2024 spelling of rope_type
    rope_type = scaling.pop("rope_type", None) or legacy_type or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"config key rope_scaling.rope_type={rope_type!r} is not supported; use one of "
            f"{', '.join(ROPE_TYPES)}"
        )
    if rope_type == "default":
        return None
    missing = [k for k in ROPE_TYPES[rope_type] if k not in scaling]
    if missing:
        raise ValueError(
            f"config key rope_scaling lacks {', '.join(missing)} for rope_type {rope_type!r}"
        )
    return {"rope_type": rope_type, **scaling}
