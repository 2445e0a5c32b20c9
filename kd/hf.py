"""Hugging Face model directories in and out: config.json + safetensors (single or sharded).

The format is what `transformers`' `save_pretrained` writes: `config.json`, then either
`model.safetensors` or shards `model-0000i-of-0000n.safetensors` listed in
`model.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map": {key: file}}).
Tensor names are transformers' names, which `kd.model.Transformer` uses too, so loading is
a strict key-for-key copy: no renaming, no permutation. A tied checkpoint has no
`lm_head.weight`; an untied one must have it.

    model = load_model("models/smollm2-135m-instruct", dtype=torch.bfloat16)
    save_model(model, "out/student", tokenizer_from="models/smollm2-135m-instruct")

Saving is atomic: everything goes into a temporary directory beside the target, which then
takes the target's place, so an interrupted save never leaves a half-written model where a
good one was. config.json is read and written by kd/hf_config.py; tokenizers are loaded by
kd/tokenizer.py, here they are only copied.

Tests: `.venv/bin/python -m pytest -q tests/test_hf.py tests/test_model.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from kd.hf_config import config_to_dict, load_config
from kd.model import Transformer
from kd.model_config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def _read_safetensors(
    file: Path, keys: list[str] | None, *, dtype: torch.dtype | None, device: str | torch.device
) -> dict[str, Tensor]:
    """Tensors `keys` (None = all) of one file, read through a memory map one at a time."""
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: the checkpoint is incomplete; re-download or re-export it"
        )
    out = {}
    try:
        with safe_open(file, framework="pt", device=str(device)) as f:
            present = set(f.keys())
            for key in present if keys is None else keys:
                if key not in present:
                    raise ValueError(
                        f"{file} lacks tensor {key!r} that {INDEX_FILE} maps to it; re-export it"
                    )
                t = f.get_tensor(key)
                out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    except ValueError:
        raise
    # safetensors raises its own SafetensorError on a bad header or a short file.
    except Exception as e:
        raise ValueError(
            f"{file} is not a readable safetensors file ({e}); re-download or re-export it"
        ) from None
    return out


def load_state_dict(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """All tensors of a HF directory (single file or shards), floating ones cast to `dtype`."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path / INDEX_FILE} has no readable weight_map ({e!r}); re-export it"
            ) from None
        by_file: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            by_file.setdefault(file, []).append(key)
        state_dict = {}
        for file, keys in sorted(by_file.items()):
            state_dict.update(_read_safetensors(path / file, keys, dtype=dtype, device=device))
        return state_dict
    if (path / SINGLE_FILE).is_file():
        return _read_safetensors(path / SINGLE_FILE, None, dtype=dtype, device=device)
    raise FileNotFoundError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {path}: not a safetensors HF checkpoint"
    )


def check_state_dict(
    state_dict: dict[str, Tensor], model: Transformer, source: str
) -> dict[str, Tensor]:
    """state_dict with exactly `model`'s keys and shapes, or a one-line ValueError saying what
    differs."""
    # Checkpoints from transformers versions that stored the RoPE frequencies carry a
    # `rotary_emb.inv_freq` buffer; the model recomputes them from the config.
    sd = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    # A tied model has no lm_head; some tied checkpoints still carry a copy of the embeddings.
    head, embed = sd.get("lm_head.weight"), sd.get("model.embed_tokens.weight")
    if (
        model.lm_head is None
        and head is not None
        and embed is not None
        and torch.equal(head, embed)
    ):
        del sd["lm_head.weight"]
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:

        def some(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" ... ({len(keys) - 4} more)" if len(keys) > 4 else "")

        parts = ([f"missing {len(missing)} tensor(s): {some(missing)}"] if missing else []) + (
            [f"unexpected {len(unexpected)} tensor(s): {some(unexpected)}"] if unexpected else []
        )
        tie = f"tie_word_embeddings={model.config.tie_word_embeddings}"
        raise ValueError(f"{source} does not match its config ({tie}): {'; '.join(parts)}")
    for key, t in sd.items():
        if t.shape != expected[key].shape:
            raise ValueError(
                f"{source}: tensor {key} has shape {tuple(t.shape)}, "
                f"config.json implies {tuple(expected[key].shape)}"
            )
    return sd


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a HF directory, in order."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        try:
            files = set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"{path / INDEX_FILE} has no readable weight_map ({e!r}); re-export it"
            ) from None
        return [path / f for f in sorted(files)]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise FileNotFoundError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {path}: not a safetensors HF checkpoint"
    )


# Bytes of tensor data a fingerprint reads per file: SAMPLES evenly spaced runs of SAMPLE_BYTES.
SAMPLES, SAMPLE_BYTES = 16, 1 << 16


