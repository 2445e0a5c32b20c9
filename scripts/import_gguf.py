"""Import a llama.cpp GGUF model (llama or qwen2 architecture) as an HF model directory.

    .venv/bin/python scripts/import_gguf.py MODEL.gguf OUT_DIR [--dtype bfloat16|float32]

Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
generation_config.json, loadable by `transformers` (AutoModelForCausalLM, AutoTokenizer) and by
kd (kd/hf.py, kd/tokenizer.py). `make teacher` runs it on SmolLM2-135M-Instruct (Q4_1).

What it undoes (GGUF format: github.com/ggml-org/ggml/blob/master/docs/gguf.md):
- Quantization: every tensor is dequantized to fp32 by `gguf.quants.dequantize`, then stored in
  --dtype. A dequantized Q4_1 weight is d * q + m with fp16 d, m; bf16 rounds that to 8 bits of
  mantissa. Measured on tests/test_gguf.py's English text, SmolLM2-135M perplexity is 7.13 from
  bf16 and 7.14 from fp32, so bf16 (half the disk, 260 MiB) is the default.
- The Q/K row permutation: llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute)
  reorders each head's rows of q_proj and k_proj from HF's rotate-half RoPE layout to the
  interleaved-pairs layout ggml's rope kernel wants:
      w.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(w.shape)
  i.e. rows (h, half, i) -> (h, i, half). The inverse reshapes to (n_head, head_dim // 2, 2) and
  swaps back. K uses the KV head count. Qwen2 GGUFs are not permuted (llama.cpp runs qwen2 with
  NEOX = rotate-half RoPE). Forgetting it fails quietly: perplexity ~43 instead of ~10.
- The tokenizer: a byte-level BPE rebuilt from tokenizer.ggml.tokens and merges, with the
  pre-tokenizer llama.cpp names in tokenizer.ggml.pre; control tokens (token_type 3) become
  special added tokens, user-defined ones (4) plain added tokens.
The directory is written beside OUT_DIR under a temporary name and renamed into place, so an
interrupted import never leaves a half-written OUT_DIR. A truncated GGUF, a directory given as
the GGUF, or a read-only or full output folder ends in one `error:` line naming the path (exit
status 1), with nothing left behind.
"""

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# llama.cpp token types (gguf.TokenType): 1 normal, 3 control, 4 user-defined.
CONTROL, USER_DEFINED = 3, 4

# Split regexes of the llama.cpp pre-tokenizers we support (llama-vocab.cpp), as HF writes them.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"  # Qwen2: single digits
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"  # Llama 3: up to 3 digits
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF tensor names -> HF names (per block: blk.{i}.NAME -> model.layers.{i}.HF_NAME).
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def read_gguf(path: Path) -> tuple[gguf.GGUFReader, dict[str, Any]]:
    """Open a GGUF file; return the reader and its metadata as plain Python values.

    A file cut short (an interrupted download) is a ValueError naming it: gguf's reader fails
    inside numpy (reshape, view) on it, with messages that name no file.
    """
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a GGUF file: give the path of the .gguf file")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (run `make teacher` to download the default teacher)"
        )
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(
                f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)"
            )
    damaged = f"{path} is truncated or damaged ({{}}): download or convert it again"
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as e:  # numpy's, on short arrays
        raise ValueError(damaged.format(e)) from None
    size = path.stat().st_size
    if reader.tensors and (end := max(t.data_offset + t.n_bytes for t in reader.tensors)) > size:
        raise ValueError(damaged.format(f"{size} bytes, its tensors end at byte {end}"))
    meta = {
        key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")
    }
    arch = meta.get("general.architecture")
    if arch not in HF_CLASSES:
        raise ValueError(
            f"{path}: architecture {arch!r} is not supported (supported: {', '.join(HF_CLASSES)})"
        )
    return reader, meta


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's per-head row order (h, i, half) into HF's (h, half, i); see the module
    docstring."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_name(name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; unknown names raise."""
    base, _, kind = name.rpartition(".")
    if match := re.fullmatch(r"blk\.(\d+)\.(\w+)", base):
        if match[2] in BLOCK_NAMES:
            return f"model.layers.{match[1]}.{BLOCK_NAMES[match[2]]}.{kind}"
    elif base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{kind}"
    raise ValueError(
        f"tensor {name!r} has no HF counterpart (rope scaling and other extras are not supported)"
    )


