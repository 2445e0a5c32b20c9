"""Runs that cannot be lost or mixed up (kd/rundir.py, kd/lock.py, kd/checkpoint.py, train.py):

- a run directory belongs to one run: a second start into a finished run, or into a running
  one (a real second process), is refused in one line, and the first run's files stay
  byte for byte; `overwrite=true` replaces a run; `--out` naming a file is refused;
- a resume verifies what it resumes: another teacher, loss, alpha, temperature, lr,
  precision, student_layers (same count or not) are refused, each named; max_steps changes
  only when listed in `resume_changes`, is logged, and the run continues;
- checkpoints are verified: a truncated or missing file in the newest checkpoint makes the
  resume fall back to the previous one (named) and the result equals the uninterrupted run;
- a full disk at the export loses nothing: the last step is checkpointed first and
  `--resume=true` exports it (a small tmpfs, tests/fs_faults.py); a read-only OUT is one line;
- Ctrl-C checkpoints at the next step, then a resume is exact; a second Ctrl-C exits at once;
- bad settings and files are one line: NaN settings, a TOML list for a number, fp16 on a CPU,
  a config.json value of the wrong type, a lone surrogate in the data; a config.json without
  rope_theta loads with a one-line warning; a torn last line of metrics.jsonl resumes;
- fp16 loss scaling's skipped steps are counted (train_step).

Run: `.venv/bin/python -m pytest -q tests/test_runs.py`.
"""

import hashlib
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
from fs_faults import run_on_tmpfs
from safetensors.torch import load_file
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import TINY_VOCAB_SIZE, make_tiny_tokenizer

import train
from kd import hf_config, parallel

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("runs")
    teacher = make_tiny_checkpoint(d / "teacher", "llama", vocab_size=TINY_VOCAB_SIZE)
    make_tiny_tokenizer(teacher)
    other = make_tiny_checkpoint(d / "other", "llama", vocab_size=TINY_VOCAB_SIZE, seed=5)
    make_tiny_tokenizer(other)
    data = d / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"The river rises {i} times."}) + "\n" for i in range(16))
    )
    return {"dir": d, "teacher": teacher, "other": other, "data": data}


def argv(assets: dict, out: Path, **settings) -> list[str]:
    values = {
        "teacher": assets["teacher"],
        "student_layers": "0",
        "data": assets["data"],
        "out": out,
        "max_steps": 4,
        "batch_size": 2,
        "seq_len": 32,
        "precision": "fp32",
        "lr": 1e-2,
        "warmup_steps": 1,
        "log_every": 1,
        "save_every": 2,
        **settings,
    }
    return [f"--{k}={v}" for k, v in values.items()]


def trains(args: list[str], capsys) -> str:
    """train.cli in this process; its output (stdout and stderr), after checking it succeeded."""
    capsys.readouterr()
    status = train.cli(args)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured.out + captured.err


