"""Pieces of the training loop on their own: LR schedule, AdamW groups, layer-subset
students, FLOPs.

- `lr_at`: linear warmup to lr, cosine to min_lr at max_steps, checked at its landmarks.
- `build_optimizer`: decay on matrices only.
- `kd/student.py`: a student of all the teacher's layers in order equals the teacher (logits
  identical); a subset renames blocks and keeps embeddings/norm/head.
- `kd.training.flops_per_token`: 2N forward + 6N training + attention, by hand for a tiny config.

Run: .venv/bin/python -m pytest -q tests/test_train_units.py
"""

import math
from pathlib import Path

import pytest
import torch

from kd.model import Transformer
from kd.model_config import ModelConfig
from kd.optim import build_optimizer, lr_at
from kd.student import layer_subset_config, layer_subset_state_dict
from kd.training import flops_per_token, matmul_params

TINY = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


def test_lr_schedule_landmarks():
    kw = dict(lr=1.0, warmup_steps=10, max_steps=110, min_lr=0.1)
    assert lr_at(1, **kw) == pytest.approx(0.1)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half-way through the cosine: (lr + min_lr) / 2
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)  # past max_steps: stays at the floor
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:])), "cosine part must not increase"
    assert lr_at(1, lr=1.0, warmup_steps=0, max_steps=10, min_lr=0.0) == pytest.approx(
        (1 + math.cos(math.pi / 10)) / 2
    )


def test_weight_decay_only_on_matrices():
    model = Transformer(TINY)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_layer_subset_student():
    teacher = Transformer(TINY)
    teacher.init_weights(seed=0)
    sd = teacher.state_dict()
    ids = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

    same = Transformer(layer_subset_config(TINY, [0, 1, 2, 3]))
    same.load_state_dict(layer_subset_state_dict(sd, [0, 1, 2, 3]), strict=True)
    diff = (same(ids) - teacher(ids)).abs().max().item()
    assert diff == 0.0, f"all layers in order must reproduce the teacher exactly, max |diff| {diff}"

    config = layer_subset_config(TINY, [0, 3])
    assert config.num_hidden_layers == 2 and config.hidden_size == TINY.hidden_size
    student_sd = layer_subset_state_dict(sd, [0, 3])
    Transformer(config).load_state_dict(student_sd, strict=True)
    assert torch.equal(
        student_sd["model.layers.1.mlp.up_proj.weight"], sd["model.layers.3.mlp.up_proj.weight"]
    )
    assert torch.equal(student_sd["model.norm.weight"], sd["model.norm.weight"])
    with pytest.raises(ValueError, match=r"student_layers=\[0, 4\].*0\.\.3"):
        layer_subset_config(TINY, [0, 4])


def test_flops_per_token_by_hand():
    with torch.device("meta"):
        teacher, student = Transformer(TINY), Transformer(layer_subset_config(TINY, [0, 2]))
    # Tied: the embedding matrix is the head, so every parameter is a matmul parameter.
    assert matmul_params(student) == sum(p.numel() for p in student.parameters())
    attention = 4 * 32 * 16  # per layer: 2 * 2 * seq_len * heads * head_dim
    expected = (2 * matmul_params(teacher) + 4 * attention) + 3 * (
        2 * matmul_params(student) + 2 * attention
    )
    assert flops_per_token([teacher], student, seq_len=16) == expected


def test_plot_metrics_writes_a_png(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import plot_metrics

    records = [
        {"step": s, "loss": 3.0 / s, "divergence": 1.0 / s, "ce": 5.0 / s} for s in range(1, 5)
    ]
    records += [
        {"step": s, "eval_kl": 1.0 / (s + 1), "eval_top1_agreement": 0.5 + s / 10} for s in (0, 4)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_metrics.main([str(tmp_path)]) == 0
    assert (tmp_path / "metrics.png").stat().st_size > 0
    assert plot_metrics.main([str(tmp_path / "missing")]) == 1
