"""The decoder of every supported family (Llama 2/3, SmolLM2, Mistral, Qwen2/3, Gemma 2/3,
Phi-3) in plain PyTorch: one Llama block with the features the config asks for.

One file, read top to bottom: the output `Head`, RMSNorm, attention with a static KV cache,
the gated MLP, the block and the `Transformer`. The architecture follows Touvron et al.,
"LLaMA" (arXiv 2302.13971): pre-norm RMSNorm (arXiv 1910.07467), rotary position embeddings
(kd/rope.py), SwiGLU (arXiv 2002.05202), grouped-query attention (arXiv 2305.13245). What the
other families add is listed in kd/model_config.py and switched on by `ModelConfig`'s
features: sliding windows per layer (Mistral, arXiv 2310.06825; Gemma's local layers), q/k/v
biases (Qwen2), q/k norms per head (Qwen3, Gemma 3), Gemma's (1 + w) norms around both
branches with GeGLU and embeddings scaled by sqrt(H) (arXiv 2403.08295), softcapped attention
scores and logits (Gemma 2, arXiv 2408.00118), fused projections (Phi-3). Norms, RoPE and
softmax run in fp32 and cast back, as in Meta's reference.

Module names mirror `transformers` (`model.layers.{i}.self_attn.q_proj`, `mlp.gate_proj`,
`input_layernorm`, `lm_head`; Phi-3's `qkv_proj` and `gate_up_proj`), so a checkpoint loads
key for key with no weight surgery (`kd/hf.py`); projections are `kd.linear.Linear` (CPU
decoding on every core).

Tied embeddings: when `tie_word_embeddings` is true there is no `lm_head` module at all
(`model.lm_head is None`) and the output weight is `model.embed_tokens.weight`; use the
`head_weight` property (or `head`, which adds the softcap). This way the state dict has
exactly the checkpoint's keys and the tie cannot come undone (`to_empty`,
`load_state_dict(assign=True)` and FSDP all replace parameters module by module, which
silently splits a weight shared by two modules).

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
  Sliding-window layers keep all S slots too and mask those out of their window.
  Cache dtype: see `setup_cache`. `model.clear_cache()` frees the cache; call `setup_cache`
  again to reuse it.
* `output_fn(hidden, head)`: instead of logits, return whatever the function returns,
  given the final-normed hidden state (B, T, H) and the model's `Head` (`head(hidden)` are
  the logits). The training loop computes a chunked loss there, inside the forward, so FSDP2
  still has the root's parameters gathered and the (B, T, V) logits never exist.

Meta-device build: `with torch.device("meta"): m = Transformer(cfg)`, then `m.to_empty(
device=d)` and either `m.init_weights(seed=0)` or `m.load_state_dict(sd, assign=True)`.
The RoPE frequencies are not stored at all: they are recomputed from the config on each
forward (head_dim/2 numbers), so there is no buffer to forget after `to_empty`.

Run the parity tests: `.venv/bin/python -m pytest -q tests/test_model.py tests/test_families.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.kv_cache import KVCache
from kd.linear import Linear, linear
from kd.model_config import ModelConfig
from kd.moe import MixtralExpert, SparseMoE
from kd.rope import apply_rope, rope_cos_sin, rope_inv_freq

# ---------------------------------------------------------------------------- the output head


def softcap(x: Tensor, cap: float) -> Tensor:
    """cap * tanh(x / cap) in fp32 (float64 stays float64), cast back: squashes x smoothly into
    (-cap, cap) (Gemma 2)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    return (cap * torch.tanh(x.to(wide) / cap)).to(x.dtype)


@dataclass(frozen=True)
class Head:
    """The output head: logits z = h W^T, then c tanh(z / c) where the family caps them (Gemma 2's
    final_logit_softcapping, c = 30). The full forward, the chunked losses, sampling and the
    teacher cache all apply this one head, so the logits a loss sees are the model's logits."""

    weight: Tensor  # (V, H)
    softcap: float | None = None

    def __call__(self, hidden: Tensor) -> Tensor:
        """Logits (..., V) of hidden states (..., H)."""
        return self.cap(linear(hidden, self.weight))

    def cap(self, logits: Tensor) -> Tensor:
        return logits if self.softcap is None else softcap(logits, self.softcap)

    def rows(self, n: int) -> Head:
        """The head of the first n tokens (a vocabulary without its padding rows)."""
        return Head(self.weight[:n], self.softcap)


