"""Tests for scripts/import_gguf.py (GGUF -> HF directory).

Without the teacher: a tiny random transformers llama (untied) and qwen2 (tied, with q/k/v
biases) are written as GGUF files the way llama.cpp's converter writes them (F32 tensors, Q/K
rows permuted for llama only, the tiny test tokenizer as tokenizer.ggml.* metadata), imported,
and loaded back by transformers and by kd/hf.py: logits must equal the original's. That proves
the inverse permutation, the name mapping, the config and the tokenizer rebuild. Also the
error paths: non-GGUF file (CLI, one line, exit 1), missing file, unsupported architecture or
pre-tokenizer, existing output directory, a truncated GGUF, a directory given as the GGUF, and
a read-only or full output folder (tests/fs_faults.py): one line, exit 1, no output directory.
With the imported teacher (`teacher` mark): perplexity on plain English ~7 (a permutation
mistake gives > 40), greedy chat answer about France's capital mentions Paris.

    .venv/bin/python -m pytest -q tests/test_gguf.py
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import gguf
import pytest
import torch
from fs_faults import run_on_tmpfs
from tiny_tokenizer import CHATML, TINY_VOCAB_SIZE, make_tiny_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kd.hf import load_model
from kd.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "import_gguf.py"

# Three paragraphs of plain encyclopedic English for the teacher's perplexity.
ENGLISH = """\
The Danube is the second-longest river in Europe, after the Volga. It flows through much of \
Central and Southeastern Europe, from the Black Forest in Germany to the Black Sea. Over its \
course it passes through or along the borders of ten countries, more than any other river in the \
world. Four capital cities, Vienna, Bratislava, Budapest and Belgrade, lie on its banks.

Photosynthesis is the process by which green plants, algae and some bacteria convert light \
energy into chemical energy. During photosynthesis, carbon dioxide and water are combined to \
form glucose, and oxygen is released as a by-product. The process takes place mainly in the \
leaves, inside small structures called chloroplasts, which contain the green pigment \
chlorophyll.

The printing press was developed in the fifteenth century by Johannes Gutenberg, a goldsmith \
from the German city of Mainz. His system of movable metal type made it possible to produce \
books far more quickly and cheaply than by copying them by hand. Within a few decades, printing \
spread to more than two hundred cities across Europe, and the wider availability of books helped \
to spread new ideas during the Renaissance and the Reformation."""

# HF -> GGUF names, written out independently of the importer's own table.
GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


@pytest.fixture(scope="module")
def importer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_gguf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py, LlamaModel.permute: rotate-half rows -> interleaved
    pairs."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(hf_name: str) -> str:
    base, _, kind = hf_name.rpartition(".")
    if base.startswith("model.layers."):
        _, _, i, module = base.split(".", 3)
        return f"blk.{i}.{GGUF_NAMES[module]}.{kind}"
    return f"{GGUF_NAMES[base]}.{kind}"


def write_gguf(
    model: torch.nn.Module, tok_dir: Path, path: Path, *, arch: str, pre: str = "smollm"
) -> None:
    """Write `model` and the tokenizer in `tok_dir` as an F32 GGUF, as llama.cpp's converter
    would."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)

    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.get)
    special = {t["id"] for t in spec["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges([" ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: llama.cpp writes no output.weight
        if arch == "llama" and ".q_proj." in name:
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name(name), w.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
    )
    if arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False)
        )
    else:
        model = Qwen2ForCausalLM(
            Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True)
        )
    with torch.no_grad():  # HF inits biases to 0 and norms to 1; perturb so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.mark.parametrize("arch, pre", [("llama", "smollm"), ("qwen2", "qwen2")])
def test_round_trip_tiny_model(importer: ModuleType, tmp_path: Path, arch: str, pre: str) -> None:
    tok_dir = make_tiny_tokenizer(tmp_path / "tok")
    model = tiny_model(arch)
    write_gguf(model, tok_dir, tmp_path / "tiny.gguf", arch=arch, pre=pre)
    out = importer.import_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", dtype=torch.float32)

    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
        ours = load_model(out, dtype=torch.float32).eval()(ids)
    # Same fp32 weights: both measured 0.0. 1e-5 is ~100 fp32 ulps on logits of size ~1, room
    # for a different summation order; a Q/K permutation slip gives ~2e-2.
    for who, logits in (("transformers", theirs), ("kd", ours)):
        diff = (logits - expected).abs().max().item()
        assert diff < 1e-5, f"{who} logits max |diff| {diff:.2e}"
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == (arch == "qwen2")

    tok, hf_tok = load_tokenizer(out), AutoTokenizer.from_pretrained(out)
    text = "Café 2024: def f(x):\n    return x ** 2  # 東京 🙂 <|im_start|>user"
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.encode(text) == hf_tok.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(
        messages, add_generation_prompt=True
    ) == hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (
        1,
        2,
        2,
        TINY_VOCAB_SIZE,
    )
    # The same pre-tokenizer as the tiny tokenizer was trained with: identical ids.
    if pre == "smollm":
        assert tok.fingerprint() == load_tokenizer(tok_dir).fingerprint()


