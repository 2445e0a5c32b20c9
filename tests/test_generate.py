"""Checks the generate.py CLI on a tiny random llama + tiny tokenizer: streaming one prompt,
batch mode over JSONL (output fields, chat templating, resuming a partial output), one-line
errors, oneDNN off for one-row bf16 decoding; plus the real teacher's greedy answer to a
factual question.

Run: `.venv/bin/python -m pytest -q tests/test_generate.py` (the teacher test: `make teacher`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_tokenizer import TINY_VOCAB_SIZE, make_tiny_tokenizer

import generate as cli
from kd.hf import load_model
from kd.sampling import generate
from kd.tokenizer import load_tokenizer
from tests.tiny_models import make_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random llama with the tiny tokenizer's vocabulary, both in one directory."""
    path = tmp_path_factory.mktemp("tiny_lm")
    make_tiny_checkpoint(path, "llama", vocab_size=TINY_VOCAB_SIZE, initializer_range=0.2)
    make_tiny_tokenizer(path)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as one_thread, for the child process
    return subprocess.run(
        [sys.executable, str(REPO / "generate.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_streams_the_greedy_completion(tiny_dir: Path) -> None:
    proc = run_cli(
        "--model",
        str(tiny_dir),
        "--prompt",
        "The capital of France",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
    )
    assert proc.returncode == 0, proc.stderr
    tok = load_tokenizer(tiny_dir)
    new = generate(
        load_model(tiny_dir),
        [tok.encode("The capital of France")],
        max_new_tokens=12,
        temperature=0.0,
        eos_token_ids=tok.eos_token_ids,
        pad_id=tok.pad_token_id,
    )[0]
    assert proc.stdout == tok.decode(new, skip_special_tokens=True) + "\n"
    assert "tokens/s" in proc.stderr


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [
    {"prompt": "What is the capital of Spain?", "id": 0},
    {"messages": [{"role": "user", "content": "Explain a tokenizer."}], "id": 1},
    {"prompt": "Tell me about the river.", "response": "a reference answer", "id": 2},
    {"prompt": "def add(a, b):", "id": 3},
    {"prompt": "Café", "id": 4},
]


def test_batch_mode_writes_responses_and_resumes(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    args = [
        "--model",
        str(tiny_dir),
        "--prompts-file",
        str(inp),
        "--chat",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "6",
        "--seed",
        "3",
    ]
    assert cli.main(args + ["--output", str(tmp_path / "a.jsonl")]) == 0
    assert "5/5 records" in capsys.readouterr().err
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    full = [json.loads(line) for line in lines]
    assert [r["id"] for r in full] == [0, 1, 2, 3, 4]
    assert (
        all(isinstance(r["response"], str) for r in full)
        and full[2]["response"] != "a reference answer"
    )
    assert {k: v for k, v in full[1].items() if k != "response"} == RECORDS[1]
    assert not (tmp_path / "a.jsonl.partial").exists()

    # A crash after the first batch: two complete lines, then a torn third. The rerun keeps the
    # finished records (we mark one to prove it is not regenerated), drops the torn line and
    # writes the rest exactly as the uninterrupted run did (batch seeds depend on the index).
    kept = {**full[0], "response": "KEPT"}
    partial = tmp_path / "b.jsonl.partial"
    partial.write_text(json.dumps(kept) + "\n" + lines[1] + "\n" + lines[2][:10])
    assert cli.main(args + ["--output", str(tmp_path / "b.jsonl")]) == 0
    resumed = (tmp_path / "b.jsonl").read_text().splitlines()
    assert json.loads(resumed[0])["response"] == "KEPT" and resumed[1:] == lines[1:]
    assert not partial.exists()


def test_errors_are_one_line(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "ok"}\n\n{"prompt": oops}\n')
    no_prompt = write_jsonl(
        tmp_path / "no_prompt.jsonl", [{"prompt": "ok"}, {"text": "no prompt field"}]
    )
    bad_chat = write_jsonl(tmp_path / "bad_chat.jsonl", [{"messages": ["hi"]}])
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "ok"}, {"prompt": ""}])
    out = ["--output", str(tmp_path / "o.jsonl")]
    cases = [
        (
            ["--model", str(tmp_path / "missing"), "--prompt", "hi"],
            "missing: model directory not found",
        ),
        (
            ["--model", str(tiny_dir), "--prompts-file", str(bad_json), *out],
            f"{bad_json}:3: not a valid UTF-8 JSON line",
        ),
        (
            ["--model", str(tiny_dir), "--prompts-file", str(no_prompt), *out],
            f"{no_prompt}:2: needs a string 'prompt'",
        ),
        (
            ["--model", str(tiny_dir), "--prompts-file", str(bad_chat), *out],
            f"{bad_chat}:1: 'messages' must be",
        ),
        (
            ["--model", str(tiny_dir), "--prompts-file", str(empty), *out],
            f"{empty}:2: the prompt is empty",
        ),
        (
            ["--model", str(tiny_dir), "--prompts-file", str(tmp_path / "none.jsonl"), *out],
            "prompts file not found",
        ),
        (
            ["--model", str(tiny_dir), "--prompt", "hi", "--top-p", "0"],
            "top_p=0.0 is outside (0, 1]",
        ),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        # One line, no traceback: main() catches the error (a subprocess would only add the
        # ~3 s of importing torch again).
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_one_row_bf16_turns_onednn_off(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    """The CLI, not the library, decides oneDNN: off for bf16 one row at a time, else left on."""
    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS[:2])
    cases = [
        (["--prompt", "The river", "--dtype", "bf16"], False),
        (
            ["--prompts-file", str(inp), "--output", str(tmp_path / "a.jsonl"), "--dtype", "bf16"],
            True,
        ),
        (["--prompt", "The river"], True),  # fp32
    ]
    try:
        for argv, want in cases:
            torch.backends.mkldnn.enabled = True
            assert cli.main(["--model", str(tiny_dir), "--max-new-tokens", "2", *argv]) == 0
            assert torch.backends.mkldnn.enabled == want, argv
    finally:
        torch.backends.mkldnn.enabled = True
    capsys.readouterr()


@pytest.mark.teacher
def test_teacher_knows_the_capital_of_france(teacher_dir: Path, capsys) -> None:
    argv = [
        "--model",
        str(teacher_dir),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
    ]
    assert cli.main(argv) == 0
    assert "Paris" in capsys.readouterr().out
