"""Extract the language model of a Gemma 3 image-text checkpoint as a text-only HF directory.

    .venv/bin/python scripts/gemma3_text.py models/gemma-3-4b-it models/gemma-3-4b-it-text
    .venv/bin/python scripts/gemma3_text.py IN OUT --overwrite   # replace an existing OUT

Gemma 3 4B, 12B and 27B are Gemma3ForConditionalGeneration checkpoints (config.json
model_type "gemma3"): a SigLIP vision tower, a projector and a gemma3_text language model whose
config is the nested "text_config". kd distills text models (kd/hf.py loads model_type
gemma3_text only), so this writes OUT as the Gemma3ForCausalLM directory transformers and kd
load, with the same text logits as the image-text model given no image:
- Tensors: `language_model.model.X` (what the Hub files and transformers' save_pretrained
  hold) or `model.language_model.X` (transformers' in-memory names) become `model.X`;
  `language_model.lm_head.weight` or `lm_head.weight` becomes `lm_head.weight`, dropped when
  the text model ties it to the embeddings (Gemma 3's default); vision_tower.* and
  multi_modal_projector.* are dropped. Dtypes are kept (a bf16 checkpoint stays bf16).
- config.json: text_config with model_type gemma3_text, plus the top level's
  tie_word_embeddings, dtype and token ids where text_config lacks them, written with every
  default explicit (Hub text_configs list only the keys that differ from transformers'
  Gemma3TextConfig defaults). Tokenizer files and generation_config.json are copied.
- Streaming: one input shard is in memory at a time (a 27B checkpoint is ~55 GB in bf16); each
  input shard holding text tensors gives one output shard, listed in
  model.safetensors.index.json (one shard in all is named model.safetensors).
Keys and shapes are checked against kd's model for the text config before anything is written.
OUT is written beside itself under a temporary name and renamed into place, so it is either
whole or absent. A missing or wrong IN, a missing shard, or an existing OUT (without
--overwrite) ends in one `error:` line (exit status 1).

Tests: `.venv/bin/python -m pytest -q tests/test_gemma3_text.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: import kd

from kd.hf import (  # noqa: E402
    INDEX_FILE,
    SINGLE_FILE,
    TOKENIZER_FILES,
    check_state_dict,
    weight_files,
)
from kd.hf_config import config_from_dict, config_to_dict, load_config  # noqa: E402
from kd.model import Transformer  # noqa: E402
from kd.model_config import ModelConfig  # noqa: E402

# Where the text model's tensors live: the Hub's (and save_pretrained's) names, then
# transformers' in-memory ones. Anything else (vision_tower, multi_modal_projector) is dropped.
PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model."}
HEADS = ("language_model.lm_head.weight", "lm_head.weight")
# Top-level keys the text model inherits where text_config lacks them: Hub configs keep some at
# the top only (gemma-3-4b-it: torch_dtype, and eos_token_id [1, 106] with end-of-turn).
INHERITED = (
    "tie_word_embeddings",
    "torch_dtype",
    "dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# Gemma's SentencePiece model and extra tokens ride along with kd's tokenizer files (for a slow
# tokenizer); the image processor's files do not.
COPIED = (*TOKENIZER_FILES, "tokenizer.model", "added_tokens.json", "generation_config.json")


def text_key(key: str) -> str | None:
    """The text model's name for a checkpoint tensor, or None for one the text model lacks."""
    if key in HEADS:
        return "lm_head.weight"
    if key.endswith("rotary_emb.inv_freq"):  # an old transformers' buffer: recomputed on load
        return None
    for prefix, new in PREFIXES.items():
        if key.startswith(prefix):
            return new + key.removeprefix(prefix)
    return None


def read_text_config(in_dir: Path) -> dict:
    """The text model's config.json dict: text_config plus what it inherits from the top."""
    config_file = in_dir / "config.json"
    if not in_dir.is_dir():
        raise FileNotFoundError(f"{in_dir} is not a directory: give a Gemma 3 HF model directory")
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {in_dir} is not a HF model directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON ({e})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind == "gemma3_text":
        raise ValueError(
            f"{config_file}: model_type gemma3_text is already a text model; kd loads it "
            "directly (no conversion needed)"
        )
    if kind != "gemma3":
        raise ValueError(
            f"{config_file}: model_type {json.dumps(kind)} is not gemma3; this script extracts "
            "the language model of a Gemma 3 image-text checkpoint (Gemma3ForConditionalGeneration)"
        )
    text = config.get("text_config")
    if text is None:  # transformers' Gemma3Config then takes Gemma3TextConfig's defaults
        text = {}
    if not isinstance(text, dict):
        raise ValueError(f"{config_file}: config key text_config must be an object, not {text!r}")
    text = {**text, "model_type": "gemma3_text"}
    for key in INHERITED:
        if key in config and key not in text:
            text[key] = config[key]
    return text


