"""kd/prune.py and scripts/prune.py: importance scores, the identities pruning must respect,
transformers parity of pruned checkpoints, fit_budget, and the CLI end to end.

- Each score of `importance` (hooks on a right-padded batch) equals the same statistic from a
  forward written out here, one unpadded sequence at a time (so padding is excluded too).
- Pruning MLP channels, K/V groups or blocks gives exactly the teacher with those units'
  outputs zeroed: gate/up rows (act(0) * 0 = 0), o_proj columns with q and K/V rows, or o_proj
  and down_proj of a removed block (its residual contribution is then 0). Hidden pruning has no
  such identity (RMSNorm's mean square changes); there the shapes must agree and it must run.
- Every kind of pruning, and all four at once, loads in transformers with kd's logits.
- fit_budget stays under the budget and is the largest its rule allows; a budget below the
  smallest model and impossible sizes are one-line errors.
- scripts/prune.py on a tiny teacher with a tokenizer: the table, a model both libraries load,
  and one `error:` line with exit status 1 on bad sizes.

Run: `.venv/bin/python -m pytest -q tests/test_prune.py`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from kd.data import IGNORE, Example
from kd.hf import load_model, save_state_dict
from kd.hf_config import config_to_dict, load_config
from kd.model import Transformer
from kd.model_config import ModelConfig
from kd.prune import (
    Sizes,
    calibration_batches,
    fit_budget,
    importance,
    num_params,
    prune,
    pruned_config,
    resolve_sizes,
)
from kd.rope import apply_rope, rope_cos_sin, rope_inv_freq
from tests.tiny_models import make_tiny_checkpoint
from tests.tiny_tokenizer import CORPUS, TINY_VOCAB_SIZE, make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits

REPO = Path(__file__).resolve().parent.parent
ARCHS = ("llama", "qwen2", "qwen3")
# fp32 throughout. Scores: the hooks see the batched SDPA forward, the reference an explicit
# softmax one sequence at a time; the two differ by float rounding only (~1e-7 relative).
SCORE_RTOL = 1e-5
# A pruned model against the teacher with the pruned units zeroed: the sums of the pruned model
# lack only exact zeros, so only the matmuls' blocking (summation order) differs: ~1e-6.
IDENTITY_ATOL = 1e-5
# kd against transformers on the same checkpoint (as tests/test_model.py).
PARITY_ATOL = 1e-4


def calibration(vocab: int, lengths: list[int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        examples.append(Example(ids, ids[1:] + [IGNORE], [], n - 1, i))
    return examples


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    """(arch, teacher, its calibration examples, their importance); 4 layers to cut from."""
    arch = request.param
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(arch) / "m", arch, num_hidden_layers=4)
    model = load_model(path).eval()
    examples = calibration(model.config.vocab_size, [16, 11, 5, 9])
    # batches of 3 and 1: the first right-padded to 11 tokens
    return arch, model, examples, importance(model, calibration_batches(examples, batch_size=3))


def by_hand(model: Transformer, ids: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-token sums of the four scores for one unpadded sequence, and its logits, from the
    forward written out: q/k/v, RoPE, causal softmax, gated SiLU MLP (llama/qwen2/qwen3)."""
    c, T = model.config, len(ids)
    group = c.num_attention_heads // c.num_key_value_heads
    cos, sin = rope_cos_sin(
        rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling), torch.arange(T)[None]
    )
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = model.model.embed_tokens(torch.tensor([ids]))  # (1, T, H)
    layers, ffn, heads, hidden = [], [], [], 0
    for block in model.model.layers:
        att, mlp = block.self_attn, block.mlp
        h = block.input_layernorm(x)
        q = att.q_proj(h).view(1, T, -1, c.head_dim)  # (1, T, n_heads, d)
        k = att.k_proj(h).view(1, T, -1, c.head_dim)  # (1, T, n_kv, d)
        v = att.v_proj(h).view(1, T, -1, c.head_dim).transpose(1, 2)  # (1, n_kv, T, d)
        if hasattr(att, "q_norm"):
            q, k = att.q_norm(q), att.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (1, n_heads, T, d)
        k = apply_rope(k.transpose(1, 2), cos, sin).repeat_interleave(group, 1)
        scores = (q @ k.transpose(-2, -1)) * c.head_dim**-0.5  # (1, n_heads, T, T)
        y = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v.repeat_interleave(group, 1)
        heads.append(y.norm(dim=-1).sum(-1)[0])  # (n_heads,)
        mid = x + att.o_proj(y.transpose(1, 2).reshape(1, T, -1))
        n = block.post_attention_layernorm(mid)
        a = F.silu(mlp.gate_proj(n)) * mlp.up_proj(n)  # (1, T, ffn)
        ffn.append(a.abs().sum((0, 1)))
        out = mid + mlp.down_proj(a)
        layers.append((1 - F.cosine_similarity(x, out, dim=-1)).sum())
        hidden = hidden + h.abs().sum((0, 1)) + n.abs().sum((0, 1))
        x = out
    final = model.model.norm(x)
    sums = {"layers": torch.stack(layers), "ffn": torch.stack(ffn), "heads": torch.stack(heads)}
    sums["hidden"] = hidden + final.abs().sum((0, 1))
    return sums, final @ model.head_weight.T


