"""kd/checkpoint.py: atomic DCP checkpoints of a sharded student, pruning, and exact reload.

In one process (a world of 1, as `python train.py` runs): save after some AdamW steps, keep
only the newest K, ignore a half-written `.tmp` save left by a kill, refuse `resume` without
a checkpoint, and check that reloading into a fresh model + optimizer continues bit-exactly.

Run: .venv/bin/python -m pytest -q tests/test_checkpoint.py
"""

import pytest
import torch

from kd import checkpoint, parallel
from kd.model import Transformer
from kd.model_config import ModelConfig
from kd.optim import build_optimizer

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def world():
    w = parallel.init_distributed()
    yield w
    parallel.shutdown()


def make(seed: int = 0) -> tuple[Transformer, torch.optim.Optimizer]:
    with torch.device("meta"):
        model = Transformer(CONFIG)
    parallel.shard_student(model, precision="fp32", activation_checkpointing=False, compile=False)
    model.to_empty(device="cpu")
    reference = Transformer(CONFIG)
    reference.init_weights(seed=seed)
    parallel.load_full_state_dict(model, reference.state_dict())
    return model, build_optimizer(model, lr=1e-2, weight_decay=0.1)


def train(model: Transformer, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        ids = torch.randint(
            0, CONFIG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(step)
        )
        model(ids).float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def weights(model: Transformer) -> dict[str, torch.Tensor]:
    return parallel.full_state_dict(model)


def test_save_prune_and_exact_reload(world, tmp_path):
    model, optimizer = make()
    train(model, optimizer, range(0, 2))
    checkpoint.save_checkpoint(
        tmp_path, step=2, model=model, optimizer=optimizer, meta={"x": 1}, world=world, keep=2
    )
    train(model, optimizer, range(2, 4))
    checkpoint.save_checkpoint(
        tmp_path, step=4, model=model, optimizer=optimizer, meta={"x": 2}, world=world, keep=2
    )
    (checkpoint.checkpoint_root(tmp_path) / "step_000009.tmp").mkdir()  # a save killed half-way
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_000004"
    train(model, optimizer, range(4, 6))
    expected = weights(model)

    fresh, fresh_optimizer = make(seed=1)
    meta = checkpoint.load_checkpoint(
        checkpoint.latest_checkpoint(tmp_path), model=fresh, optimizer=fresh_optimizer, world=world
    )
    assert meta == {"step": 4, "x": 2}
    train(fresh, fresh_optimizer, range(4, 6))
    got = weights(fresh)
    diff = max((got[k] - expected[k]).abs().max().item() for k in expected)
    assert diff == 0.0, (
        f"reload + 2 steps must equal 2 steps straight on (same ops, same order); max |diff| {diff}"
    )

    checkpoint.save_checkpoint(
        tmp_path, step=6, model=model, optimizer=optimizer, meta={}, world=world, keep=2
    )
    names = sorted(p.name for p in checkpoint.checkpoint_root(tmp_path).iterdir())
    assert names == ["step_000004", "step_000006"], (
        f"keep=2 and the stale .tmp removed; found {names}"
    )


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint.*resume=false"):
        checkpoint.latest_checkpoint(tmp_path)
