"""scripts/gemma3_text.py: Gemma 3's image-text checkpoints give a text model kd and transformers
load, with the image-text model's text logits.

A tiny random Gemma3ForConditionalGeneration (transformers builds and saves it, single-file and
sharded) is converted; kd's `load_model` and transformers' AutoModelForCausalLM must give the
logits of the image-text model's text-only forward. Also covered: transformers' in-memory
prefix `model.language_model.`, an untied head and a tied copy of the embeddings, a Hub-style
text_config that lists only non-default keys, dtypes kept (bf16 stays bf16), tokenizer files
copied, and each refusal as one `error:` line (exit status 1).

Run: `.venv/bin/python -m pytest -q tests/test_gemma3_text.py`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
)

from kd.hf import INDEX_FILE, SINGLE_FILE, load_model
from kd.hf_config import load_config

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gemma3_text.py"
# One thread in the child as in this process (conftest.py's one_thread): tiny models.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
# fp32 and the same ops as transformers' own text model: room for BLAS blocking only.
PARITY_ATOL = 1e-4
TEXT = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=6,
    layer_types=["sliding_attention", "full_attention"],
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

# The script as a module, for the cases that need no fresh process (each costs ~2 s of imports).
_spec = importlib.util.spec_from_file_location("gemma3_text", SCRIPT)
gemma3_text = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gemma3_text)


def tiny_gemma3(tied: bool = True) -> Gemma3ForConditionalGeneration:
    """A seeded random image-text Gemma 3 whose norms are not at their init (0: x * (1 + 0))."""
    config = Gemma3Config(
        text_config={**TEXT, "tie_word_embeddings": tied},
        vision_config=VISION,
        mm_tokens_per_image=4,
        image_token_index=299,
        boi_token_index=297,
        eoi_token_index=298,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # a norm that is never loaded would then show
                p.add_(torch.randn_like(p), alpha=0.1)
    return model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    # Below the image/boi/eoi ids (297..299): a text-only prompt.
    return torch.randint(0, 296, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tied(tmp_path_factory, ids) -> tuple[Path, Path, torch.Tensor]:
    """The tied model saved single-file and in ~40 KB shards, and its text-only logits."""
    root = tmp_path_factory.mktemp("gemma3")
    model = tiny_gemma3()
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    # Tokenizer files are copied byte for byte; the image processor's are not.
    (root / "single" / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    (root / "single" / "chat_template.jinja").write_text("{{ messages }}\n")
    (root / "single" / "preprocessor_config.json").write_text("{}\n")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return root / "single", root / "sharded", logits


def run_script(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=120,
    )


def max_diff(out: Path, ids: torch.Tensor, want: torch.Tensor, *, theirs: bool = True) -> float:
    """Largest |logit difference| of kd's (and transformers') load of `out` from `want`."""
    with torch.no_grad():
        diffs = [(load_model(out).eval()(ids) - want).abs().max().item()]
        if theirs:
            # fp32 as ours: transformers' default dtype "auto" would load a bf16 file in bf16.
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            diffs.append((model(input_ids=ids).logits - want).abs().max().item())
    return max(diffs)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_text_model_has_the_image_text_models_logits(layout, tied, ids, tmp_path):
    single, sharded, want = tied
    src = single if layout == "single" else sharded
    out = tmp_path / "text"
    if layout == "single":  # the command line, once; in-process after (saves ~2 s of imports)
        result = run_script(src, out)
        assert result.returncode == 0, result.stderr
        assert "kept 28 tensors" in result.stdout and str(out) in result.stdout, result.stdout
    else:
        gemma3_text.main([str(src), str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == [
        "Gemma3ForCausalLM"
    ]
    if layout == "single":
        assert (out / SINGLE_FILE).is_file() and not (out / INDEX_FILE).exists()
        for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            assert (out / name).read_bytes() == (src / name).read_bytes(), name
        assert not (out / "preprocessor_config.json").exists()
    else:
        index = json.loads((out / INDEX_FILE).read_text())
        files = set(index["weight_map"].values())
        # One output shard per input shard holding text tensors; the vision-only ones give none.
        assert 1 < len(files) < len(json.loads((src / INDEX_FILE).read_text())["weight_map"])
        total = sum(
            t.numel() * t.element_size() for f in files for t in load_file(out / f).values()
        )
        assert index["metadata"]["total_size"] == total
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left
    diff = max_diff(out, ids, want)
    assert diff < PARITY_ATOL, f"{layout}: max |logit diff| {diff}"


def internal_name(key: str) -> str:
    """The in-memory name transformers gives the checkpoint tensor `key`."""
    if key.startswith("language_model.model."):
        return "model.language_model." + key.removeprefix("language_model.model.")
    return "model." + key


def test_transformers_in_memory_prefix(tied, ids, tmp_path):
    single, _, want = tied
    src = tmp_path / "internal"
    src.mkdir()
    (src / "config.json").write_bytes((single / "config.json").read_bytes())
    # transformers' module names (its checkpoint_conversion_mapping for Gemma 3, reversed):
    # model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*
    tensors = load_file(single / SINGLE_FILE)
    save_file({internal_name(k): t for k, t in tensors.items()}, src / SINGLE_FILE)
    gemma3_text.main([str(src), str(tmp_path / "text")])
    diff = max_diff(tmp_path / "text", ids, want, theirs=False)
    assert diff < PARITY_ATOL, f"max |logit diff| {diff}"


@pytest.mark.parametrize("head", ["untied", "tied_copy"])
def test_lm_head(head, tied, ids, tmp_path):
    """An untied head is kept; a tied checkpoint's copy of the embeddings is dropped."""
    src = tmp_path / "in"
    if head == "untied":
        model = tiny_gemma3(tied=False)
        model.save_pretrained(src)
        with torch.no_grad():
            want = model(input_ids=ids).logits
    else:
        single, _, want = tied
        src.mkdir()
        (src / "config.json").write_bytes((single / "config.json").read_bytes())
        tensors = load_file(single / SINGLE_FILE)
        embed = tensors["language_model.model.embed_tokens.weight"]
        tensors["language_model.lm_head.weight"] = embed.clone()
        save_file(tensors, src / SINGLE_FILE)
    gemma3_text.main([str(src), str(tmp_path / "text")])
    with safe_open(tmp_path / "text" / SINGLE_FILE, framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) == (head == "untied")
    diff = max_diff(tmp_path / "text", ids, want)
    assert diff < PARITY_ATOL, f"{head}: max |logit diff| {diff}"


