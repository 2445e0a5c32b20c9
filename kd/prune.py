"""Structured pruning by activation importance: a smaller student cut from the teacher's weights.

Minitron (Muralidharan et al., arXiv 2407.14679) ranks every prunable unit by how strongly it
is activated on a few hundred calibration sequences, keeps the top ones and then distills into
what is left; ShortGPT (Men et al., arXiv 2403.03853) ranks whole blocks by how much they change
the residual stream. `importance` runs the teacher once over the calibration batches (no grad,
forward hooks only) and collects, summed over real tokens and divided by their count:

| axis              | score of one unit                                    | shape       |
| ----------------- | ---------------------------------------------------- | ----------- |
| depth (blocks)    | Block Influence 1 - mean_t cos(x_in, x_out)          | (L,)        |
| MLP channels      | mean_t |a_c|, a = act(gate(x)) * up(x) (down's input) | (L, ffn)    |
| attention heads   | mean_t ||y_h||_2, y_h = head h's output (o's input)  | (L, heads)  |
| embedding channel | sum over norms n of mean_t |n(x)_c|                  | (hidden,)   |

The norms are every RMSNorm over the hidden size: each block's input_layernorm and
post_attention_layernorm (Gemma: also pre_/post_feedforward_layernorm) and the final norm.
`prune` keeps the top units of each axis and slices the weights (depth: kd/student.py):

    imp = importance(teacher, calibration_batches(examples, batch_size=8))
    config, sd = prune(teacher, imp, layers=24, ffn=1024, heads=6, hidden=448)
    save_state_dict(sd, config, "out/pruned", tokenizer_from="models/smollm2-135m-instruct")

Every axis keeps the same count in every layer (config.json has one intermediate_size and one
head count). With grouped-query attention whole K/V groups go: a group's score is the sum of its
query heads', and heads = kept groups * (query heads per group). head_dim never changes; the
config always states it, so it may differ from hidden_size / heads after pruning (as in
Llama-3.1-Minitron-4B-Width). Pruning MLP channels, heads or blocks is exact in the sense that
the pruned model equals the teacher with those units' outputs zeroed (tests/test_prune.py);
pruning hidden channels changes every RMSNorm's statistics, so nothing is exact there and the
student needs distillation to recover. The last block feeds the final norm, but it is ranked
like any other (SmolLM2's has the second highest Block Influence, so it is kept anyway).
Mixture-of-experts models are refused; Gemma's hidden channels are too (its embeddings are
scaled by sqrt(hidden_size), which the cut would change).

`fit_budget` picks the sizes for a parameter budget: moderate width cuts first, then depth (see
its docstring for the rule and the measurement behind it). CLI: scripts/prune.py. Tests:
`.venv/bin/python -m pytest -q tests/test_prune.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.data import Example, collate
from kd.model import RMSNorm, Transformer
from kd.model_config import ModelConfig
from kd.student import LAYER_PREFIX, layer_subset_config, layer_subset_state_dict


@dataclass
class Importance:
    """Mean activation statistics of a calibration run; a higher score means keep."""

    layers: Tensor  # (L,) ShortGPT Block Influence, 1 - mean cosine of block input and output
    ffn: Tensor  # (L, intermediate_size) mean |a| of each MLP channel (the input to down_proj)
    heads: Tensor  # (L, num_attention_heads) mean L2 norm of each head's output (o_proj's input)
    hidden: Tensor  # (hidden_size,) mean |y| of each channel, summed over the residual norms
    tokens: int  # real (unpadded) tokens the means are over


@dataclass(frozen=True)
class Sizes:
    """What a pruned model keeps; each count is the same in every layer."""

    layers: int  # transformer blocks
    ffn: int  # MLP intermediate channels (intermediate_size)
    heads: int  # query heads (num_attention_heads); a multiple of the query heads per K/V group
    hidden: int  # residual stream channels (hidden_size)


def _check_dense(config: ModelConfig) -> None:
    if "moe" in config.features:
        raise ValueError(
            f"model_type {config.model_type} is a mixture of experts; kd.prune handles dense "
            "models only (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3)"
        )


# ----------------------------------------------------------------------------- calibration


def calibration_batches(examples: list[Example], *, batch_size: int) -> Iterator[dict[str, Tensor]]:
    """Right-padded batches {"input_ids": (B, T), "mask": (B, T) bool, True = real token}.

    Examples go shortest first, so a batch holds sequences of similar length and little padding
    (the scores are sums over tokens: the order does not change them). Any pad id works: under
    causal attention a right pad is seen by no real token, and the mask keeps it out of the sums.
    """
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        input_ids = collate(chunk, pad_id=0)["input_ids"]  # (B, T)
        lengths = torch.tensor([len(e.input_ids) for e in chunk])  # (B,)
        mask = torch.arange(input_ids.shape[1])[None] < lengths[:, None]  # (B, T)
        yield {"input_ids": input_ids, "mask": mask}


@torch.no_grad()
def importance(
    model: Transformer,
    batches: Iterable[dict[str, Tensor]],
    *,
    on_batch: Callable[[int, int], None] | None = None,
) -> Importance:
    """Activation importance of every block, MLP channel, head and hidden channel (table above).

    batches: right-padded {"input_ids": (B, T), "mask": (B, T) bool} (`calibration_batches`);
    each gets one forward, no attention mask needed (right padding is invisible to real tokens
    under causal attention), and only tokens where mask is True enter the sums.
    on_batch(sequences, tokens) is called after each batch with the totals so far.
    """
    c = model.config
    _check_dense(c)
    device = model.model.embed_tokens.weight.device
    L, n_heads = c.num_hidden_layers, c.num_attention_heads
    shapes = {"layers": (L,), "ffn": (L, c.intermediate_size), "heads": (L, n_heads)}
    shapes["hidden"] = (c.hidden_size,)
    # float64: a few hundred thousand tokens are summed into each entry
    sums = {k: torch.zeros(s, dtype=torch.float64, device=device) for k, s in shapes.items()}
    real: list[Tensor] = []  # the current batch's (B, T) mask, read by the hooks

    def token_sum(x: Tensor) -> Tensor:
        """(B, T, ...) -> (...): the sum over real tokens, in float64."""
        return x[real[0]].double().sum(0)  # x[mask]: (tokens, ...)

    def add(key: str, layer: int | None, stat: Callable[[Tensor], Tensor]):
        def hook(module, args, output=None):
            value = token_sum(stat(args[0] if output is None else output))
            if layer is None:
                sums[key] += value
            else:
                sums[key][layer] += value

        return hook

    def block_hook(layer: int):
        def hook(module, args, output):
            x, y = args[0][real[0]].float(), output[real[0]].float()  # (tokens, H)
            sums["layers"][layer] += (1 - F.cosine_similarity(x, y, dim=-1)).double().sum()

        return hook

    def per_head(y: Tensor) -> Tensor:
        B, T, _ = y.shape
        return y.float().view(B, T, n_heads, c.head_dim).norm(dim=-1)  # (B, T, n_heads)

    handles = []
    for i, block in enumerate(model.model.layers):
        handles += [
            block.register_forward_hook(block_hook(i)),
            block.mlp.down_proj.register_forward_pre_hook(add("ffn", i, lambda a: a.abs())),
            block.self_attn.o_proj.register_forward_pre_hook(add("heads", i, per_head)),
        ]
    for name, module in model.named_modules():
        if isinstance(module, RMSNorm) and not name.endswith(("q_norm", "k_norm")):
            handles.append(module.register_forward_hook(add("hidden", None, lambda y: y.abs())))
    sequences = tokens = 0
    try:
        for batch in batches:
            ids, mask = batch["input_ids"].to(device), batch["mask"].to(device)
            if (mask[:, 1:] & ~mask[:, :-1]).any():  # a real token after a pad
                raise ValueError("calibration batches must be right-padded (mask True, then False)")
            real[:] = [mask]
            model(ids, output_fn=lambda hidden, head: None)  # no logits: only the hooks matter
            sequences += ids.shape[0]
            tokens += int(mask.sum())  # host sync, once per batch
            if on_batch is not None:
                on_batch(sequences, tokens)
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ValueError("no calibration tokens: give at least one non-empty sequence")
    means = {k: (v / tokens).float().cpu() for k, v in sums.items()}
    return Importance(**means, tokens=tokens)


# ----------------------------------------------------------------------------- sizes


def resolve_sizes(
    config: ModelConfig,
    *,
    layers: int | None = None,
    ffn: int | None = None,
    heads: int | None = None,
    hidden: int | None = None,
) -> Sizes:
    """The sizes to keep (None = the model's own), or a one-line ValueError naming the bad one."""
    _check_dense(config)
    c = config
    group = c.num_attention_heads // c.num_key_value_heads  # query heads per K/V head
    sizes = Sizes(
        layers=c.num_hidden_layers if layers is None else layers,
        ffn=c.intermediate_size if ffn is None else ffn,
        heads=c.num_attention_heads if heads is None else heads,
        hidden=c.hidden_size if hidden is None else hidden,
    )
    for name, limit in (
        ("layers", c.num_hidden_layers),
        ("ffn", c.intermediate_size),
        ("hidden", c.hidden_size),
    ):
        if not 1 <= getattr(sizes, name) <= limit:
            raise ValueError(f"{name}={getattr(sizes, name)} must be in 1..{limit} (the model's)")
    if not group <= sizes.heads <= c.num_attention_heads or sizes.heads % group:
        raise ValueError(
            f"heads={sizes.heads}: the model has {c.num_attention_heads} query heads in "
            f"{c.num_key_value_heads} K/V groups of {group}, and whole groups are pruned; use a "
            f"multiple of {group} from {group} to {c.num_attention_heads}"
        )
    changed = (sizes.hidden, sizes.heads) != (c.hidden_size, c.num_attention_heads)
    if changed and sizes.hidden % sizes.heads:
        raise ValueError(
            f"hidden={sizes.hidden} is not a multiple of heads={sizes.heads}; transformers "
            "refuses such a config (LlamaConfig, Gemma's), so choose a multiple"
        )
    if sizes.hidden < c.hidden_size and "gemma_norms" in c.features:
        raise ValueError(
            f"hidden={sizes.hidden}: pruning {c.model_type}'s hidden channels is not supported "
            f"(its embeddings are scaled by sqrt(hidden_size)); keep hidden={c.hidden_size}"
        )
    return sizes


def pruned_config(config: ModelConfig, sizes: Sizes, layers: list[int]) -> ModelConfig:
    """The config of the model that keeps `sizes`, made of blocks `layers` of the original."""
    group = config.num_attention_heads // config.num_key_value_heads
    return replace(
        layer_subset_config(config, layers),
        intermediate_size=sizes.ffn,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads // group,
        hidden_size=sizes.hidden,
        head_dim=config.head_dim,  # stated: hidden / heads may no longer give it
    )


def num_params(config: ModelConfig) -> int:
    """Transformer(config).num_params(), counted on the meta device (no memory)."""
    with torch.device("meta"):
        return Transformer(config).num_params()


UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}


