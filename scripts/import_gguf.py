"""Import a llama.cpp GGUF model (llama, qwen2, qwen3 or gemma3 architecture) as an HF directory.

    .venv/bin/python scripts/import_gguf.py MODEL.gguf OUT_DIR [--dtype bfloat16|float32]

Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
generation_config.json, loadable by `transformers` (AutoModelForCausalLM, AutoTokenizer) and by
kd (kd/hf.py, kd/tokenizer.py). `make teacher` runs it on SmolLM2-135M-Instruct (Q4_1);
scripts/fetch_gemma3.sh on Gemma 3 270M (Q4_K_M).

What it undoes (GGUF format: github.com/ggml-org/ggml/blob/master/docs/gguf.md; the converter is
llama.cpp's convert_hf_to_gguf.py, whose inverse transformers also carries in
modeling_gguf_pytorch_utils.py):
- Quantization: every tensor (F32, Q8_0, Q5_0, Q4_1, Q4_K, Q6_K, ...) is dequantized to fp32 by
  the `gguf` package's own `gguf.quants.dequantize`, then stored in --dtype. A dequantized Q4_1
  weight is d * q + m with fp16 d, m; bf16 rounds that to 8 bits of mantissa. Measured on
  tests/test_gguf.py's English text, SmolLM2-135M perplexity is 7.13 from bf16 and 7.14 from
  fp32, so bf16 (half the disk, 260 MiB) is the default.
- The Q/K row permutation, llama only: the converter (LlamaModel.permute) reorders each head's
  rows of q_proj and k_proj from HF's rotate-half RoPE layout to the interleaved-pairs layout
  ggml's "normal" rope kernel wants:
      w.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(w.shape)
  i.e. rows (h, half, i) -> (h, i, half). The inverse reshapes to (n_head, head_dim // 2, 2) and
  swaps back. K uses the KV head count. Qwen2, Qwen3 and Gemma 3 are not permuted: their
  converter classes do not call permute, and llama.cpp runs them with NEOX (rotate-half) RoPE
  (llama_model_rope_type). Forgetting it fails quietly: perplexity ~43 instead of ~10.
- Gemma's norm weights, gemma3 only: Gemma3RMSNorm computes x_hat * (1 + w) where ggml's norm
  computes x_hat * w, so the converter (Gemma3Model.modify_tensors, norm_shift) stores w + 1 for
  every tensor whose name ends in "norm.weight" (all four norms of a block, q_norm, k_norm and
  the final norm). We subtract 1, as transformers' Gemma2TensorProcessor does. (It also cuts
  token_embd to the tokenizer's length: vocab_size is the file's row count, nothing to undo.)
- The tokenizer (kd/gguf_tokenizer.py): a byte-level BPE rebuilt from tokenizer.ggml.tokens and
  merges (gpt2 model), with the pre-tokenizer llama.cpp names in tokenizer.ggml.pre; or Gemma's
  SentencePiece BPE (llama model). Control tokens (token_type 3) become special added tokens,
  user-defined ones (4) plain added tokens.
- What the file leaves to llama.cpp's code (llama-model.cpp, LLM_ARCH_GEMMA3), written out in
  config.json: Gemma 3's every-6th-layer global attention, its local RoPE base 10000 and its
  query scale.
The directory is written beside OUT_DIR under a temporary name and renamed into place, so an
interrupted import never leaves a half-written OUT_DIR. A truncated GGUF, a directory given as
the GGUF, an architecture or tokenizer it does not know, or a read-only or full output folder
ends in one `error:` line naming the path (exit status 1), with nothing left behind.
"""

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: import kd
from kd.gguf_tokenizer import build_tokenizer, tokenizer_files  # noqa: E402

HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}

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
    "attn_q_norm": "self_attn.q_norm",  # Qwen3, Gemma 3: RMSNorm over each head's q and k
    "attn_k_norm": "self_attn.k_norm",
}
# Gemma 3 has four norms per block; gguf-py's tensor_mapping.py gives ffn_norm another HF name.
GEMMA3_BLOCK_NAMES = {
    **BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",  # on the attention output
    "ffn_norm": "pre_feedforward_layernorm",  # on the MLP input
    "post_ffw_norm": "post_feedforward_layernorm",  # on the MLP output
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


def hf_tensor_name(name: str, arch: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; unknown names raise."""
    base, _, kind = name.rpartition(".")
    block_names = GEMMA3_BLOCK_NAMES if arch == "gemma3" else BLOCK_NAMES
    if match := re.fullmatch(r"blk\.(\d+)\.(\w+)", base):
        if match[2] in block_names:
            return f"model.layers.{match[1]}.{block_names[match[2]]}.{kind}"
    elif base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{kind}"
    raise ValueError(
        f"tensor {name!r} has no HF counterpart (rope scaling and other extras are not supported)"
    )


def convert_weights(
    reader: gguf.GGUFReader, meta: dict[str, Any], *, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Dequantize every tensor, rename it to HF, undo the llama Q/K permutation and the Gemma
    norm shift (see the module docstring)."""
    arch = meta["general.architecture"]
    n_head = meta[f"{arch}.attention.head_count"]
    n_kv_head = meta.get(f"{arch}.attention.head_count_kv", n_head)
    state = {}
    for i, tensor in enumerate(reader.tensors):
        # dequantize returns fp32 in torch's (out, in) order; tensor.shape is ggml's reversed order.
        w = torch.from_numpy(
            np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        )
        name = hf_tensor_name(tensor.name, arch)
        if arch == "llama" and ".self_attn.q_proj." in name:
            w = unpermute_rows(w, n_head)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            w = unpermute_rows(w, n_kv_head)
        elif arch == "gemma3" and tensor.name.endswith("norm.weight"):
            w = w - 1.0  # stored as w + 1 (Gemma3Model.norm_shift); in fp32, before the cast
        state[name] = w.to(dtype).contiguous()
        if (i + 1) % 50 == 0 or i + 1 == len(reader.tensors):
            print(f"  dequantized {i + 1}/{len(reader.tensors)} tensors", flush=True)
    return state


def hf_config(
    meta: dict[str, Any], state: dict[str, torch.Tensor], *, dtype: torch.dtype
) -> dict[str, Any]:
    """config.json: llama and qwen2 in the Hub's classic format (as SmolLM2's and Qwen2's own
    config.json files are); qwen3 and gemma3 with the keys transformers 5's save_pretrained
    writes for Qwen3Config and Gemma3TextConfig (rope_parameters, layer_types, dtype)."""
    arch = meta["general.architecture"]

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{name}; cannot write config.json")
        # GGUF floats are float32: write 1e-05, not 9.999999747378752e-06.
        return float(str(np.float32(value))) if isinstance(value, float) else value

    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" and (arch, scaling) != ("gemma3", "linear"):
        raise ValueError(f"rope scaling {scaling!r} is not supported for {arch}")
    hidden, n_head = key("embedding_length"), key("attention.head_count")
    n_layers, theta = key("block_count"), key("rope.freq_base", 10000.0)
    config = {
        "architectures": [HF_CLASSES[arch]],
        "model_type": "gemma3_text" if arch == "gemma3" else arch,
        "vocab_size": state["model.embed_tokens.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": key("attention.head_count_kv", n_head),
        "head_dim": key("attention.key_length", hidden // n_head),
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "tie_word_embeddings": "lm_head.weight" not in state,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "use_cache": True,
    }
    dtype_name = str(dtype).removeprefix("torch.")
    has_bias = "model.layers.0.self_attn.q_proj.bias" in state
    if arch in ("llama", "qwen2"):  # Qwen2 always has q/k/v biases and no such keys
        config |= {"rope_theta": theta, "hidden_act": "silu", "torch_dtype": dtype_name}
        if arch == "llama":
            return config | {"attention_bias": has_bias, "mlp_bias": False}
        return config | {"use_sliding_window": False}
    config |= {"dtype": dtype_name, "attention_bias": has_bias}
    if arch == "qwen3":
        return config | {
            "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "layer_types": ["full_attention"] * n_layers,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": n_layers,
        }
    return config | gemma3_keys(meta, key, config, theta=theta)


def gemma3_keys(
    meta: dict[str, Any], key: Callable[[str], Any], config: dict[str, Any], *, theta: float
) -> dict[str, Any]:
    """Gemma 3's keys, most of which llama.cpp keeps in code, not in the file (src/llama-model.cpp,
    llama_model::load_hparams, case LLM_ARCH_GEMMA3)."""
    n_layers, window = config["num_hidden_layers"], meta.get("gemma3.attention.sliding_window")
    # With a sliding window, layer i is local unless i % 6 == 5 (set_swa_pattern(6)); local
    # layers use RoPE base 10000 unscaled (rope_freq_base_train_swa, hard-coded), global ones
    # the file's base and scaling. Without a window every layer is global.
    layer_types = [
        "full_attention" if not window or i % 6 == 5 else "sliding_attention"
        for i in range(n_layers)
    ]
    full_rope = {"rope_type": "default", "rope_theta": theta}
    if meta.get("gemma3.rope.scaling.type") == "linear":  # Gemma 3 4B and up: factor 8
        full_rope |= {"rope_type": "linear", "factor": key("rope.scaling.factor")}
    softcap = meta.get("gemma3.final_logit_softcapping")
    # q is scaled by 1/sqrt(head_dim), in the 27B (62 layers) by 1/sqrt(hidden / heads).
    hidden, n_head = config["hidden_size"], config["num_attention_heads"]
    scalar = hidden // n_head if n_layers == 62 else config["head_dim"]
    return {
        "hidden_activation": "gelu_pytorch_tanh",  # ggml_gelu is GELU's tanh approximation
        # transformers wants a window even where no layer slides: the context length is none.
        "sliding_window": window or config["max_position_embeddings"],
        "layer_types": layer_types,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": full_rope,
        },
        "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": key("final_logit_softcapping") if softcap else None,
        "attn_logit_softcapping": None,  # the converter asserts Gemma 3 has none
        "use_bidirectional_attention": False,
    }


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