def test_bf16_output(importer: ModuleType, tmp_path: Path) -> None:
    tok_dir = make_tiny_tokenizer(tmp_path / "tok")
    write_gguf(tiny_model("llama"), tok_dir, tmp_path / "tiny.gguf", arch="llama")
    out = importer.import_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")  # default dtype
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (
        AutoModelForCausalLM.from_pretrained(out).model.embed_tokens.weight.dtype == torch.bfloat16
    )
    # No temporary directory left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf", "tok"]


def test_cli_rejects_non_gguf_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("not a gguf")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(bad), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "not a GGUF file" in result.stderr
    assert not (tmp_path / "out").exists()


def test_errors_are_one_line(
    importer: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert importer.main([str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith("error: ")

    tok_dir = make_tiny_tokenizer(tmp_path / "tok")
    write_gguf(tiny_model("llama"), tok_dir, tmp_path / "odd_pre.gguf", arch="llama", pre="falcon")
    with pytest.raises(ValueError, match="pre-tokenizer 'falcon' is not supported"):
        importer.import_gguf(tmp_path / "odd_pre.gguf", tmp_path / "out")

    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert importer.main([str(tmp_path / "gpt2.gguf"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "architecture 'gpt2' is not supported" in err and err.count("\n") == 1, err

    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        importer.import_gguf(tmp_path / "gpt2.gguf", tmp_path / "exists")
    assert not (tmp_path / "out").exists()


def _one_error_line(stderr: str) -> str:
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr, stderr
    return stderr.strip()


def test_truncated_gguf_and_directory_are_one_line(
    importer: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A GGUF cut short anywhere (header, metadata, tensor infos, tensor data, last byte) and a
    directory given as the GGUF: exit 1, one line naming the path; no output directory."""
    tok_dir = make_tiny_tokenizer(tmp_path / "tok")
    write_gguf(tiny_model("llama"), tok_dir, tmp_path / "tiny.gguf", arch="llama")
    data = (tmp_path / "tiny.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in (6, 200, len(data) // 40, len(data) // 2, len(data) - 1):
        cut.write_bytes(data[:size])
        assert importer.main([str(cut), str(tmp_path / "out")]) == 1
        err = _one_error_line(capsys.readouterr().err)
        assert err.startswith(f"error: {cut} is truncated or damaged") and "again" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "tiny.gguf", "tok"]

    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tok_dir), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    err = _one_error_line(result.stderr)
    assert (
        err == f"error: {tok_dir} is a directory, not a GGUF file: give the path of the .gguf file"
    )
    assert not (tmp_path / "out").exists()


def test_read_only_and_full_output_folders(tmp_path: Path) -> None:
    """A real read-only and a real full filesystem (tmpfs in a private mount namespace) as the
    output's folder: exit 1, one line naming the output directory, no traceback, and nothing
    left there (the temporary directory is removed)."""
    tok_dir = make_tiny_tokenizer(tmp_path / "tok")
    gguf_file = tmp_path / "tiny.gguf"
    write_gguf(tiny_model("llama"), tok_dir, gguf_file, arch="llama")  # ~290 KB of bf16 out
    read_only = tmp_path / "ro"
    result = run_on_tmpfs(
        [sys.executable, str(SCRIPT), str(gguf_file), str(read_only / "hf")],
        read_only,
        readonly=True,
    )
    assert result.returncode == 1, result.stderr
    err = _one_error_line(result.stderr)
    assert err.startswith(f"error: cannot write {read_only / 'hf'}: Read-only file system"), err

    full, after = tmp_path / "full", tmp_path / "after"
    result = run_on_tmpfs(
        [sys.executable, str(SCRIPT), str(gguf_file), str(full / "hf")],
        full,
        size_kb=64,
        keep=after,
    )
    assert result.returncode == 1, result.stderr
    err = _one_error_line(result.stderr)
    assert err.startswith(f"error: cannot write {full / 'hf'}: ") and "No space left" in err, err
    assert list(after.iterdir()) == [], "a half-written directory was left behind"


@pytest.fixture(scope="module")
def teacher(teacher_dir: Path) -> tuple[torch.nn.Module, object]:
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(teacher_dir)


@pytest.mark.teacher
def test_teacher_config(teacher_dir: Path) -> None:
    config = json.loads((teacher_dir / "config.json").read_text())
    # SmolLM2-135M-Instruct's architecture, as its config.json on the Hugging Face Hub has it.
    expected = dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    assert {k: config[k] for k in expected} == expected


@pytest.mark.teacher
def test_teacher_perplexity(teacher: tuple) -> None:
    model, tok = teacher
    ids = torch.tensor([tok.encode(ENGLISH)])
    with torch.no_grad():
        ppl = model(ids, labels=ids).loss.exp().item()
    # Measured 7.13 (bf16 weights on disk; 7.14 from fp32); with the Q/K permutation left in
    # place it is 186 on this text. 15 leaves room for other quantizations of the same model.
    assert ppl < 15, f"perplexity {ppl:.2f} on plain English: is the Q/K permutation undone?"


@pytest.mark.teacher
def test_teacher_answers_paris(teacher: tuple) -> None:
    model, tok = teacher
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