# ---------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), with the statistics in fp32 (arXiv 1910.07467).

    unit_offset (Gemma): y = (1 + w) * x / sqrt(...), weight stored as w (initialized to 0) and
    the product taken in fp32 before the cast back, as transformers' GemmaRMSNorm does."""

    def __init__(self, dim: int, eps: float, *, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)  # cast back before the weight, as transformers does


def rms_norm(config: ModelConfig, dim: int | None = None) -> RMSNorm:
    """The family's RMSNorm over `dim` channels (default: the hidden size)."""
    unit_offset = "gemma_norms" in config.features
    return RMSNorm(dim or config.hidden_size, config.rms_norm_eps, unit_offset=unit_offset)


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float, cap: float | None
) -> Tensor:
    """softmax(s + mask) v with scores s = scale * q k^T, or cap * tanh(s / cap) when capped.

    q (B, n_heads, T, d), k and v (B, n_kv_heads, S, d); each K/V head serves n_heads /
    n_kv_heads consecutive query heads. mask (B or 1, 1, T, S) bool, True = attend; None =
    causal. The softmax accumulates in fp32 either way.
    """
    gqa = k.shape[1] != q.shape[1]
    if cap is None:  # SDPA's fused kernels (flash on GPU); enable_gqa: no copy of K and V
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa
        )
    # SDPA cannot cap the scores: Gemma 2's attention written out, as transformers' eager one.
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, n_heads, S, d)
    wide = torch.promote_types(q.dtype, torch.float32)  # fp32, or float64 for float64 models
    scores = softcap((q @ k.transpose(-2, -1)).to(wide) * scale, cap)  # (B, n_heads, T, S)
    if mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads, RoPE on q and k, and an optional KV cache."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.scale, self.cap = config.attention_scale, config.attn_logit_softcapping
        h, q_width, kv_width = (
            config.hidden_size,
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        )
        self.fused = "fused_projections" in config.features
        if self.fused:  # Phi-3: one (q | k | v) projection
            self.qkv_proj = Linear(h, q_width + 2 * kv_width, bias=False)
        else:
            self.q_proj = Linear(h, q_width, bias=config.qkv_bias)
            self.k_proj = Linear(h, kv_width, bias=config.qkv_bias)
            self.v_proj = Linear(h, kv_width, bias=config.qkv_bias)
        self.o_proj = Linear(q_width, h, bias=config.o_bias)
        if "qk_norm" in config.features:  # RMSNorm over each head's channels, before RoPE
            self.q_norm = rms_norm(config, self.head_dim)
            self.k_norm = rms_norm(config, self.head_dim)
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None
    ) -> Tensor:
        B, T, _ = x.shape
        if self.fused:
            kv_width = self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv_width, kv_width], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, T, head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            # With a cache the mask is never None and spans exactly the L slots this call reads.
            k, v = self.kv_cache.update(input_pos, k, v, mask.shape[-1])  # (B, n_kv, L, head_dim)
            q = q.to(k.dtype)
        y = attention(q, k, v, mask, scale=self.scale, cap=self.cap).to(x.dtype)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, n_heads * hd)
        return self.o_proj(y)  # (B, T, H)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); act = SiLU (SwiGLU) or tanh-GELU (GeGLU), arXiv
    2002.05202. Phi-3 stores gate and up as one (gate | up) projection."""

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        h, bias = config.hidden_size, config.mlp_bias
        i = intermediate_size or config.intermediate_size
        self.fused = "fused_projections" in config.features
        if self.fused:
            self.gate_up_proj = Linear(h, 2 * i, bias=False)
        else:
            self.gate_proj = Linear(h, i, bias=bias)
            self.up_proj = Linear(h, i, bias=bias)
        self.down_proj = Linear(i, h, bias=bias)
        self.gelu = config.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up)


def feed_forward(config: ModelConfig, layer: int) -> nn.Module:
    """Layer `layer`'s feed-forward: the gated MLP, or a sparse MoE of such experts."""
    if not config.sparse(layer):
        return MLP(config)
    if config.model_type == "mixtral":
        make_expert = partial(MixtralExpert, config.hidden_size, config.intermediate_size)
    else:
        make_expert = partial(MLP, config, config.moe_intermediate_size)
    return SparseMoE(
        config.hidden_size,
        config.num_local_experts,
        config.num_experts_per_tok,
        renormalize=config.model_type == "mixtral" or config.norm_topk_prob,
        make_expert=make_expert,
    )