def plan(in_dir: Path, files: list[Path]) -> tuple[list[tuple[Path, dict[str, str]]], dict, int]:
    """Per input file, its text tensors {checkpoint name: text name}; every text tensor's shape;
    the number of tensors dropped. From the headers only: no tensor data is read."""
    per_file, shapes, sources, dropped = [], {}, {}, 0
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} not found: the checkpoint {in_dir} is incomplete; re-download it"
            )
        renames = {}
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    new = text_key(key)
                    if new is None:
                        dropped += 1
                        continue
                    if new in sources:
                        raise ValueError(
                            f"{file}: tensors {sources[new]} and {key} both map to {new}; "
                            "the checkpoint mixes two layouts, re-download it"
                        )
                    renames[key], sources[new] = new, key
                    shapes[new] = tuple(f.get_slice(key).get_shape())
        except ValueError:
            raise
        except Exception as e:  # safetensors reports a bad header as its own error type
            raise ValueError(
                f"{file} is not a readable safetensors file ({e}); re-download it"
            ) from None
        per_file.append((file, renames))
    if not shapes:
        raise ValueError(
            f"no text tensors in {in_dir} (none named language_model.model.* or "
            "model.language_model.*): not a Gemma 3 image-text checkpoint"
        )
    return per_file, shapes, dropped


def _tensor(per_file: list[tuple[Path, dict[str, str]]], name: str) -> torch.Tensor:
    """One text tensor, read alone from its file."""
    for file, renames in per_file:
        for key, new in renames.items():
            if new == name:
                with safe_open(file, framework="pt") as f:
                    return f.get_tensor(key)
    raise KeyError(name)


def drop_tied_head(per_file: list, shapes: dict, config: ModelConfig) -> int:
    """Remove lm_head from the plan when the text model ties it to the embeddings; the number
    removed (0 or 1)."""
    if not config.tie_word_embeddings or "lm_head.weight" not in shapes:
        return 0
    if "model.embed_tokens.weight" not in shapes:
        return 0  # the key check that follows names what is missing
    if not torch.equal(
        _tensor(per_file, "lm_head.weight"), _tensor(per_file, "model.embed_tokens.weight")
    ):
        # transformers ties them all the same (the head is the embeddings), so the text model
        # that computes what the image-text model computed has no separate head.
        print(
            "warning: lm_head.weight differs from the embeddings but text_config ties them "
            "(tie_word_embeddings true): it is dropped, as transformers ignores it",
            file=sys.stderr,
        )
    for _, renames in per_file:
        for key in [k for k, new in renames.items() if new == "lm_head.weight"]:
            del renames[key]
    del shapes["lm_head.weight"]
    return 1


def write_dir(tmp: Path, in_dir: Path, per_file: list, config: ModelConfig) -> tuple[int, int]:
    """Write the text model into the empty directory `tmp`, one input shard in memory at a time;
    the number of files and bytes of tensor data written."""
    inputs = [(file, renames) for file, renames in per_file if renames]
    weight_map, total = {}, 0
    for i, (file, renames) in enumerate(inputs):
        name = (
            SINGLE_FILE
            if len(inputs) == 1
            else f"model-{i + 1:05d}-of-{len(inputs):05d}.safetensors"
        )
        with safe_open(file, framework="pt") as f:
            tensors = {new: f.get_tensor(key) for key, new in renames.items()}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        try:
            save_file(tensors, tmp / name, metadata={"format": "pt"})
        except Exception as e:  # a failed write (a full disk) is safetensors' own error type
            raise OSError(
                f"cannot write {name} in {tmp.parent} ({e}); free space or choose another OUT "
                "(nothing was left behind)"
            ) from None
        del tensors  # the next shard's tensors replace these, never join them
        weight_map.update(dict.fromkeys(renames.values(), name))
    if len(inputs) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
    for name in COPIED:
        if (in_dir / name).is_file():
            shutil.copyfile(in_dir / name, tmp / name)
    for f in tmp.iterdir():
        f.chmod(0o644)  # save_file and mkdtemp make things private; a model is world-readable
    tmp.chmod(0o755)
    return len(inputs), total


def place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is moved aside first and deleted only once the
    new one is in place (as kd.hf.save_state_dict does)."""
    if out.exists() and any(out.iterdir()):
        aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, aside / out.name)
        os.replace(tmp, out)
        shutil.rmtree(aside)
    else:
        os.replace(tmp, out)  # rename(2) replaces an empty directory


def convert(in_dir: Path, out: Path, *, overwrite: bool = False) -> None:
    """Write the language model of the Gemma 3 checkpoint `in_dir` as a HF directory `out`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; choose another OUT")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; pass --overwrite to replace it")
    if out.resolve() == in_dir.resolve():
        raise ValueError(f"OUT {out} is IN: choose another OUT, IN is read while OUT is written")
    text = read_text_config(in_dir)
    per_file, shapes, dropped = plan(in_dir, weight_files(in_dir))  # a missing shard: fail first
    config = config_from_dict(text, where=f"{in_dir / 'config.json'} text_config")
    tied = drop_tied_head(per_file, shapes, config)
    # Keys and shapes against kd's model, on meta tensors: a mismatch fails before any write.
    with torch.device("meta"):
        skeleton = Transformer(config)
        check_state_dict(
            {k: torch.empty(s) for k, s in shapes.items()}, skeleton, f"{in_dir}'s text model"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        n_files, total = write_dir(tmp, in_dir, per_file, config)
        place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    load_config(out)  # what kd reads first; cheap (the weights were checked above)
    print(
        f"gemma3_text: kept {len(shapes)} tensors ({total / 2**20:.1f} MiB in {n_files} "
        f"file(s)), dropped {dropped} (vision tower, projector)"
        + (" and lm_head (a copy of the tied embeddings)" if tied else "")
        + f": {out}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", metavar="IN", help="Gemma 3 image-text HF directory")
    parser.add_argument("output", metavar="OUT", help="text-only HF directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = parser.parse_args(argv)
    try:
        convert(Path(args.input), Path(args.output), overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError, a read-only or full disk
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
