"""The Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) in plain PyTorch.

One file, read top to bottom: `ModelConfig` (fields mirror the keys of a Hugging Face
`config.json`), RoPE, RMSNorm, attention with a static KV cache, the SwiGLU MLP, the block
and the `Transformer`. Module names mirror `transformers` (`model.layers.{i}.self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, `lm_head`), so a checkpoint loads key for key with no
weight surgery (`kd/hf.py`); projections are `kd.linear.Linear` (CPU decoding on every core).
The architecture follows Touvron et al., "LLaMA" (arXiv 2302.13971): pre-norm RMSNorm (arXiv
1910.07467), rotary position embeddings in the rotate-half layout (RoFormer, arXiv 2104.09864),
SwiGLU (arXiv 2002.05202), grouped-query attention (arXiv 2305.13245); Mistral adds a sliding
window (arXiv 2310.06825), Qwen2 q/k/v biases. Norms, RoPE and softmax run in fp32 and cast
back, as in Meta's reference.

Tied embeddings: when `tie_word_embeddings` is true there is no `lm_head` module at all
(`model.lm_head is None`) and the output weight is `model.embed_tokens.weight`; use the
`head_weight` property. This way the state dict has exactly the checkpoint's keys and the tie
cannot come undone (`to_empty`, `load_state_dict(assign=True)` and FSDP all replace
parameters module by module, which silently splits a weight shared by two modules).

Calling conventions of `Transformer.forward(input_ids, *, input_pos, attention_mask, output_fn)`:

* Training, no cache: `model(ids)` with `ids` (B, T); positions 0..T-1, causal attention.
  Right padding needs no mask (its labels are -100 and it sits after every real token).
  A (B, T) bool `attention_mask` (True = real token) allows left padding: pad keys are
  masked and each row's positions count only its real tokens.
* Decoding with the static cache (gpt-fast style): `model.setup_cache(B, S)` allocates
  K/V of shape (B, n_kv_heads, S, head_dim) per layer. Each call passes `input_pos` (T,),
  the cache slots this call writes (prefill: `arange(P)`; decode: `tensor([P + i])`); a
  query attends to slots <= its own slot. Batched prompts of different lengths are LEFT
  padded to a common length P and `attention_mask` is (B, L) bool, True on the slots that
  hold real tokens (the prompt's real tokens, then every generated slot), False on pad
  slots. The RoPE position of slot s in row b is the number of real slots before it,
  `cumsum(attention_mask[b])[s] - 1`, so a left-padded row sees exactly the positions and
  keys it would see alone, and its logits equal the unpadded prompt's (up to float
  rounding). Logits at pad slots are garbage.
  The mask's length L (<= S) is how many cache slots the call reads: attention runs over
  slots 0..L-1 only, so every slot in `input_pos` must be < L. The full-length mask
  (L = S) always works; a generate loop that knows the used length on the host passes
  `mask[:, :P + i + 1]` at decode step i (prefill: `mask[:, :P]`) and attention costs
  O(used slots) instead of O(S), with no host-device sync. Without a mask every call
  reads all S slots (unwritten ones are in the future, so causality hides them).
  Cache dtype: see `setup_cache`. `model.clear_cache()` frees the cache; call `setup_cache`
  again to reuse it.
* `output_fn(hidden, head_weight)`: instead of logits, return whatever the function returns,
  given the final-normed hidden state (B, T, H) and the (V, H) output weight. The training
  loop computes a chunked loss there, inside the forward, so FSDP2 still has the root's
  parameters gathered and the (B, T, V) logits never exist.

Meta-device build: `with torch.device("meta"): m = Transformer(cfg)`, then `m.to_empty(
device=d)` and either `m.init_weights(seed=0)` or `m.load_state_dict(sd, assign=True)`.
The RoPE frequencies are not stored at all: they are recomputed from the config on each
forward (head_dim/2 numbers), so there is no buffer to forget after `to_empty`.

Run the parity tests: `.venv/bin/python -m pytest -q tests/test_model.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.linear import Linear, linear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


@dataclass
class ModelConfig:
    """Architecture hyperparameters; every field is the HF `config.json` key of the same name."""

    model_type: str = "llama"  # "llama" (also SmolLM2), "mistral" or "qwen2"
    vocab_size: int = 32000  # number of token embeddings / output logits
    hidden_size: int = 4096  # residual stream width H
    intermediate_size: int = 11008  # SwiGLU inner width
    num_hidden_layers: int = 32  # transformer blocks
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: int | None = None  # K/V heads for GQA; None -> num_attention_heads
    head_dim: int | None = None  # per-head width; None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 2048  # context length the model was trained for
    rms_norm_eps: float = 1e-6  # epsilon inside RMSNorm's square root
    rope_theta: float = 10000.0  # RoPE base; frequencies theta^(-2i/d)
    rope_scaling: dict | None = None  # None (default RoPE) or {"rope_type": "llama3", ...}
    attention_bias: bool = False  # llama only: bias on q, k, v and o projections
    mlp_bias: bool = False  # llama only: bias on gate, up and down projections
    tie_word_embeddings: bool = False  # output weight = input embedding weight
    sliding_window: int | None = None  # mistral/qwen2: attend to the last N positions only
    use_sliding_window: bool = False  # qwen2 only: sliding_window is ignored unless true
    max_window_layers: int = 28  # qwen2 only: layers >= this use the window (if no layer_types)
    # qwen2 only: "full_attention" or "sliding_attention", once per layer
    layer_types: list[str] | None = None
    hidden_act: str = "silu"  # only SiLU (SwiGLU) is supported
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
        if self.hidden_act != "silu":
            raise ValueError(
                f"config key hidden_act={self.hidden_act!r} is not supported; only 'silu' is"
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
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            legacy_type = scaling.pop("type", None)  # the pre-2024 spelling of rope_type
            rope_type = scaling.pop("rope_type", None) or legacy_type or "default"
            if rope_type == "default":
                self.rope_scaling = None
            elif rope_type == "llama3":
                missing = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
                if missing:
                    raise ValueError(
                        f"config key rope_scaling lacks {', '.join(missing)} for rope_type 'llama3'"
                    )
                self.rope_scaling = {"rope_type": "llama3", **scaling}
            else:
                raise ValueError(
                    f"config key rope_scaling.rope_type={rope_type!r} is not supported; "
                    "use 'default' or 'llama3'"
                )
        if self.layer_types is not None:
            bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if bad or len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"config key layer_types={self.layer_types} must list 'full_attention' or "
                    f"'sliding_attention' once per layer ({self.num_hidden_layers})"
                )

    @property
    def qkv_bias(self) -> bool:
        # Qwen2 always has q/k/v biases and never an o bias (transformers' Qwen2Attention).
        return self.model_type == "qwen2" or (self.model_type == "llama" and self.attention_bias)

    @property
    def o_bias(self) -> bool:
        return self.model_type == "llama" and self.attention_bias

    def window(self, layer: int) -> int | None:
        """Sliding-window length of `layer`, or None for full causal attention (as transformers)."""
        if self.model_type == "mistral":
            return self.sliding_window
        if (
            self.model_type == "qwen2"
            and self.use_sliding_window
            and self.sliding_window is not None
        ):
            types = self.layer_types or [
                "sliding_attention" if i >= self.max_window_layers else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
            return self.sliding_window if types[layer] == "sliding_attention" else None
        return None


# ---------------------------------------------------------------------------- RoPE


def rope_inv_freq(config: ModelConfig, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies theta^(-2i/d), i = 0..d/2-1, in fp32, with Llama 3.1 scaling if
    configured.

    Llama 3.1 (arXiv 2407.21783; transformers `_compute_llama3_parameters`): wavelengths
    2*pi/f longer than L/low_freq_factor (L = original context) are divided by `factor`,
    shorter than L/high_freq_factor are kept, and those in between interpolate smoothly
    with s = (L/wavelen - low) / (high - low): f' = (1 - s) f / factor + s f.
    """
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (
        torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d
    )
    if config.rope_scaling is None:
        return inv_freq
    s = config.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
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