class Block(nn.Module):
    """Pre-norm residual block: x += attn(norm(x)); x += mlp(norm(x)).

    With Gemma norms each branch's output is normed too before it joins the residual stream:
    x += norm(attn(norm(x))); x += norm(mlp(norm(x))). (Llama's post_attention_layernorm is
    the MLP's input norm; Gemma's is the norm on the attention output.) The feed-forward is
    `mlp`, except Mixtral's sparse one, which its checkpoints name `block_sparse_moe`."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = rms_norm(config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = rms_norm(config)
        self.sandwich = "gemma_norms" in config.features
        if self.sandwich:
            self.pre_feedforward_layernorm = rms_norm(config)
            self.post_feedforward_layernorm = rms_norm(config)
        self.ffn_name = "block_sparse_moe" if config.model_type == "mixtral" else "mlp"
        self.add_module(self.ffn_name, feed_forward(config, layer))

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None
    ) -> Tensor:
        ffn = getattr(self, self.ffn_name)
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            return x + self.post_feedforward_layernorm(ffn(self.pre_feedforward_layernorm(x)))
        x = x + attn
        return x + ffn(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The HF `model.` prefix: embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = rms_norm(config)


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
        # (theta, scaling) of each kind of layer; only Gemma 3's kinds differ (kd/model_config.py)
        self.rope_by_type = {t: config.rope(i) for i, t in enumerate(config.layer_types)}
        # Gemma: the embeddings enter the residual stream times sqrt(H), in their own dtype
        self.embed_scale = config.hidden_size**0.5 if "gemma_norms" in config.features else None

    @property
    def head_weight(self) -> Tensor:
        """The (V, H) output projection: lm_head.weight, or the embeddings when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def head(self) -> Head:
        """The output head: `head(hidden)` are the logits, softcapped where the family caps them."""
        return Head(self.head_weight, self.config.final_logit_softcapping)

    def router_logits(self) -> list[Tensor]:
        """The last training forward's router logits of each MoE layer, (B T, E) each; [] for
        a dense model or in eval mode. For `kd.moe.load_balancing_loss`."""
        moes = [m for m in self.modules() if isinstance(m, SparseMoE)]
        return [m.router_logits for m in moes if m.router_logits is not None]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def init_weights(self, *, std: float = 0.02, seed: int | None = None) -> None:
        """transformers' init: Linear and Embedding ~ N(0, std), biases 0, norm weights 1 (0 for
        Gemma's (1 + w) norms, so that every norm starts as the identity scale).

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
                module.weight.fill_(0.0 if module.unit_offset else 1.0)

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
        output_fn: Callable[[Tensor, Head], Any] | None = None,
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
        head_dim = self.config.head_dim
        rope = {  # layer type -> (cos, sin), each (B, 1, T, head_dim)
            kind: rope_cos_sin(rope_inv_freq(head_dim, theta, scaling, device), q_pos.expand(B, T))
            for kind, (theta, scaling) in self.rope_by_type.items()
        }

        masks = self._masks(q_slots, q_pos, key_pos, attention_mask, cached=cache is not None)
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        for layer, kind, window in zip(self.model.layers, self.config.layer_types, self.windows):
            x = layer(x, *rope[kind], masks[window], input_pos)
        hidden = self.model.norm(x)
        if output_fn is not None:
            return output_fn(hidden, self.head)
        return self.head(hidden)  # (B, T, V)

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