def convert_weights(
    reader: gguf.GGUFReader, meta: dict[str, Any], *, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Dequantize every tensor, rename it to HF and undo the llama Q/K permutation."""
    arch = meta["general.architecture"]
    n_head = meta[f"{arch}.attention.head_count"]
    n_kv_head = meta.get(f"{arch}.attention.head_count_kv", n_head)
    state = {}
    for i, tensor in enumerate(reader.tensors):
        # dequantize returns fp32 in torch's (out, in) order; tensor.shape is ggml's reversed order.
        w = torch.from_numpy(
            np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        )
        name = hf_tensor_name(tensor.name)
        if arch == "llama" and ".self_attn.q_proj." in name:
            w = unpermute_rows(w, n_head)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            w = unpermute_rows(w, n_kv_head)
        state[name] = w.to(dtype).contiguous()
        if (i + 1) % 50 == 0 or i + 1 == len(reader.tensors):
            print(f"  dequantized {i + 1}/{len(reader.tensors)} tensors", flush=True)
    return state


def hf_config(
    meta: dict[str, Any], state: dict[str, torch.Tensor], *, dtype: torch.dtype
) -> dict[str, Any]:
    """config.json in the Hub's format (as SmolLM2's and Qwen2's own config.json files are)."""
    arch = meta["general.architecture"]

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{name}; cannot write config.json")
        # GGUF floats are float32: write 1e-05, not 9.999999747378752e-06.
        return float(str(np.float32(value))) if isinstance(value, float) else value

    if meta.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise ValueError(f"rope scaling {meta[f'{arch}.rope.scaling.type']!r} is not supported")
    hidden, n_head = key("embedding_length"), key("attention.head_count")
    config = {
        "architectures": [HF_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": state["model.embed_tokens.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": key("attention.head_count_kv", n_head),
        "head_dim": key("attention.key_length", hidden // n_head),
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": key("rope.freq_base", 10000.0),
        "hidden_act": "silu",
        "tie_word_embeddings": "lm_head.weight" not in state,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if arch == "llama":  # Qwen2 always has q/k/v biases and no such keys
        config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in state
        config["mlp_bias"] = False
    else:
        config["use_sliding_window"] = False
    return config


def pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The HF pre-tokenizer for llama.cpp's tokenizer.ggml.pre name; unknown names raise."""
    # GPT-2's regex split, then bytes -> unicode symbols.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt-2"):
        return byte_level
    if pre == "smollm":  # every digit on its own, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("qwen2", "llama-bpe"):  # own regex split, then bytes -> unicode symbols only
        split = pre_tokenizers.Split(
            Regex(QWEN2_SPLIT if pre == "qwen2" else LLAMA3_SPLIT), behavior="isolated"
        )
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    raise ValueError(
        f"pre-tokenizer {pre!r} is not supported "
        "(supported: default, gpt-2, smollm, qwen2, llama-bpe)"
    )


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The byte-level BPE tokenizer.json described by the tokenizer.ggml.* metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(
            "tokenizer.ggml.tokens has duplicate tokens; cannot build a BPE vocabulary"
        )
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]  # "Ġ t" -> ("Ġ", "t")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    tok.pre_tokenizer = pre_tokenizer(pre)
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()  # as Qwen2's own tokenizer.json
    tok.decoder = decoders.ByteLevel()

    # Added tokens match before BPE runs; special ones are dropped by decode(skip_special_tokens).
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types)
            if kind == CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types)
            if kind == USER_DEFINED
        ]
    )

    # transformers 5 (and kd) add BOS/EOS from this post-processor alone, whatever
    # tokenizer_config.json says, so GGUF's add_bos_token / add_eos_token must live here.
    bos = (
        tokens[meta["tokenizer.ggml.bos_token_id"]]
        if meta.get("tokenizer.ggml.add_bos_token")
        else None
    )
    eos = (
        tokens[meta["tokenizer.ggml.eos_token_id"]]
        if meta.get("tokenizer.ggml.add_eos_token")
        else None
    )
    if bos or eos:
        single = (f"{bos}:0 " if bos else "") + "$A:0" + (f" {eos}:0" if eos else "")
        special = [(t, vocab[t]) for t in (bos, eos) if t]
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=f"{single} $B:1", special_tokens=special
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_files(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """tokenizer_config.json and generation_config.json from the GGUF's special-token metadata."""
    tokens = meta["tokenizer.ggml.tokens"]
    ids = {
        role: meta.get(f"tokenizer.ggml.{key}_token_id")
        for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))
    }
    chat_template = meta.get("tokenizer.chat_template")
    tokenizer_config = {
        # The generic fast tokenizer uses tokenizer.json as written; GPT2Tokenizer would
        # replace our pre-tokenizer (e.g. smollm's digit split) with plain byte-level.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{role}_token": tokens[i] for role, i in ids.items() if i is not None},
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta[f"{meta['general.architecture']}.context_length"],
    }
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    # Generation ends at eos, at end-of-turn ids llama.cpp records, and at ChatML's <|im_end|>.
    eos_ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    if chat_template is not None and "<|im_end|>" in chat_template and "<|im_end|>" in tokens:
        eos_ids.append(tokens.index("<|im_end|>"))
    eos_ids = sorted({i for i in eos_ids if i is not None})
    generation_config = {
        "bos_token_id": ids["bos"],
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "pad_token_id": ids["pad"],
    }
    return tokenizer_config, generation_config