def fingerprint(path: str | Path) -> str:
    """A cheap identity of a HF model directory: sha256 over config.json (as canonical JSON)
    and, per safetensors file, its name, size, header (every tensor's name, dtype, shape and
    offsets) and 16 evenly spaced 64 KiB runs of its tensor data.

    About 1 MiB read per file, so a 70B teacher takes seconds where a full hash would take
    minutes. Two checkpoints differ here if they differ in any config key, tensor shape or
    sampled byte: another model of the same architecture (a fine-tune changes every weight)
    is told apart; a change confined to bytes between the samples is not.
    """
    path = Path(path)
    h = hashlib.sha256()
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / 'config.json'}: cannot read it ({e})") from None
    h.update(json.dumps(config, sort_keys=True).encode())
    for file in weight_files(path):
        size = file.stat().st_size
        with open(file, "rb") as f:
            header_bytes = int.from_bytes(f.read(8), "little")
            start = 8 + header_bytes
            h.update(f"{file.name} {size}".encode() + f.read(header_bytes))
            data = max(size - start, 0)
            for i in range(SAMPLES):
                f.seek(start + data * i // SAMPLES)
                h.update(f.read(min(SAMPLE_BYTES, data)))
    return h.hexdigest()


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
) -> Transformer:
    """Build on the meta device, check keys and shapes, then adopt the loaded tensors
    (assign=True).

    dtype None keeps each tensor's stored dtype. The model is returned in training mode, as
    any fresh nn.Module; call .eval() / .requires_grad_(False) for a teacher.
    """
    config = load_config(path)
    with torch.device("meta"):
        model = Transformer(config)
    state_dict = check_state_dict(
        load_state_dict(path, dtype=dtype, device=device), model, str(path)
    )
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def _shards(state_dict: dict[str, Tensor], max_shard_bytes: int) -> list[dict[str, Tensor]]:
    """Split into consecutive groups of at most max_shard_bytes (a bigger single tensor gets its
    own group)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def _write(
    state_dict: dict[str, Tensor],
    config: ModelConfig,
    out: Path,
    *,
    max_shard_bytes: int,
    tokenizer_from: Path | None,
) -> None:
    """Write a complete HF directory into the (empty) directory `out`."""
    shards = _shards(state_dict, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = (
            SINGLE_FILE
            if len(shards) == 1
            else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        # safetensors wants contiguous CPU tensors that share no storage (the tie is already gone).
        tensors = {k: t.detach().to("cpu").contiguous() for k, t in shard.items()}
        try:
            save_file(tensors, out / name, metadata={"format": "pt"})
        except Exception as e:  # a failed write (a full disk) is safetensors' own error type
            raise OSError(f"{out / name} could not be written ({e})") from None
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    dtype = str(state_dict["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    hf_config = config_to_dict(dataclasses.replace(config, torch_dtype=dtype))
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    # generation_config.json tells transformers' generate() which ids end a sequence.
    generation = {
        k: getattr(config, k)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if getattr(config, k) is not None
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                shutil.copy2(tokenizer_from / name, out / name)


def save_state_dict(
    state_dict: dict[str, Tensor],
    config: ModelConfig,
    path: str | Path,
    *,
    max_shard_bytes: int = 2 * 2**30,
    tokenizer_from: str | Path | None = None,
) -> None:
    """Write a full state dict (e.g. gathered on rank 0) as a HF directory at `path`, atomically.

    The new directory is written beside the target under a temporary name, then renamed into
    place; an existing target is moved aside first and deleted only once the new one is in
    place, so a failure at any point leaves the old model intact (at worst under its aside
    name `.<name>.old-*` if the process dies between the two renames).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory; choose another output path")
    if tokenizer_from is not None:
        tokenizer_from = Path(tokenizer_from)
        if not tokenizer_from.is_dir():
            raise FileNotFoundError(f"tokenizer_from={tokenizer_from} is not a directory")
    with torch.device("meta"):
        skeleton = Transformer(config)
    state_dict = check_state_dict(state_dict, skeleton, "state dict to save")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        _write(
            state_dict, config, tmp, max_shard_bytes=max_shard_bytes, tokenizer_from=tokenizer_from
        )
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a model directory is normally world-readable
        if path.exists():
            aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, aside / path.name)
            os.replace(tmp, path)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_model(
    model: Transformer,
    path: str | Path,
    *,
    max_shard_bytes: int = 2 * 2**30,
    tokenizer_from: str | Path | None = None,
) -> None:
    """save_state_dict of the model's own weights and config; transformers loads the result."""
    save_state_dict(
        model.state_dict(),
        model.config,
        path,
        max_shard_bytes=max_shard_bytes,
        tokenizer_from=tokenizer_from,
    )