@torch.no_grad()
def test_importance_equals_a_direct_computation(tiny):
    arch, model, examples, imp = tiny
    totals = {}
    for e in examples:
        sums, logits = by_hand(model, e.input_ids)
        ref = model(torch.tensor([e.input_ids]))
        diff = (logits - ref).abs().max().item()
        assert diff < IDENTITY_ATOL, f"{arch}: the by-hand forward is off by {diff:.2e}"
        totals = {k: totals.get(k, 0) + v for k, v in sums.items()}
    tokens = sum(len(e.input_ids) for e in examples)
    assert imp.tokens == tokens
    for name, total in totals.items():
        want, got = total / tokens, getattr(imp, name)
        rel = ((got - want).abs().max() / want.abs().max()).item()
        print(f"{arch} {name}: max relative diff {rel:.2e}")
        assert rel < SCORE_RTOL, f"{arch}: importance.{name} differs by {rel:.2e} (relative)"


def build(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def zeroed(model: Transformer, rows: dict[str, torch.Tensor], cols: dict[str, torch.Tensor]):
    """The teacher with rows (dim 0; the bias too) / columns of the named weights set to 0."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for name, index in rows.items():
        for key in (f"{name}.weight", f"{name}.bias"):
            if key in sd:
                sd[key][index] = 0
    for name, index in cols.items():
        sd[f"{name}.weight"][:, index] = 0
    return build(model.config, sd)


def dropped(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices pruning drops: all but the `keep` highest scores."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask[scores.topk(keep).indices] = False
    return mask.nonzero().flatten()


def spans(units: torch.Tensor, width: int) -> torch.Tensor:
    """Rows u * width .. u * width + width - 1 of each unit u."""
    return (units[:, None] * width + torch.arange(width)).flatten()


def identity_reference(model: Transformer, imp, *, ffn: int, groups: int, layers: int):
    """The teacher with every unit that pruning to (ffn, groups, layers) drops zeroed."""
    c = model.config
    group, d = c.num_attention_heads // c.num_key_value_heads, c.head_dim
    rows, cols = {}, {}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        channels = dropped(imp.ffn[i], ffn)
        rows |= {p + "mlp.gate_proj": channels, p + "mlp.up_proj": channels}
        gone = dropped(imp.heads[i].view(-1, group).sum(-1), groups)  # K/V groups
        q, kv = spans(spans(gone, group), d), spans(gone, d)  # their query heads' rows; K/V rows
        rows |= {p + "self_attn.q_proj": q, p + "self_attn.k_proj": kv, p + "self_attn.v_proj": kv}
        cols[p + "self_attn.o_proj"] = q
    for i in dropped(imp.layers, layers).tolist():  # the whole block adds 0 to the residual
        p = f"model.layers.{i}."
        rows |= {p + "self_attn.o_proj": slice(None), p + "mlp.down_proj": slice(None)}
    return zeroed(model, rows, cols)


# What each identity test keeps of the 4-layer tiny teachers (ffn 128, 2 K/V groups of 2 heads).
CUTS = {
    "ffn": {"ffn": 48},
    "heads": {"groups": 1},
    "layers": {"layers": 2},
    "all-three": {"ffn": 48, "groups": 1, "layers": 2},
}


def random_ids(vocab: int, shape: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("kind", CUTS)
def test_pruned_equals_zeroed_teacher(tiny, kind):
    arch, model, _, imp = tiny
    c = model.config
    group = c.num_attention_heads // c.num_key_value_heads
    keep = {"ffn": c.intermediate_size, "groups": c.num_key_value_heads, "layers": 4} | CUTS[kind]
    config, sd = prune(
        model, imp, ffn=keep["ffn"], heads=keep["groups"] * group, layers=keep["layers"]
    )
    assert (config.num_hidden_layers, config.intermediate_size) == (keep["layers"], keep["ffn"])
    assert config.num_key_value_heads == keep["groups"]
    ids = random_ids(c.vocab_size, (2, 20))
    got, want = build(config, sd)(ids), identity_reference(model, imp, **keep)(ids)
    diff = (got - want).abs().max().item()
    print(f"{arch} {kind}: pruned vs zeroed teacher, max |logit diff| {diff:.2e}")
    assert diff < IDENTITY_ATOL, f"{arch} {kind}: pruned model differs by {diff:.2e}"
    change = (want - model(ids)).abs().max().item()  # the cut is not a no-op
    assert change > 1e-3, f"{arch} {kind}: pruning changed the logits by only {change:.2e}"


def transformers_diff(config: ModelConfig, sd: dict[str, torch.Tensor], out: Path) -> float:
    """Save, load in kd and in transformers, and return the max |logit diff| of the two."""
    save_state_dict(sd, config, out)
    ours = load_model(out).eval()
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_ids(config.vocab_size, (2, 24), seed=2)
    with torch.no_grad():
        logits = ours(ids)
        assert torch.isfinite(logits).all()
        return (logits - theirs(ids).logits).abs().max().item()


@torch.no_grad()
def test_hidden_pruning_gives_a_consistent_model(tiny, tmp_path):
    """No identity here (RMSNorm's mean square is over other channels now): every tensor has
    the shape the new config implies (save_state_dict checks), it runs, transformers agrees."""
    arch, model, _, imp = tiny
    config, sd = prune(model, imp, hidden=40)
    assert config.hidden_size == 40 and config.head_dim == model.config.head_dim
    assert sd["model.embed_tokens.weight"].shape == (config.vocab_size, 40)
    assert sd["model.layers.0.self_attn.o_proj.weight"].shape[0] == 40
    diff = transformers_diff(config, sd, tmp_path / "pruned")
    print(f"{arch} hidden 64 -> 40: kd vs transformers, max |logit diff| {diff:.2e}")
    assert diff < PARITY_ATOL, f"{arch}: transformers' logits differ by {diff:.2e}"


# Every kind of pruning alone and all four at once, on the 4-layer teachers (hidden 64).
KINDS = {
    "layers": {"layers": 3},
    "ffn": {"ffn": 72},
    "heads": {"heads": 2},
    "hidden": {"hidden": 48},
    "all": {"layers": 2, "ffn": 40, "heads": 2, "hidden": 56},
}


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_loads_pruned_checkpoints(tiny, tmp_path, kind):
    arch, model, _, imp = tiny
    config, sd = prune(model, imp, **KINDS[kind])
    diff = transformers_diff(config, sd, tmp_path / "pruned")
    print(f"{arch} {kind}: kd vs transformers, max |logit diff| {diff:.2e}")
    assert diff < PARITY_ATOL, f"{arch} {kind}: transformers' logits differ by {diff:.2e}"


# Families beyond the three above: fused projections (Phi-3: q|k|v and gate|up rows),
# untied head (Mistral, Phi-3), Gemma's sandwich norms (all but hidden).
OTHERS = {
    "phi3": {"layers": 1, "ffn": 40, "heads": 2, "hidden": 48},
    "mistral": {"layers": 1, "ffn": 40, "heads": 2, "hidden": 48},
    "qwen3_untied": {"layers": 1, "ffn": 40, "heads": 2, "hidden": 48},
    "gemma3": {"layers": 2, "ffn": 40, "heads": 2},
}


@pytest.mark.parametrize("arch", OTHERS)
def test_other_families_prune_and_load_in_transformers(arch, tmp_path):
    model = load_model(make_tiny_checkpoint(tmp_path / "teacher", arch)).eval()
    examples = calibration(model.config.vocab_size, [12, 7])
    imp = importance(model, calibration_batches(examples, batch_size=2))
    config, sd = prune(model, imp, **OTHERS[arch])
    diff = transformers_diff(config, sd, tmp_path / "pruned")
    print(f"{arch}: kd vs transformers after pruning, max |logit diff| {diff:.2e}")
    assert diff < PARITY_ATOL, f"{arch}: transformers' logits differ by {diff:.2e}"


def one_line(exc_type: type[Exception], fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"error spans several lines: {message!r}"
    return message


def test_refusals_are_one_line(tmp_path):
    moe = load_model(make_tiny_checkpoint(tmp_path / "moe", "qwen3_moe")).eval()
    batches = calibration_batches(calibration(moe.config.vocab_size, [5]), batch_size=1)
    assert "mixture of experts" in one_line(ValueError, importance, moe, batches)
    gemma = load_config(make_tiny_checkpoint(tmp_path / "gemma", "gemma2"))
    assert "sqrt(hidden_size)" in one_line(ValueError, resolve_sizes, gemma, hidden=32)
    llama = ModelConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
    )
    assert "multiple of 2" in one_line(ValueError, resolve_sizes, llama, heads=3)
    assert "ffn=200 must be in 1..128" in one_line(ValueError, resolve_sizes, llama, ffn=200)
    assert "layers=0" in one_line(ValueError, resolve_sizes, llama, layers=0)
    assert "not a multiple of heads=4" in one_line(ValueError, resolve_sizes, llama, hidden=42)


# SmolLM2-135M's shape: 30 layers, hidden 576, 9 heads in 3 K/V groups, ffn 1536, tied.
SMOLLM2 = ModelConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
)


def params_of(config: ModelConfig, sizes: Sizes) -> int:
    return num_params(pruned_config(config, sizes, list(range(sizes.layers))))


def test_num_params_counts_what_the_pruned_model_holds(tiny):
    _, model, _, imp = tiny
    config, sd = prune(model, imp, **KINDS["all"])
    assert (
        num_params(config) == build(config, sd).num_params() == sum(t.numel() for t in sd.values())
    )


# fit_budget's rule on SmolLM2 (multiple 8): (axis, whole, floor), cut in this order.
RULE = [("ffn", 1536, 1024), ("heads", 9, 6), ("hidden", 576, 504), ("layers", 30, 1)]


def rule_step(axis: str, sizes: Sizes) -> int:
    """One step of `axis`: 8 MLP channels, a K/V group (3 heads), a layer, or for hidden the
    least common multiple of 8 and the head count (transformers needs hidden % heads == 0)."""
    return {"ffn": 8, "heads": 3, "layers": 1, "hidden": math.lcm(8, sizes.heads)}[axis]


@pytest.mark.parametrize(
    "budget, expected",
    [
        (60_000_000, Sizes(layers=17, ffn=1024, heads=6, hidden=504)),  # the demo's budget
        (100_000_000, Sizes(layers=30, ffn=1024, heads=6, hidden=576)),
        (130_000_000, Sizes(layers=30, ffn=1448, heads=9, hidden=576)),
    ],
)
def test_fit_budget_is_the_largest_model_its_rule_allows(budget, expected):
    sizes = fit_budget(SMOLLM2, budget)
    n = params_of(SMOLLM2, sizes)
    print(f"budget {budget:,}: {sizes}, {n:,} parameters")
    assert sizes == expected and n <= budget
    # The last axis the rule cut: the axes before it sit at their floors, those after it whole,
    # and one step more of it is over the budget.
    last = max(i for i, (axis, whole, _) in enumerate(RULE) if getattr(sizes, axis) != whole)
    assert all(getattr(sizes, axis) == floor for axis, _, floor in RULE[:last])
    assert all(getattr(sizes, axis) == whole for axis, whole, _ in RULE[last + 1 :])
    axis = RULE[last][0]
    bigger = replace(sizes, **{axis: getattr(sizes, axis) + rule_step(axis, sizes)})
    assert params_of(SMOLLM2, bigger) > budget
    # transformers accepts the config (LlamaConfig checks hidden_size % num_attention_heads)
    LlamaConfig(**config_to_dict(pruned_config(SMOLLM2, sizes, list(range(sizes.layers)))))


def test_fit_budget_edges():
    assert fit_budget(SMOLLM2, 200_000_000) == Sizes(30, 1536, 9, 576)  # fits whole
    message = one_line(ValueError, fit_budget, SMOLLM2, 20_000_000)
    assert "below the smallest model" in message and "26,838,504" in message


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def teacher_with_tokenizer(tmp_path_factory) -> tuple[Path, Path]:
    """A 4-layer tiny llama with the tiny tokenizer, and a JSONL calibration file."""
    root = tmp_path_factory.mktemp("cli")
    teacher = make_tiny_checkpoint(
        root / "teacher", "llama", num_hidden_layers=4, vocab_size=TINY_VOCAB_SIZE
    )
    make_tiny_tokenizer(teacher)
    data = root / "calibration.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS * 2))
    return teacher, data


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prune.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_script_end_to_end(teacher_with_tokenizer, tmp_path):
    teacher, data = teacher_with_tokenizer
    out = tmp_path / "pruned"
    sizes = ["--layers", "3", "--ffn", "64", "--heads", "2", "--hidden", "48"]
    result = run_script(teacher, out, "--data", data, "--samples", "10", "--seq-len", "32", *sizes)
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    assert "calibration: 10/10 sequences" in result.stderr
    rows = [line.split("->") for line in result.stdout.splitlines() if "->" in line]
    table = {old[:18].strip(): (old[18:].strip(), new.strip()) for old, new in rows}
    assert table["layers"] == ("4", "3") and table["heads (query/KV)"] == ("4/2", "2/1")
    assert table["ffn"] == ("128", "64") and table["hidden"] == ("64", "48")
    assert "kept layers: " in result.stdout and (out / "tokenizer.json").is_file()
    config = load_model(out).config
    assert (config.num_hidden_layers, config.intermediate_size, config.hidden_size) == (3, 64, 48)
    assert table["parameters"][1] == f"{num_params(config):,}"
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_ids(TINY_VOCAB_SIZE, (1, 16))
    with torch.no_grad():
        diff = (load_model(out).eval()(ids) - theirs(ids).logits).abs().max().item()
    assert diff < PARITY_ATOL, f"transformers' logits differ by {diff:.2e}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ffn", "1000"], "error: ffn=1000 must be in 1..128 (the model's)"),
        (["--params", "1K", "--multiple", "8"], "is below the smallest model"),
    ],
)
def test_script_bad_input_is_one_error_line(teacher_with_tokenizer, tmp_path, args, message):
    teacher, data = teacher_with_tokenizer
    result = run_script(teacher, tmp_path / "out", "--data", data, *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_script_never_replaces_a_directory_unasked(teacher_with_tokenizer, tmp_path):
    teacher, data = teacher_with_tokenizer
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for target, message in ((out, "pass --overwrite"), (teacher, "is the teacher's directory")):
        result = run_script(teacher, target, "--data", data, "--layers", "3")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and message in lines[0], lines
    assert (out / "keep.txt").read_text() == "mine"
    assert (teacher / "config.json").is_file()
    result = run_script(teacher, out, "--data", data, "--layers", "3", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert load_model(out).config.num_hidden_layers == 3 and not (out / "keep.txt").exists()
