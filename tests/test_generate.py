"""Checks the generate.py CLI on a tiny random llama + tiny tokenizer: streaming one prompt,
batch mode over JSONL (output fields, chat templating, resuming a partial output in whole
batches), a partial resumed only with the model and settings that wrote it, one writer per
output (two real processes), read-only and full output folders (a private tmpfs), one-line
errors (non-finite numbers too), oneDNN off for one-row bf16 decoding; plus the real teacher's
greedy answer to a factual question.

Run: `.venv/bin/python -m pytest -q tests/test_generate.py` (the teacher test: `make teacher`).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_tokenizer import TINY_VOCAB_SIZE, make_tiny_tokenizer

import generate as cli
from kd.hf import load_model
from kd.sampling import generate
from kd.tokenizer import load_tokenizer
from tests.fs_faults import run_on_tmpfs
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


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # as one_thread, for child processes
CLI = [sys.executable, str(REPO / "generate.py")]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120
    )


class Crash(Exception):
    """Stands for a kill in the middle of a run: main() does not catch it."""


def crash_after(monkeypatch, batches: int) -> None:
    """Make generate.py's next run die when it starts batch `batches + 1`."""
    calls = []

    def generate_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) > batches:
            raise Crash
        return generate(*args, **kwargs)

    monkeypatch.setattr(cli, "generate", generate_then_crash)


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


def test_batch_mode_writes_responses_and_resumes(
    tiny_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
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

    # A crash in the second batch, after its first line was written whole and its second torn
    # (we write those lines ourselves; the run itself writes whole batches only). The rerun
    # keeps the finished batch (we mark a record to prove it is not regenerated), drops the
    # unfinished one (also the whole line: a batch is sampled as a whole) and writes the rest
    # exactly as the uninterrupted run did (batch seeds depend on the index).
    crash_after(monkeypatch, batches=1)
    with pytest.raises(Crash):
        cli.main(args + ["--output", str(tmp_path / "b.jsonl")])
    monkeypatch.undo()
    partial = tmp_path / "b.jsonl.partial"
    assert partial.read_text().splitlines() == lines[:2]
    assert (
        tmp_path / "b.jsonl.partial.json"
    ).exists()  # what made it: see test_a_partial_is_finished_only_...
    kept, half = {**full[0], "response": "KEPT"}, {**full[2], "response": "HALF"}
    partial.write_text("\n".join([json.dumps(kept), lines[1], json.dumps(half), lines[3][:10]]))
    assert cli.main(args + ["--output", str(tmp_path / "b.jsonl")]) == 0
    resumed = (tmp_path / "b.jsonl").read_text().splitlines()
    assert json.loads(resumed[0])["response"] == "KEPT" and resumed[1:] == lines[1:]
    # Only the final file is left: no partial, no record of its settings, no lock.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "in.jsonl"]


def test_errors_are_one_line(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "ok"}\n\n{"prompt": oops}\n')
    no_prompt = write_jsonl(
        tmp_path / "no_prompt.jsonl", [{"prompt": "ok"}, {"text": "no prompt field"}]
    )
    bad_chat = write_jsonl(tmp_path / "bad_chat.jsonl", [{"messages": ["hi"]}])
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "ok"}, {"prompt": ""}])
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "ok"}])
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
            "--top-p 0.0 is outside (0, 1]",
        ),
        (
            ["--model", str(tiny_dir), "--prompts-file", str(ok), "--output", str(tmp_path)],
            f"{tmp_path}: is a directory; give --output a file",
        ),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        # One line, no traceback: main() catches the error (a subprocess would only add the
        # ~3 s of importing torch again).
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def one_error_line(err: str) -> str:
    """The one line of a refusal on stderr (no traceback, nothing else)."""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def snapshot(*paths: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in paths}


