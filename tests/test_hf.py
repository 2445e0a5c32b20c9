"""kd/hf.py: bad checkpoints fail with one-line errors naming the file or key; saving
round-trips and is atomic.

Checks: missing config.json / safetensors / shard, truncated safetensors, unknown model_type,
unsupported RoPE scaling, wrong shape, missing and unexpected tensors each raise a one-line
FileNotFoundError/ValueError that names the culprit; save_model -> load_model returns the same
tensors (single file and shards), drops the tied head, copies tokenizer files; an existing
output directory survives a save that fails halfway and is replaced by one that succeeds.
(Parity of saved models with transformers is in tests/test_model.py.)

Run: `.venv/bin/python -m pytest -q tests/test_hf.py`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kd.hf import load_model, load_state_dict, save_model, save_state_dict
from kd.hf_config import load_config
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tied") / "m", "llama")


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("untied") / "m", "llama3")


@pytest.fixture
def copy_of(tmp_path):
    """A scratch copy of a checkpoint directory that a test may break."""

    def copy(src: Path) -> Path:
        return Path(shutil.copytree(src, tmp_path / "broken"))

    return copy


def one_line_error(exc_type: type[Exception], fn, *args) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, f"error spans several lines: {message!r}"
    return message


def rewrite_tensors(path: Path, edit) -> None:
    """Apply edit(state_dict) to the single-file checkpoint at path."""
    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_config_json(tmp_path):
    message = one_line_error(FileNotFoundError, load_model, tmp_path)
    assert str(tmp_path / "config.json") in message
    assert str(tmp_path / "config.json") in one_line_error(FileNotFoundError, load_config, tmp_path)


def test_missing_safetensors(tied_dir, copy_of):
    path = copy_of(tied_dir)
    (path / "model.safetensors").unlink()
    message = one_line_error(FileNotFoundError, load_model, path)
    assert "model.safetensors" in message and str(path) in message


def test_missing_shard(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "m", "llama", max_shard_size="30KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert str(shard) in one_line_error(FileNotFoundError, load_state_dict, path)


def test_truncated_safetensors(tied_dir, copy_of):
    path = copy_of(tied_dir)
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    assert str(file) in one_line_error(ValueError, load_model, path)


def test_unknown_model_type(tied_dir, copy_of):
    path = copy_of(tied_dir)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    message = one_line_error(ValueError, load_model, path)
    assert "model_type='gpt_neox'" in message and "llama" in message


def test_unsupported_rope_scaling(tied_dir, copy_of):
    path = copy_of(tied_dir)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(config))
    assert "rope_scaling.rope_type='yarn'" in one_line_error(ValueError, load_model, path)


def test_wrong_shape(tied_dir, copy_of):
    path = copy_of(tied_dir)
    key = "model.layers.1.mlp.up_proj.weight"
    rewrite_tensors(path, lambda sd: sd.__setitem__(key, sd[key][:-1].clone()))
    message = one_line_error(ValueError, load_model, path)
    assert key in message and "(127, 64)" in message and "(128, 64)" in message


def test_missing_tensor_untied_needs_lm_head(untied_dir, copy_of):
    path = copy_of(untied_dir)
    rewrite_tensors(path, lambda sd: sd.pop("lm_head.weight"))
    message = one_line_error(ValueError, load_model, path)
    assert (
        "missing 1 tensor(s): lm_head.weight" in message and "tie_word_embeddings=False" in message
    )


def test_unexpected_tensor(tied_dir, copy_of):
    path = copy_of(tied_dir)
    rewrite_tensors(
        path, lambda sd: sd.__setitem__("model.layers.9.mlp.up_proj.weight", torch.zeros(2))
    )
    assert "unexpected 1 tensor(s): model.layers.9.mlp.up_proj.weight" in one_line_error(
        ValueError, load_model, path
    )


def test_tied_checkpoint_may_carry_an_identical_head(tied_dir, copy_of):
    path = copy_of(tied_dir)
    rewrite_tensors(
        path, lambda sd: sd.__setitem__("lm_head.weight", sd["model.embed_tokens.weight"].clone())
    )
    model = load_model(path)
    assert model.lm_head is None
    rewrite_tensors(
        path, lambda sd: sd.__setitem__("lm_head.weight", torch.zeros_like(sd["lm_head.weight"]))
    )
    assert "unexpected 1 tensor(s): lm_head.weight" in one_line_error(ValueError, load_model, path)


@pytest.mark.parametrize("max_shard_bytes", [2**30, 40_000])
def test_save_then_load_round_trip(untied_dir, tied_dir, tmp_path, max_shard_bytes):
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    # Saving only copies the file (kd/tokenizer.py is what parses it), so any content will do.
    (tokenizer_dir / "tokenizer.json").write_text("{}")
    for src in (untied_dir, tied_dir):
        model = load_model(src)
        out = tmp_path / src.parent.name
        save_model(model, out, max_shard_bytes=max_shard_bytes, tokenizer_from=tokenizer_dir)
        sharded = (out / "model.safetensors.index.json").exists()
        assert sharded == (max_shard_bytes < 2**30), sorted(p.name for p in out.iterdir())
        assert (out / "tokenizer.json").read_text() == "{}"
        assert ("lm_head.weight" in load_state_dict(out)) == (model.lm_head is not None)
        again = load_model(out)
        assert again.config == model.config
        for key, t in model.state_dict().items():
            assert torch.equal(t, again.state_dict()[key]), f"{key} changed in the round trip"


def test_save_bf16_records_dtype(tied_dir, tmp_path):
    model = load_model(tied_dir, dtype=torch.bfloat16)
    save_model(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(tmp_path / "bf16", dtype=None).head_weight.dtype == torch.bfloat16


def test_save_is_atomic(tied_dir, tmp_path):
    """A save that dies after writing a shard leaves the old directory as it was."""
    model = load_model(tied_dir)
    out = tmp_path / "out"
    save_model(model, out)
    (out / "marker.txt").write_text("old")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A meta tensor cannot be copied to the CPU: the real failure happens while writing the
    # last shard, after the earlier shards are already on disk in the temporary directory.
    sd = model.state_dict()
    key = list(sd)[-1]
    broken = {**sd, key: torch.empty(sd[key].shape, device="meta")}
    with pytest.raises(NotImplementedError):
        save_state_dict(broken, model.config, out, max_shard_bytes=40_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "old directory changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temporary directory left behind"
    save_model(model, out, max_shard_bytes=40_000)
    assert not (out / "marker.txt").exists() and (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "old directory left behind"