# ---------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), with the statistics in fp32 (arXiv 1910.07467)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)  # cast back before the weight, as transformers does


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


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads, RoPE on q and k, and an optional KV cache."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        h = config.hidden_size
        self.q_proj = Linear(h, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = Linear(h, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = Linear(h, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=config.o_bias)
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None
    ) -> Tensor:
        B, T, _ = x.shape
        # (B, T, heads * head_dim) -> (B, heads, T, head_dim); K and V have n_kv_heads heads.
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            # With a cache the mask is never None and spans exactly the L slots this call reads.
            k, v = self.kv_cache.update(input_pos, k, v, mask.shape[-1])  # (B, n_kv, L, head_dim)
            q = q.to(k.dtype)
        # softmax(q k^T / sqrt(head_dim)) v; SDPA's softmax accumulates in fp32. Each K/V head
        # serves n_heads / n_kv_heads query heads (enable_gqa), with no copy of K and V.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        ).to(x.dtype)  # (B, n_heads, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)  # (B, T, H)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer, arXiv 2002.05202)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, i, bias=bias)
        self.up_proj = Linear(h, i, bias=bias)
        self.down_proj = Linear(i, h, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x += attn(norm(x)); x += mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The HF `model.` prefix: embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ---------------------------------------------------------------------------- the model


class Transformer(nn.Module):
    """Decoder-only LM; see the module docstring for the forward and cache conventions."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.windows = [config.window(i) for i in range(config.num_hidden_layers)]

    @property
    def head_weight(self) -> Tensor:
        """The (V, H) output projection: lm_head.weight, or the embeddings when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def init_weights(self, *, std: float = 0.02, seed: int | None = None) -> None:
        """transformers' init: Linear and Embedding ~ N(0, std), biases 0, norm weights 1.

        torch's default N(0, 1) embedding makes a fresh tied model start at loss ~360
        instead of ~ln(V). With `seed`, the draw is reproducible and independent of the
        global RNG (a generator on the parameters' device).
        """
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.model.embed_tokens.weight.device).manual_seed(seed)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def setup_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate a zeroed static KV cache of max_seq_len slots per row in every layer.

        device and dtype default to the embedding weight's, except bf16/fp16 weights on a CPU
        get an fp32 cache: PyTorch's CPU SDPA is ~9x slower in bf16 at decode shapes (1 query,
        ~300 keys, batch 8: 3.6 vs 0.39 ms), and attention runs in the wider of the cache's and
        the activations' dtypes. Pass the compute dtype (e.g. bf16) for fp32 master weights."""
        w = self.model.embed_tokens.weight
        device = torch.device(device or w.device)
        if dtype is None:
            dtype = (
                torch.float32
                if device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16)
                else w.dtype
            )
        c = self.config
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(
                batch_size,
                c.num_key_value_heads,
                max_seq_len,
                c.head_dim,
                dtype=dtype,
                device=device,
            )

    @torch.no_grad()
    def decode_layout(self) -> Transformer:
        """fp32 CPU inference: store the matrices wider than tall (gate, up, head) transposed in
        memory, still (out, in) tensors (why: kd/linear.py). Other dtypes and devices are left as
        they are. Not for training: FSDP and AdamW expect contiguous parameters. Returns self."""
        wide = [
            m.weight
            for m in self.modules()
            if isinstance(m, nn.Linear) and m.out_features > m.in_features
        ]
        for w in {id(w): w for w in [*wide, self.head_weight]}.values():  # the tied head once
            if w.device.type == "cpu" and w.dtype == torch.float32:
                w.data = w.data.t().contiguous().t()
        return self

    def clear_cache(self) -> None:
        """Drop the KV cache (frees its memory); forward is cache-free again."""
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def forward(
        self,
        input_ids: Tensor,
        *,
        input_pos: Tensor | None = None,
        attention_mask: Tensor | None = None,
        output_fn: Callable[[Tensor, Tensor], Any] | None = None,
    ) -> Any:
        B, T = input_ids.shape
        device = input_ids.device
        cache = self.model.layers[0].self_attn.kv_cache
        if cache is None:
            if input_pos is not None:
                raise ValueError(
                    "input_pos is only meaningful with a KV cache: call setup_cache first"
                )
            S, q_slots = T, torch.arange(T, device=device)
        else:
            if input_pos is None:
                raise ValueError(
                    "with a KV cache, pass input_pos (T,): the cache slots this call writes"
                )
            if cache.k.shape[0] != B:
                raise ValueError(
                    f"batch size {B} differs from the cache's {cache.k.shape[0]}: "
                    "call setup_cache again"
                )
            if tuple(input_pos.shape) != (T,):
                raise ValueError(
                    f"input_pos has shape {tuple(input_pos.shape)}, expected ({T},): "
                    "one slot per token"
                )
            # S: the slots this call reads, all of them or the mask's length (see the docstring).
            S, q_slots = cache.k.shape[2], input_pos
            if attention_mask is not None and attention_mask.shape[-1] <= S:
                S = attention_mask.shape[-1]
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, S):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)} "
                    "(batch, sequence length without a cache / at most the cache length with one)"
                )
            # A 0/1 integer mask (transformers' habit) works too.
            attention_mask = attention_mask.bool()

        # Positions: a slot's position counts the real slots before it, so left padding is
        # skipped; without a mask the position is the slot.
        if attention_mask is None:
            key_pos = torch.arange(S, device=device)[None]  # (1, S)
        else:
            key_pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
        q_pos = key_pos[:, q_slots]  # (B or 1, T)
        cos, sin = rope_cos_sin(rope_inv_freq(self.config, device), q_pos.expand(B, T))

        masks = self._masks(q_slots, q_pos, key_pos, attention_mask, cached=cache is not None)
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        for layer, window in zip(self.model.layers, self.windows):
            x = layer(x, cos, sin, masks[window], input_pos)
        hidden = self.model.norm(x)
        if output_fn is not None:
            return output_fn(hidden, self.head_weight)
        return linear(hidden, self.head_weight)  # (B, T, V)

    def _masks(
        self,
        q_slots: Tensor,
        q_pos: Tensor,
        key_pos: Tensor,
        attention_mask: Tensor | None,
        *,
        cached: bool,
    ) -> dict[int | None, Tensor | None]:
        """Boolean attention masks (B or 1, 1, T, S), True = attend, keyed by window length.

        Causal in slots (key slot <= query slot); pad keys off; a window w keeps keys with
        position > query position - w (transformers' sliding_window_overlay). None means
        plain causal attention, which SDPA does with is_causal (flash kernels on GPU).
        """
        S = key_pos.shape[-1]
        masks: dict[int | None, Tensor | None] = {}
        for window in set(self.windows):
            needs_window = window is not None and S > window
            if not cached and attention_mask is None and not needs_window:
                masks[window] = None
                continue
            key_slots = torch.arange(S, device=q_slots.device)
            mask = (key_slots[None, :] <= q_slots[:, None])[None]  # (1, T, S)
            if attention_mask is not None:
                # A query always sees its own slot, so a pad query's row is never empty
                # (an all-masked row gives NaN, which would leak through 0 * NaN).
                own_slot = key_slots[None, :] == q_slots[:, None]  # (T, S)
                mask = mask & (attention_mask[:, None, :] | own_slot)  # (B, T, S)
            if needs_window:
                mask = mask & (key_pos[:, None, :] > q_pos[:, :, None] - window)  # (B or 1, T, S)
            masks[window] = mask[:, None]  # (B or 1, 1, T, S): one mask for all heads
        return masks