def test_numbers_are_checked_at_parsing(tiny_dir: Path, capsys) -> None:
    """argparse's float() takes 'nan' and 'inf'; NaN would pass a `< 0` check and sample
    nothing. Each bad number is refused in one line that names its flag."""
    cases = [
        (["--temperature", "nan"], "--temperature nan is not a finite number >= 0"),
        (["--temperature", "inf"], "--temperature inf is not a finite number >= 0"),
        (["--temperature", "-1"], "--temperature -1.0 is not a finite number >= 0"),
        (["--top-p", "nan"], "--top-p nan is outside (0, 1]"),
        (["--top-p", "1.5"], "--top-p 1.5 is outside (0, 1]"),
        (["--top-k", "-1"], "--top-k -1 must be >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
        (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
        (["--seed", str(2**64)], f"--seed {2**64} is too large"),
    ]
    for argv, message in cases:
        assert cli.main(["--model", str(tiny_dir), "--prompt", "hi", *argv]) == 1, argv
        assert message in one_error_line(capsys.readouterr().err), argv


def test_a_partial_is_finished_only_with_the_settings_that_wrote_it(
    tiny_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    other_model = tmp_path / "other_lm"  # the same architecture and tokenizer, other weights
    make_tiny_checkpoint(
        other_model, "llama", vocab_size=TINY_VOCAB_SIZE, initializer_range=0.2, seed=1
    )
    make_tiny_tokenizer(other_model)
    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "a.jsonl"
    partial, sidecar = tmp_path / "a.jsonl.partial", tmp_path / "a.jsonl.partial.json"
    args = ["--prompts-file", str(inp), "--output", str(out), "--batch-size", "2"]
    args += ["--max-new-tokens", "6", "--temperature", "0"]
    crash_after(monkeypatch, batches=1)
    with pytest.raises(Crash):
        cli.main(["--model", str(tiny_dir), *args])
    monkeypatch.undo()
    capsys.readouterr()
    before = snapshot(partial, sidecar)
    assert len(before["a.jsonl.partial"].splitlines()) == 2

    cases = [
        (["--model", str(other_model), *args], ["another --model (fingerprint "]),
        (["--model", str(tiny_dir), *args, "--temperature", "1"], ["--temperature 0.0 -> 1.0"]),
        (
            ["--model", str(other_model), *args, "--temperature", "1", "--batch-size", "3"],
            ["another --model", "--temperature 0.0 -> 1.0", "--batch-size 2 -> 3"],
        ),
        (["--model", str(tiny_dir), *args, "--chat"], ["--chat off -> on"]),
    ]
    for argv, named in cases:
        assert cli.main(argv) == 1, argv
        err = one_error_line(capsys.readouterr().err)
        assert f"{partial} was written with other settings: " in err, err
        assert all(n in err for n in named) and "tokenizer" not in err, err
        assert f"delete {partial} and {sidecar} to start over" in err, err
        assert snapshot(partial, sidecar) == before, argv  # byte for byte
    assert not out.exists()

    # A partial whose record is gone (or one left by an older kd) cannot be trusted either.
    sidecar.unlink()
    assert cli.main(["--model", str(tiny_dir), *args]) == 1
    err = one_error_line(capsys.readouterr().err)
    assert f"{partial} has no a.jsonl.partial.json" in err and f"delete {partial}" in err, err
    assert partial.read_bytes() == before["a.jsonl.partial"]


@pytest.mark.slow
def test_one_writer_per_output(tiny_dir: Path, tmp_path: Path) -> None:
    """A second process on the same --output is refused, naming the first, and touches nothing;
    the first then finishes a whole file. The first is paused (SIGSTOP) while the second
    tries, so the test does not depend on how fast either runs."""
    n = 200
    inp = write_jsonl(
        tmp_path / "in.jsonl", [{"prompt": f"Question {i}?", "id": i} for i in range(n)]
    )
    out = tmp_path / "a.jsonl"
    partial, sidecar = tmp_path / "a.jsonl.partial", tmp_path / "a.jsonl.partial.json"
    args = ["--model", str(tiny_dir), "--prompts-file", str(inp), "--output", str(out)]
    args += ["--batch-size", "2", "--max-new-tokens", "64"]
    first = subprocess.Popen(
        [*CLI, *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not partial.exists():  # made after the lock is taken
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        assert not out.exists(), "the first run finished before it could be paused"
        before = snapshot(partial, sidecar)
        second = run_cli(*args)
        assert second.returncode == 1, second.stderr
        err = one_error_line(second.stderr)
        assert f"--output {out} is in use by pid {first.pid} " in err, err
        assert snapshot(partial, sidecar) == before
        first.send_signal(signal.SIGCONT)
        _, first_err = first.communicate(timeout=120)
        assert first.returncode == 0, first_err
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.wait()
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == list(range(n))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "in.jsonl"]


def test_read_only_and_full_output_folders(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    """A real read-only and a real full filesystem (tmpfs in a private mount namespace): one
    error line naming the path, no traceback; the batches finished before the disk filled are
    a partial that a rerun elsewhere, with the same settings, finishes as one run would."""
    page = os.sysconf("SC_PAGE_SIZE")  # tmpfs counts whole pages
    n = 120 * page // 4096  # ~150 bytes each: twice what the partial's 2 pages hold
    inp = write_jsonl(
        tmp_path / "in.jsonl", [{"prompt": f"Question {i}?", "id": i} for i in range(n)]
    )
    args = ["--model", str(tiny_dir), "--prompts-file", str(inp), "--batch-size", "4"]
    args += ["--max-new-tokens", "32"]

    read_only = tmp_path / "ro"
    proc = run_on_tmpfs(
        [*CLI, *args, "--output", str(read_only / "a.jsonl")], read_only, readonly=True, env=ENV
    )
    assert proc.returncode == 1, proc.stderr
    err = one_error_line(proc.stderr)
    assert f"error: {read_only / 'a.jsonl'}" in err and "Read-only file system" in err, err

    # 4 pages: the lock, the settings record, and 2 for the partial before the disk is full.
    full, after = tmp_path / "full", tmp_path / "after"
    proc = run_on_tmpfs(
        [*CLI, *args, "--output", str(full / "a.jsonl")],
        full,
        size_kb=4 * page // 1024,
        keep=after,
        env=ENV,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"error: {full / 'a.jsonl.partial'}: No space left on device; "), last
    assert sum(line.startswith("error:") for line in proc.stderr.splitlines()) == 1
    kept = (after / "a.jsonl.partial").read_text().splitlines()
    assert 0 < len(kept) < n and len(kept) % 4 == 0, len(kept)  # whole batches only
    assert [json.loads(line)["id"] for line in kept] == list(range(len(kept)))

    normal = tmp_path / "normal"
    normal.mkdir()
    for name in ("a.jsonl.partial", "a.jsonl.partial.json"):
        shutil.copy(after / name, normal / name)
    assert cli.main([*args, "--output", str(normal / "a.jsonl")]) == 0
    assert cli.main([*args, "--output", str(tmp_path / "uninterrupted.jsonl")]) == 0
    capsys.readouterr()
    resumed = (normal / "a.jsonl").read_bytes()
    assert resumed.splitlines()[: len(kept)] == [line.encode() for line in kept]
    assert resumed == (tmp_path / "uninterrupted.jsonl").read_bytes()


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