def fails(args: list[str], capsys) -> str:
    """train.cli in this process; its one stderr line, after checking the failure's form."""
    capsys.readouterr()
    assert train.cli(args) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (the lock file aside: it records its holder)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory) -> Path:
    """A finished run of 4 steps, checkpointed at steps 2 and 4 (the reference)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *argv(assets, out, save_every=2)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return out


# ------------------------------------------------------------------------ one run per directory


def test_a_second_start_into_a_run_is_refused_and_changes_nothing(assets, finished, capsys):
    before = snapshot(finished)
    for extra in ({}, {"max_steps": 8}, {"loss": "reverse_kl"}):
        line = fails(argv(assets, finished, **extra), capsys)
        assert "already holds checkpoints, final" in line and "--resume=true" in line, line
    assert snapshot(finished) == before, "a refused start must leave the run's files as they were"


def test_overwrite_replaces_a_run_and_out_must_be_a_directory(assets, finished, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (copy / "checkpoints").rename(tmp_path / "moved")  # a run without checkpoints: final only
    trains(argv(assets, copy, overwrite="true", max_steps=2), capsys)
    records = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2], "one run's metrics, not two sequences"
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    assert "is a file, not a directory" in fails(argv(assets, a_file), capsys)
    assert "contradict" in fails(argv(assets, copy, overwrite="true", resume="true"), capsys)


def test_a_second_process_is_refused_while_the_first_runs(assets, tmp_path):
    out = tmp_path / "busy"
    first = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "train.py"),
            *argv(assets, out, max_steps=100000, save_every=1000),
        ],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not (out / "metrics.jsonl").is_file() and first.poll() is None:
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, str(REPO / "train.py"), *argv(assets, out)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by pid {first.pid}" in lines[0], second.stderr
    finally:
        first.send_signal(signal.SIGTERM)  # stops at the next step, with a checkpoint
        stderr = first.communicate(timeout=120)[1]
    assert first.returncode == 0, stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)), "one writer: no interleaved metrics"


def test_a_dead_holders_lock_is_taken_over_and_named(assets, finished, tmp_path, capsys):
    """A run killed with SIGKILL cannot release its lock file: the kernel drops the flock, and
    the next start names the dead holder it took over from."""
    run = tmp_path / "killed"
    shutil.copytree(finished, run)
    (run / ".lock").write_text(f"pid 999999999 on {os.uname().nodename} since 2026-01-01\n")
    log = trains(argv(assets, run, resume="true"), capsys)
    assert "took over the lock of pid 999999999" in log and "no longer running" in log, log
    assert (run / ".lock").read_text() == "", "released at exit: nobody holds it"


# ----------------------------------------------------------------------------- resume verifies


@pytest.mark.parametrize(
    "change, named",
    [
        ({"teacher": "other"}, "the teacher(s) hold other weights"),
        ({"loss": "reverse_kl"}, 'loss "forward_kl" -> "reverse_kl"'),
        ({"alpha": 0.7}, "alpha 0.5 -> 0.7"),
        ({"temperature": 2.0}, "temperature 1.0 -> 2.0"),
        ({"lr": 0.02}, "lr 0.01 -> 0.02"),
        ({"precision": "bf16"}, 'precision "fp32" -> "bf16"'),
        ({"student_layers": "1"}, "student_layers [0] -> [1]"),
        ({"student_layers": "0,1"}, "the student has another architecture"),
        ({"max_steps": 8}, "max_steps 4 -> 8 (to accept it: --resume_changes=max_steps)"),
    ],
)
def test_resume_refuses_another_run(assets, finished, change, named, capsys):
    before = snapshot(finished)
    change = {k: assets[v] if v == "other" else v for k, v in change.items()}
    line = fails(argv(assets, finished, resume="true", **change), capsys)
    assert "resume refused" in line and named in line, line
    assert snapshot(finished) == before


def test_resume_with_an_accepted_change_continues_and_logs_it(assets, finished, tmp_path, capsys):
    run = tmp_path / "longer"
    shutil.copytree(finished, run)
    trains(argv(assets, run, resume="true", max_steps=6, resume_changes="max_steps"), capsys)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert any(r.get("resumed_with_changes") == ["max_steps 4 -> 6"] for r in records)
    assert "resume_changes=alpha" in fails(argv(assets, run, resume_changes="alpha"), capsys)


def test_resume_under_an_accepted_change_is_exact(assets, finished, tmp_path, capsys):
    """A safe change (log_every) accepted on resume: the run still ends bit for bit as the
    uninterrupted one."""
    run = tmp_path / "relogged"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_000004")
    trains(argv(assets, run, resume="true", log_every=2, resume_changes="log_every"), capsys)
    assert same_weights(run, finished)


# ----------------------------------------------------------------------------- checkpoints verified


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(
    assets, finished, tmp_path, damage, capsys
):
    run = tmp_path / damage
    shutil.copytree(finished, run)
    shutil.rmtree(run / "final")
    newest = run / "checkpoints" / "step_000004"
    target = next(newest.glob("*.distcp"))
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    else:
        target.unlink()
    log = trains(argv(assets, run, resume="true"), capsys)
    problem = "is missing" if damage == "delete" else "has 100 of its"
    assert f"skipped {newest}: {target.name} {problem}" in log, log
    assert f"resumed from {run / 'checkpoints' / 'step_000002'} at step 2" in log, log
    assert same_weights(run, finished), "resumed at step 2, it ends as the uninterrupted run"


def test_no_checkpoint_verifies_is_one_line(assets, finished, tmp_path, capsys):
    run = tmp_path / "broken"
    shutil.copytree(finished, run)
    for meta in (run / "checkpoints").glob("*/meta.json"):
        meta.write_text("{torn")
    line = fails(argv(assets, run, resume="true"), capsys)
    assert "no checkpoint" in line and "meta.json is unreadable" in line, line


def test_a_torn_last_metrics_line_does_not_block_resume(assets, finished, tmp_path, capsys):
    run = tmp_path / "torn"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints" / "step_000004")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    trains(argv(assets, run, resume="true"), capsys)
    assert same_weights(run, finished)


# --------------------------------------------------------------------- full and read-only disks


def test_a_full_disk_at_the_export_loses_nothing(assets, finished, tmp_path):
    """OUT on a tmpfs with room for the run and its last checkpoint but not the export: the
    export fails in one line, the checkpoint is kept, and a resume elsewhere exports it."""
    run_bytes = sum(p.stat().st_size for p in finished.rglob("*") if "final" not in p.parts)
    export_bytes = (finished / "final" / "model.safetensors").stat().st_size
    size_kb = (run_bytes + export_bytes // 2) // 1024 + 64
    out, kept = tmp_path / "tmpfs", tmp_path / "kept"
    command = [sys.executable, str(REPO / "train.py"), *argv(assets, out, save_every=2)]
    result = run_on_tmpfs(command, out, size_kb=size_kb, keep=kept, env=ENV)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "the export failed" in lines[0] and "Traceback" not in result.stderr
    assert "--resume=true" in lines[0] and not (kept / "final").exists()
    subprocess.run(
        [sys.executable, str(REPO / "train.py"), *argv(assets, kept, save_every=2, resume="true")],
        env=ENV,
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert same_weights(kept, finished)


def test_a_read_only_out_is_one_line(assets, tmp_path):
    out = tmp_path / "ro"
    command = [sys.executable, str(REPO / "train.py"), *argv(assets, out)]
    result = run_on_tmpfs(command, out, readonly=True, env=ENV)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Read-only file system" in result.stderr, (
        result.stderr
    )
    assert str(out) in result.stderr


# ----------------------------------------------------------------------------- Ctrl-C


def slow(assets: dict, out: Path, **settings) -> list[str]:
    """A run whose steps take long enough to interrupt between them."""
    settings = {"max_steps": 40, "batch_size": 8, "seq_len": 64, **settings}
    return [sys.executable, str(REPO / "train.py"), *argv(assets, out, **settings)]


def wait_for_steps(out: Path, process: subprocess.Popen, steps: int) -> None:
    path = out / "metrics.jsonl"
    while process.poll() is None and (
        not path.is_file() or len(path.read_text().splitlines()) < steps
    ):
        time.sleep(0.02)


@pytest.mark.slow
def test_ctrl_c_checkpoints_then_resume_is_exact(assets, tmp_path):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    subprocess.run(slow(assets, whole), env=ENV, check=True, capture_output=True, timeout=300)
    process = subprocess.Popen(
        slow(assets, stopped), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_steps(stopped, process, 2)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 0 and "Traceback" not in stderr, stderr
    assert "Ctrl-C" in stderr and not (stopped / "final").exists()
    assert len(list((stopped / "checkpoints").iterdir())) == 1
    subprocess.run(
        [*slow(assets, stopped), "--resume=true"],
        env=ENV,
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert same_weights(stopped, whole)


def test_a_second_ctrl_c_exits_at_once(assets, tmp_path):
    """The second Ctrl-C comes while the step in flight still runs (steps of 4096 tokens)."""
    out = tmp_path / "twice"
    command = slow(assets, out, save_every=1000, batch_size=32, seq_len=128)
    process = subprocess.Popen(
        command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_steps(out, process, 1)
    process.send_signal(signal.SIGINT)
    first = process.stderr.readline()  # the handler has run: the flag is set
    process.send_signal(signal.SIGINT)
    stderr = first + process.communicate(timeout=120)[1]
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted")


# ----------------------------------------------------------------------------- bad input, one line


@pytest.mark.parametrize(
    "setting, value, words",
    [
        ("grad_clip", "nan", "setting 'grad_clip' (command line) = 'nan' is not a valid finite"),
        ("min_lr", "nan", "'min_lr' (command line) = 'nan'"),
        ("weight_decay", "inf", "'weight_decay' (command line) = 'inf'"),
        ("teacher_weights", "nan,1", "'teacher_weights' (command line) = 'nan'"),
        ("rollout_temperature", "nan", "'rollout_temperature' (command line) = 'nan'"),
        ("precision", "fp16", "precision=fp16 on a CPU"),
        ("resume_changes", "lr", "resume_changes=lr: a resume may change only"),
    ],
)
def test_bad_settings_are_one_line(assets, tmp_path, setting, value, words, capsys):
    line = fails(argv(assets, tmp_path / "x", **{setting: value}), capsys)
    assert words in line, line
    assert not (tmp_path / "x" / "train_config.toml").exists(), "nothing on record for a refusal"


def test_a_toml_list_where_a_number_belongs(assets, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("lr = [1, 2]\n")
    line = fails([f"--config={config}", *argv(assets, tmp_path / "x")], capsys)
    assert "setting 'lr'" in line and "[1, 2] is not a valid finite number" in line, line


def test_config_json_values_are_checked_and_missing_ones_named(assets, tmp_path, capsys):
    broken = tmp_path / "teacher"
    shutil.copytree(assets["teacher"], broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "hidden_size": "64"}))
    line = fails(argv(assets, tmp_path / "x", teacher=broken), capsys)
    assert 'config key hidden_size = "64" has the wrong type (want int)' in line, line

    config.pop("rope_parameters", None)
    config.pop("rope_theta", None)
    (broken / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    loaded = hf_config.load_config(broken)
    err = capsys.readouterr().err
    assert loaded.rope_theta == 10000.0 and err.count("\n") == 1, err
    assert err.startswith("warning: ") and "has no rope_theta; using llama's default" in err


def test_a_lone_surrogate_in_the_data_is_one_line(assets, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "a \\ud800 b"}\n')
    assert ":2: holds a lone UTF-16 surrogate" in fails(
        argv(assets, tmp_path / "x", data=data), capsys
    )


# ----------------------------------------------------------------------------- fp16 skipped steps


def test_skipped_fp16_steps_are_counted():
    """train_step says when the loss scaler skipped the step: a huge initial scale overflows
    the fp16 gradients (skipped, scale halved), a small one does not."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from kd.data import Batches, Example
    from kd.losses import LossOptions
    from kd.model import Transformer
    from kd.model_config import ModelConfig
    from kd.offpolicy import KDLoss, OffPolicy
    from kd.optim import build_optimizer
    from kd.training import train_step

    config = ModelConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    world = parallel.init_distributed()
    try:
        with torch.device("meta"):
            student = Transformer(config)
        parallel.shard_student(
            student, precision="fp16", activation_checkpointing=False, compile=False
        )
        student.to_empty(device="cpu")
        reference = Transformer(config)
        reference.init_weights(seed=0)
        parallel.load_full_state_dict(student, reference.state_dict())
        examples = [Example([1, 2, 3, 4], [2, 3, 4, -100], [], 3, 0)]
        data = Batches(
            [(examples, 1.0)], batch_size=1, grad_accum=1, rank=0, world_size=1, seed=0, pad_id=0
        )
        method = OffPolicy(data, KDLoss([], LossOptions(alpha=0.0), 32, 16))
        optimizer = build_optimizer(student, lr=1e-3, weight_decay=0.0, fused=False)
        for init_scale, want in ((2.0**60, True), (1.0, False)):
            scaler = ShardedGradScaler(device=world.device.type, init_scale=init_scale)
            _, _, skipped = train_step(
                student,
                method,
                method.micro_batches(0),
                optimizer=optimizer,
                scaler=scaler,
                grad_clip=1.0,
            )
            assert skipped is want, (init_scale, skipped)
    finally:
        parallel.shutdown()
