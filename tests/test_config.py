"""TrainConfig: TOML files, `--key=value` overrides, type conversion, validation, --help.

Checks that every setting parses from both TOML and the command line (lists comma-separated,
booleans true/false), that overrides win over the file, that unknown keys and bad values are
one-line ValueErrors naming the setting, that the saved `to_toml()` loads back equal, and
that every config in configs/ (on-policy ones included) parses and validates.

Run: .venv/bin/python -m pytest -q tests/test_config.py
"""

from dataclasses import fields
from pathlib import Path

import pytest

from kd.config import TrainConfig, help_text, load_config

REQUIRED = ["--teacher=t", "--student=s", "--data=d.jsonl"]


def test_toml_then_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        'teacher = ["a", "b"]\nteacher_weights = [0.25, 0.75]\nstudent_layers = [0, 3]\n'
        'data = "x.jsonl"\nlr = 1e-3\nmax_steps = 7\nresume = true\n'
    )
    cfg = load_config(
        ["--config", str(toml), "--lr=2e-4", "--data=y.jsonl,z.jsonl", "--resume=false"]
    )
    assert cfg.teacher == ("a", "b") and cfg.teacher_weights == (0.25, 0.75)
    assert cfg.student_layers == (0, 3) and cfg.max_steps == 7
    assert cfg.lr == 2e-4 and cfg.data == ("y.jsonl", "z.jsonl") and cfg.resume is False


def test_every_setting_has_a_command_line_form_and_help():
    text = help_text()
    for f in fields(TrainConfig):
        assert f"--{f.name}=" in text, f.name
        line = next(line for line in text.splitlines() if line.startswith(f"  --{f.name}="))
        assert len(line.split(maxsplit=1)) == 2, f"{f.name} has no help: {line!r}"
    cfg = load_config(
        [
            "--teacher=t",
            "--data=d",
            "--activation_checkpointing=true",
            "--student_layers=1,2",
            "--loss=jsd",
        ]
    )
    assert cfg.activation_checkpointing is True and cfg.loss == "jsd"


def test_to_toml_round_trip(tmp_path):
    cfg = load_config(
        [
            "--teacher=a,b",
            "--student_layers=0,2",
            "--data=x.jsonl",
            "--out=runs/x y",
            "--compile=true",
        ]
    )
    path = tmp_path / "saved.toml"
    path.write_text(cfg.to_toml())
    assert load_config(["--config", str(path)]) == cfg


@pytest.mark.parametrize(
    "argv, words",
    [
        ([*REQUIRED, "--learning_rate=1"], ["learning_rate", "--help"]),
        ([*REQUIRED, "--max_steps=ten"], ["max_steps", "ten"]),
        ([*REQUIRED, "--resume=maybe"], ["resume", "maybe"]),
        ([*REQUIRED, "--loss=kl"], ["loss", "forward_kl"]),
        ([*REQUIRED, "--precision=fp8"], ["precision", "bf16"]),
        ([*REQUIRED, "--alpha=1.5"], ["alpha"]),
        ([*REQUIRED, "--grad_accum=0"], ["grad_accum"]),
        (["--student=s", "--data=d"], ["teacher"]),
        (["--teacher=t", "--data=d"], ["student", "student_layers"]),
        ([*REQUIRED, "--student_layers=1"], ["exactly one"]),
        ([*REQUIRED, "--teacher_weights=1,2"], ["teacher_weights"]),
        ([*REQUIRED, "positional"], ["positional"]),
        ([*REQUIRED, "--method=rl"], ["method", "gkd", "minillm"]),
        (
            ["--teacher=a,b", "--student=s", "--data=d", "--method=gkd"],
            ["method=gkd", "one teacher"],
        ),
        ([*REQUIRED, "--method=minillm", "--teacher_cache=c"], ["method=minillm", "teacher_cache"]),
        (
            ["--teacher_cache=c", "--student_layers=0", "--data=d", "--eval_data="],
            ["teacher_cache", "'student'"],
        ),
        (
            ["--teacher=a,b", "--student=s", "--teacher_cache=c", "--data=d", "--eval_data="],
            ["teacher_cache", "at most one teacher"],
        ),
        ([*REQUIRED, "--lm_data=pt.jsonl"], ["lm_data", "method=minillm"]),
        ([*REQUIRED, "--method=gkd", "--max_new_tokens=0"], ["max_new_tokens=0"]),
        ([*REQUIRED, "--method=minillm", "--rollout_top_p=0"], ["rollout_top_p"]),
        ([*REQUIRED, "--lmbda=2"], ["lmbda=2"]),
        ([*REQUIRED, "--ppo_clip=1"], ["ppo_clip=1"]),
        ([*REQUIRED, "--lm_loss_weight=-1"], ["lm_loss_weight"]),
    ],
)
def test_bad_values_name_the_setting(argv, words):
    with pytest.raises(ValueError) as info:
        load_config(argv)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_an_api_teachers_cache_needs_no_teacher():
    """The cache's ids index the student's vocabulary: the student's tokenizer reads the data."""
    cfg = load_config(["--teacher_cache=c", "--student=s", "--data=d.jsonl", "--eval_data="])
    assert cfg.teacher == () and cfg.tokenizer_dir == "s"
    assert load_config(REQUIRED).tokenizer_dir == "t"


def test_unknown_key_in_toml_and_missing_file(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('teacher = "t"\nstudent = "s"\ndata = "d"\nwarmup = 3\n')
    with pytest.raises(ValueError, match=f"unknown setting 'warmup' in {toml}"):
        load_config(["--config", str(toml)])
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(["--config", str(tmp_path / "nope.toml")])
    toml.write_text("teacher = [\n")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_config([f"--config={toml}"])


CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_loads(path):
    load_config(["--config", str(path)])  # parses and validates; paths are checked at run time


def test_every_example_config_is_checked():
    names = {p.stem for p in CONFIGS}
    expected = {"smollm2_kd", "gkd_cpu", "minillm_cpu", "gkd_gpu", "minillm_gpu"}
    assert expected | {"qwen3_8b_to_1p7b", "gemma3_12b_to_1b", "qwen3_30b_a3b_to_4b"} <= names, (
        names
    )