def write_hf_dir(
    out_dir: Path, state: dict[str, torch.Tensor], tokenizer: Tokenizer, jsons: dict[str, Any]
) -> None:
    """Write the directory beside `out_dir` under a temporary name, then rename it into place.

    On any failure (a read-only or full disk included) the temporary directory is removed, so
    `out_dir` is either whole or absent; a write error is one OSError naming `out_dir`.
    """
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:
        raise _cannot_write(out_dir, e) from None
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # to_str + write_text, not tokenizer.save: its errors are bare Exceptions.
        (tmp / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
        for name, content in jsons.items():
            (tmp / name).write_text(
                json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.rename(out_dir)
    except (OSError, SafetensorError) as e:  # safetensors reports I/O errors as its own type
        shutil.rmtree(tmp, ignore_errors=True)
        raise _cannot_write(out_dir, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cannot_write(out_dir: Path, e: Exception) -> OSError:
    """One line naming the output folder and the cause, for main's `error:` line."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return OSError(
        f"cannot write {out_dir}: {reason}; give an output folder that is writable and has room "
        "(nothing was left behind)"
    )


def import_gguf(
    gguf_path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write the HF directory for `gguf_path` to `out_dir` (which must not exist)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists: remove it first to re-import")
    start = time.perf_counter()
    reader, meta = read_gguf(gguf_path)
    print(
        f"import_gguf: {gguf_path} ({meta['general.architecture']}, {len(reader.tensors)} tensors)",
        flush=True,
    )
    tokenizer = build_tokenizer(meta)
    state = convert_weights(reader, meta, dtype=dtype)
    config = hf_config(meta, state, dtype=dtype)
    tokenizer_config, generation_config = tokenizer_files(meta)

    write_hf_dir(
        out_dir,
        state,
        tokenizer,
        {
            "config.json": config,
            "tokenizer_config.json": tokenizer_config,
            "generation_config.json": generation_config,
        },
    )
    size_mb = sum(f.stat().st_size for f in out_dir.iterdir()) / 2**20
    seconds = time.perf_counter() - start
    print(
        f"import_gguf: wrote {out_dir} ({size_mb:.0f} MiB, {dtype}) in {seconds:.1f} s", flush=True
    )
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, help="input .gguf file")
    parser.add_argument("out_dir", type=Path, help="output HF directory (must not exist)")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="weight dtype on disk"
    )
    args = parser.parse_args(argv)
    try:
        import_gguf(args.gguf, args.out_dir, dtype=getattr(torch, args.dtype))
    except (ValueError, OSError) as e:  # FileNotFoundError, FileExistsError, a full disk...
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