def test_hub_style_text_config_and_bf16(tied, ids, tmp_path):
    """A text_config of only the keys that differ from Gemma3TextConfig's defaults (as on the
    Hub) gives a complete config.json; bf16 tensors stay bf16."""
    single, _, _ = tied
    model = tiny_gemma3().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "in")
    config = json.loads((tmp_path / "in" / "config.json").read_text())
    defaults = Gemma3TextConfig().to_dict()
    sparse = {k: v for k, v in config["text_config"].items() if defaults.get(k) != v}
    assert "rope_parameters" not in sparse and "query_pre_attn_scalar" not in sparse, sparse
    config["text_config"] = {**sparse, "model_type": "gemma3_text"}
    config.pop("dtype")
    config["torch_dtype"] = "bfloat16"  # the Hub's spelling, at the top level only
    (tmp_path / "in" / "config.json").write_text(json.dumps(config))
    gemma3_text.main([str(tmp_path / "in"), str(tmp_path / "text")])
    written = json.loads((tmp_path / "text" / "config.json").read_text())
    for key in ("rope_parameters", "query_pre_attn_scalar", "vocab_size", "rms_norm_eps"):
        assert key in written, key
    assert written["dtype"] == "bfloat16" and written["tie_word_embeddings"] is True
    assert {t.dtype for t in load_file(tmp_path / "text" / SINGLE_FILE).values()} == {
        torch.bfloat16
    }
    with torch.no_grad():
        want = model.float()(input_ids=ids).logits
    diff = max_diff(tmp_path / "text", ids, want)
    assert diff < PARITY_ATOL, f"max |logit diff| {diff}"


def test_overwrite(tied, tmp_path):
    single, _, _ = tied
    out = tmp_path / "text"
    out.mkdir()
    (out / "old.txt").write_text("old")
    gemma3_text.main([str(single), str(out), "--overwrite"])
    assert not (out / "old.txt").exists() and (out / SINGLE_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text"]  # nothing aside left


def test_refusals_are_one_line(tied, tmp_path):
    single, sharded, _ = tied
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    # The command line: exit status 1 and one line on stderr.
    result = run_script(single, full)
    assert result.returncode == 1, result.stderr
    err = result.stderr
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{full} exists and is not empty; pass --overwrite" in err, err
    # The rest in-process: main exits with the line as sys.exit's message (printed, status 1).
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    (text_dir / "config.json").write_text('{"model_type": "gemma3_text"}')
    broken = tmp_path / "broken"  # the sharded checkpoint less one shard
    broken.mkdir()
    missing = sorted(set(json.loads((sharded / INDEX_FILE).read_text())["weight_map"].values()))[2]
    for p in sharded.iterdir():
        if p.name != missing:
            (broken / p.name).symlink_to(p)
    cases = [
        ([text_dir, tmp_path / "o1"], "already a text model; kd loads it directly"),
        ([tmp_path / "none", tmp_path / "o2"], f"{tmp_path / 'none'} is not a directory"),
        ([broken, tmp_path / "o3"], f"{missing} not found"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_:
            gemma3_text.main([str(a) for a in args])
        line = exit_.value.code
        assert isinstance(line, str) and line.startswith("error: ") and "\n" not in line, line
        assert message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "full", "text"]


def test_kd_refuses_the_image_text_model(tied):
    with pytest.raises(ValueError, match="scripts/gemma3_text.py"):
        load_config(tied[0])