def parse_count(text: str) -> int:
    """A parameter count: 60M, 1.5B, 500K or 60000000."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMB]?)", text.strip().upper())
    if match is None:
        raise ValueError(
            f"parameter count {text!r}: give a parameter count such as 60M, 1.5B or 60000000"
        )
    return int(float(match[1]) * UNITS[match[2]])


# How far fit_budget shrinks each width axis (a fraction of the model's) before it cuts the next.
WIDTH_FLOORS = {"ffn": 2 / 3, "heads": 2 / 3, "hidden": 7 / 8}


def _descending(full: int, floor: float, step: int) -> list[int]:
    """full, then the multiples of step below it, down to the smallest one >= floor * full."""
    lowest = math.ceil(floor * full / step) * step
    return [full, *range((full - 1) // step * step, lowest - 1, -step)]


def fit_budget(config: ModelConfig, params: int, *, multiple: int = 8) -> Sizes:
    """The sizes of the largest model of at most `params` parameters that this rule reaches:

    moderate width cuts first, then depth. In order, stopping at the first size that fits:
    1. MLP channels, in multiples of `multiple`, down to 2/3 of the model's;
    2. K/V groups (with their query heads), one at a time, down to 2/3 of the model's, where
       the head count divides the hidden size;
    3. hidden channels, in multiples of `multiple` and of the head count (transformers' Llama
       and Gemma configs require hidden_size % num_attention_heads == 0), down to 7/8 of the
       model's (Gemma: none, see the module docstring);
    4. layers (prune keeps those of highest Block Influence), down to one.
    Why: pruned without retraining, each axis degrades gently while cut moderately and sharply
    when cut hard, hidden channels most (every RMSNorm's statistics move) and MLP channels
    least. SmolLM2-135M's pruned copies before any training, on 64 of its own greedy answers
    (perplexity / KL to it per token): this rule at 60M (17 layers, 6 heads, ffn 1024, hidden
    504) 444 / 4.78; width only (all 30 layers and 9 heads, hidden 324, ffn 1024; 60.7M)
    3,169 / 6.57; 11 layers by Block Influence (67.3M) 34,373 / 9.26. Minitron finds width
    better than depth after long distillation; a short one starts from the pruned model's
    quality. A model that fits already is returned whole.
    """
    _check_dense(config)
    c = config
    group = c.num_attention_heads // c.num_key_value_heads

    def count(sizes: Sizes) -> int:
        # Every dense block holds the same parameters, so n(L) = n(1) + (L - 1) (n(2) - n(1)):
        # exact, and two small meta builds instead of one of L blocks.
        one, two = (num_params(pruned_config(c, sizes, [0] * n)) for n in (1, 2))
        return one + (sizes.layers - 1) * (two - one)

    sizes = Sizes(c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.hidden_size)
    if count(sizes) <= params:
        return sizes

    def candidates(axis: str) -> list[int]:
        """The sizes `axis` may take, largest (the model's own) first."""
        if axis == "ffn":
            return _descending(c.intermediate_size, WIDTH_FLOORS["ffn"], multiple)
        if axis == "heads":
            heads = [
                g * group for g in _descending(c.num_key_value_heads, WIDTH_FLOORS["heads"], 1)
            ]
            # only head counts that divide the hidden size (transformers' rule, step 3)
            return [h for h in heads if h == c.num_attention_heads or c.hidden_size % h == 0]
        if axis == "hidden" and "gemma_norms" not in c.features:
            step = math.lcm(multiple, sizes.heads)
            return _descending(c.hidden_size, WIDTH_FLOORS["hidden"], step)
        return list(range(c.num_hidden_layers, 0, -1)) if axis == "layers" else [c.hidden_size]

    for axis in ("ffn", "heads", "hidden", "layers"):
        values = candidates(axis)
        for value in values[1:]:  # values[0] is the size already counted
            sizes = replace(sizes, **{axis: value})
            if count(sizes) <= params:
                return sizes
    raise ValueError(
        f"a budget of {params:,} parameters is below the smallest model this rule makes "
        f"({count(sizes):,}: {sizes.layers} layer, ffn {sizes.ffn}, {sizes.heads} heads, "
        f"hidden {sizes.hidden}); raise it or choose the sizes yourself"
    )


# ----------------------------------------------------------------------------- slicing


def kept_layers(importance: Importance, layers: int) -> list[int]:
    """The `layers` blocks of highest Block Influence, in their original order."""
    return _top(importance.layers, layers).tolist()


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores, in ascending order (the kept units keep their order)."""
    return scores.topk(k).indices.sort().values


def _spans(units: Tensor, width: int) -> Tensor:
    """Row indices of units of `width` rows each: unit u covers rows u*width .. u*width+width-1."""
    return (units[:, None] * width + torch.arange(width)).flatten()  # (len(units) * width,)


def _prune_mlp(sd: dict[str, Tensor], prefix: str, keep: Tensor, fused: bool, width: int) -> None:
    """Keep MLP channels `keep`: rows of gate and up (and their biases), columns of down."""
    if fused:  # Phi-3: rows (gate | up), each `width` rows
        sd[prefix + "gate_up_proj.weight"] = sd[prefix + "gate_up_proj.weight"][
            torch.cat([keep, keep + width])
        ]
    for name in ("gate_proj.weight", "gate_proj.bias", "up_proj.weight", "up_proj.bias"):
        if prefix + name in sd:
            sd[prefix + name] = sd[prefix + name][keep]
    sd[prefix + "down_proj.weight"] = sd[prefix + "down_proj.weight"][:, keep]


def _prune_heads(sd: dict[str, Tensor], prefix: str, groups: Tensor, config: ModelConfig) -> None:
    """Keep K/V groups `groups` and their query heads: rows of q, k, v (and biases), columns
    of o. Query head h belongs to group h // (heads per group), as in kd.model.attention."""
    group, d = config.num_attention_heads // config.num_key_value_heads, config.head_dim
    heads = _spans(groups, group)  # the kept query heads
    q_rows, kv_rows = _spans(heads, d), _spans(groups, d)
    if "fused_projections" in config.features:  # Phi-3: rows (q | k | v)
        q_width, kv_width = config.num_attention_heads * d, config.num_key_value_heads * d
        rows = torch.cat([q_rows, q_width + kv_rows, q_width + kv_width + kv_rows])
        sd[prefix + "qkv_proj.weight"] = sd[prefix + "qkv_proj.weight"][rows]
    for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        for name in (f"{proj}.weight", f"{proj}.bias"):
            if prefix + name in sd:
                sd[prefix + name] = sd[prefix + name][rows]
    sd[prefix + "o_proj.weight"] = sd[prefix + "o_proj.weight"][:, q_rows]


# Tensors whose columns (dim 1) / entries along dim 0 are hidden channels.
_READS_HIDDEN = ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj")
_WRITES_HIDDEN = ("o_proj", "down_proj")


def _prune_hidden(sd: dict[str, Tensor], keep: Tensor) -> None:
    """Keep hidden channels `keep` everywhere the residual stream is read or written."""
    for key, t in list(sd.items()):
        module, _, kind = key.rpartition(".")
        last = module.rpartition(".")[2]
        if key in ("model.embed_tokens.weight", "lm_head.weight") or (
            last in _READS_HIDDEN and kind == "weight"
        ):
            sd[key] = t[:, keep]  # (out, hidden) -> (out, kept)
        elif last in _WRITES_HIDDEN or last.endswith("layernorm") or key == "model.norm.weight":
            sd[key] = t[keep]  # (hidden, ...) -> (kept, ...): output rows, biases, norm weights


def prune(
    model: Transformer | dict[str, Tensor],
    importance: Importance,
    *,
    config: ModelConfig | None = None,
    layers: int | None = None,
    ffn: int | None = None,
    heads: int | None = None,
    hidden: int | None = None,
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(config, state dict) of the model keeping the most important `layers` blocks (in their
    order), `ffn` MLP channels and `heads` query heads per layer and `hidden` channels; None
    keeps an axis whole. `model` is a Transformer or its state dict with `config`. The result
    loads in kd (kd.hf.save_state_dict, then load_model) and in transformers."""
    if isinstance(model, Transformer):
        config, sd = model.config, model.state_dict()
    elif config is None:
        raise ValueError("prune(state_dict, ...) needs config=, the state dict's ModelConfig")
    else:
        sd = model
    sizes = resolve_sizes(config, layers=layers, ffn=ffn, heads=heads, hidden=hidden)
    c = config
    shapes = {
        "layers": (c.num_hidden_layers,),
        "ffn": (c.num_hidden_layers, c.intermediate_size),
        "heads": (c.num_hidden_layers, c.num_attention_heads),
        "hidden": (c.hidden_size,),
    }
    for name, shape in shapes.items():
        if tuple(getattr(importance, name).shape) != shape:
            raise ValueError(
                f"importance.{name} has shape {tuple(getattr(importance, name).shape)}, the model "
                f"needs {shape}: it was computed on another model"
            )
    kept = kept_layers(importance, sizes.layers)
    sd = layer_subset_state_dict(sd, kept)  # a new dict: the caller's is left as it was
    fused = "fused_projections" in c.features
    group = c.num_attention_heads // c.num_key_value_heads
    for new, old in enumerate(kept):
        prefix = f"{LAYER_PREFIX}{new}."
        if sizes.ffn < c.intermediate_size:
            keep = _top(importance.ffn[old], sizes.ffn)
            _prune_mlp(sd, prefix + "mlp.", keep, fused, c.intermediate_size)
        if sizes.heads < c.num_attention_heads:
            group_scores = importance.heads[old].view(-1, group).sum(-1)  # (n_kv_heads,)
            _prune_heads(sd, prefix + "self_attn.", _top(group_scores, sizes.heads // group), c)
    if sizes.hidden < c.hidden_size:
        _prune_hidden(sd, _top(importance.hidden, sizes.hidden))
    return pruned_config(c, sizes, kept), sd
