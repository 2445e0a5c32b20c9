"""Families beyond Llama (Qwen3, Gemma 2/3, Phi-3, Mixtral, Qwen3-MoE) past test_model.py.

tests/test_model.py runs its parity tests (load, save, cached decoding, left padding, bf16) on
every arch of tests/tiny_models.py. This file adds what is particular to these families:
greedy `generate` equals transformers' token for token; each family feature moves the tiny
model's logits (so the parity tests would catch its loss); Gemma 2's capped logits reach the teacher
cache and MiniLLM's token log-probs; Gemma 3's config.json spellings
(rope_local_base_freq, sliding_window_pattern, nested rope_parameters) read the same; a student
made of some teacher layers keeps each layer's type and transformers loads it with the same
logits; bad configs fail in one line naming the key.

Run: `.venv/bin/python -m pytest -q tests/test_families.py`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from kd import hf_config
from kd.cache_writer import teacher_topk
from kd.hf import load_model, load_state_dict, save_state_dict
from kd.minillm import token_logprobs
from kd.model import Transformer
from kd.sampling import generate
from kd.student import layer_subset_config, layer_subset_state_dict
from tests.tiny_models import make_tiny_checkpoint

NEW_ARCHS = ("qwen3", "qwen3_untied", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe")
# fp32, the same ops as transformers (test_model.py measures 0.0): room for BLAS blocking.
PARITY_ATOL = 1e-4


def _ids(n: int, seed: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_greedy_generation_matches_transformers(arch, tmp_path):
    # initializer_range 0.2 for peaked logits (no near-ties for rounding to flip); gemma2 keeps
    # its own 0.1, which with its caps already gives logits spread over (-3, 3).
    extra = {} if arch == "gemma2" else {"initializer_range": 0.2}
    path = make_tiny_checkpoint(tmp_path / arch, arch, **extra)
    ours = load_model(path).eval()
    theirs = AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = [[5, 17, 99, 3, 42, 8, 200], [11, 12], [7, 250, 31, 64]]
    # 20 new tokens run past the sliding windows (6 and 8 positions) of gemma and phi3.
    got = generate(ours, prompts, max_new_tokens=20, temperature=0.0, eos_token_ids=None, pad_id=0)
    for p, row in zip(prompts, got):
        want = theirs.generate(
            torch.tensor([p]),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(p) :].tolist()
        assert row == want, f"{arch}, prompt {p}: ours {row} vs transformers {want}"


# Each feature of a family, turned off: the logits must move (by more than the parity tolerance,
# by far), or the tiny checkpoints would not show that the feature is implemented.
FEATURES = [
    ("gemma2", {"attn_logit_softcapping": None}),
    ("gemma2", {"final_logit_softcapping": None}),
    ("gemma2", {"query_pre_attn_scalar": None}),
    ("gemma2", {"sliding_window": 1000}),
    ("gemma3", {"rope_local_base_freq": None}),
    ("gemma3", {"rope_scaling": None}),
    ("gemma3", {"sliding_window": 1000}),
    ("phi3", {"sliding_window": None}),
]


@pytest.mark.parametrize(
    "arch, change", FEATURES, ids=[f"{a}-{next(iter(c))}" for a, c in FEATURES]
)
@torch.no_grad()
def test_each_feature_moves_the_logits(arch, change, tmp_path):
    path = make_tiny_checkpoint(tmp_path / arch, arch)
    model = load_model(path).eval()
    without = Transformer(dataclasses.replace(model.config, **change)).eval()
    without.load_state_dict(load_state_dict(path))
    ids = _ids(24, 0)
    moved = (model(ids) - without(ids)).abs().max().item()
    assert moved > 1e-2, f"{arch} without {change}: logits moved by only {moved:.2e}"


@torch.no_grad()
def test_qk_norms_and_gemma_norms_are_used(tmp_path):
    """Zeroing a q/k norm weight (Qwen3: scale 0) or a Gemma norm weight (scale 1 + 0) must
    change the output: the norms are in the forward, not only in the state dict."""
    for arch, key in (
        ("qwen3", "model.layers.0.self_attn.q_norm.weight"),
        ("gemma3", "model.layers.0.self_attn.k_norm.weight"),
        ("gemma2", "model.layers.1.post_feedforward_layernorm.weight"),
        ("gemma2", "model.layers.0.pre_feedforward_layernorm.weight"),
    ):
        model = load_model(make_tiny_checkpoint(tmp_path / arch, arch)).eval()
        ids = _ids(12, 1)
        before = model(ids)
        model.state_dict()[key].zero_()
        moved = (model(ids) - before).abs().max().item()
        assert moved > 1e-3, f"{arch}: zeroing {key} moved the logits by {moved:.2e}"


def test_gemma3_config_spellings_read_the_same():
    """Hub configs: rope_theta + rope_local_base_freq + rope_scaling + sliding_window_pattern;
    transformers 5: nested rope_parameters and layer_types. Same ModelConfig, same layer types as
    transformers derives."""
    base = {
        "model_type": "gemma3_text",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 7,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": 16,
        "sliding_window": 512,
        "hidden_activation": "gelu_pytorch_tanh",
    }
    legacy = {
        **base,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window_pattern": 3,
    }
    cfg = hf_config.config_from_dict(legacy)
    theirs = Gemma3TextConfig(**{k: v for k, v in legacy.items() if k != "model_type"})
    assert cfg.layer_types == theirs.layer_types
    assert cfg.layer_types[:3] == ["sliding_attention", "sliding_attention", "full_attention"]
    assert cfg.rope(0) == (10000.0, None)
    assert cfg.rope(2) == (1000000.0, {"rope_type": "linear", "factor": 8.0})
    assert cfg.hidden_act == "gelu_pytorch_tanh"
    written = hf_config.config_to_dict(cfg)
    assert written["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert written["hidden_activation"] == "gelu_pytorch_tanh" and "hidden_act" not in written
    assert hf_config.config_from_dict(written) == cfg  # round trip
    nested = {**base, "rope_parameters": theirs.rope_parameters, "layer_types": theirs.layer_types}
    # sliding_window_pattern only fills in missing layer_types; this spelling leaves it out
    assert hf_config.config_from_dict(nested) == dataclasses.replace(cfg, sliding_window_pattern=6)


STUDENTS = [
    ("gemma3", [3, 2, 0]),
    ("gemma2", [2, 0]),
    ("qwen3", [1]),
    ("qwen3_moe", [2, 1]),  # MoE, then dense: mlp_only_layers becomes [1]
    ("mixtral", [1]),
]


@pytest.mark.parametrize("arch, layers", STUDENTS)
@torch.no_grad()
def test_student_layers_keep_their_types_and_transformers_loads_them(arch, layers, tmp_path):
    teacher_dir = make_tiny_checkpoint(tmp_path / "teacher", arch)
    teacher = hf_config.load_config(teacher_dir)
    config = layer_subset_config(teacher, layers)
    assert config.layer_types == [teacher.layer_types[i] for i in layers]
    assert [config.sparse(j) for j in range(len(layers))] == [teacher.sparse(i) for i in layers]
    assert [config.rope(j) for j in range(len(layers))] == [teacher.rope(i) for i in layers]
    state_dict = layer_subset_state_dict(load_state_dict(teacher_dir), layers)
    save_state_dict(state_dict, config, tmp_path / "student")
    ours = load_model(tmp_path / "student").eval()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    if hasattr(theirs.config, "layer_types"):  # Mixtral's config has none (one window for all)
        assert list(theirs.config.layer_types) == config.layer_types
    ids = _ids(20, 2)
    diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff < PARITY_ATOL, f"{arch} student {layers}: max |logit diff| {diff:.2e}"


BAD_CONFIGS = [
    ({"hidden_size": 64}, "has no key model_type; use one of llama, .*gemma3_text, phi3"),
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported; use one of llama"),
    ({"model_type": ["qwen3"]}, 'model_type = \\["qwen3"\\] must be a string'),
    ({"model_type": "gemma3"}, "model_type 'gemma3' is Gemma 3's image-text model"),
    (
        {"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0]}},
        "rope_scaling.rope_type='longrope' is not supported",
    ),
    (
        {
            "model_type": "phi3",
            "rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.75},
        },
        "partial_rotary_factor=0.75 is not supported",
    ),
    (
        {"model_type": "gemma3_text", "use_bidirectional_attention": True},
        "use_bidirectional_attention=true",
    ),
    ({"model_type": "gemma2", "hidden_activation": "relu"}, "hidden_act='relu' is not supported"),
    ({"model_type": "qwen3", "head_dim": "128"}, 'head_dim = "128" has the wrong type'),
    (
        {"model_type": "gemma2", "final_logit_softcapping": -30.0},
        "final_logit_softcapping=-30.0 must be > 0",
    ),
]


@pytest.mark.parametrize("config, message", BAD_CONFIGS)
def test_bad_configs_fail_in_one_line_naming_the_key(config, message):
    with pytest.raises(ValueError, match=message) as e:
        hf_config.config_from_dict(config, where="m/config.json")
    assert "\n" not in str(e.value)


@torch.no_grad()
def test_capped_logits_reach_the_teacher_cache_and_minillm(tmp_path):
    """Gemma 2's final softcap where logits leave the model other than by forward: the teacher
    cache's top-k log-probs and MiniLLM's token log-probs equal log_softmax of the full logits."""
    model = load_model(make_tiny_checkpoint(tmp_path / "gemma2", "gemma2")).eval()
    ids = _ids(16, 3)
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    log_p = model(ids).float().log_softmax(-1)  # (B, T, V), capped by the forward
    top_ids, top_logprobs, _ = teacher_topk(model, ids, labels, k=5, chunk_size=7)
    valid = labels != -100
    want = log_p[valid].topk(5, dim=-1)
    assert torch.equal(top_ids, want.indices)
    # fp32: the same logits through a chunked matmul; rounding ~1e-7 on log-probs of size ~5
    assert (top_logprobs - want.values).abs().max().item() < 1e-5
    hidden, head = model(ids, output_fn=lambda h, head: (h, head))
    got = token_logprobs(hidden, head, labels, chunk_size=5)
    want = torch.where(valid, log_p.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 0.0)
    assert (got - want).abs().max().item() < 1e-5
