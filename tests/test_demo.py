"""Smoke test of the `make demo` pipeline (scripts/demo.py) on a tiny random teacher: every
stage runs for real (generate.py, the student built as train.py builds it, train.py for a few
steps, evaluation, the curves and report.md); a rerun skips every finished stage; a run stopped
after its last checkpoint resumes training from it instead of starting over; bad input is one
`error:` line.

Run: `.venv/bin/python -m pytest -q tests/test_demo.py` (~30 s on 2 cores).
"""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import TINY_VOCAB_SIZE, make_tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)
spec = importlib.util.spec_from_file_location(
    "compare_methods_script", REPO / "scripts" / "compare_methods.py"
)
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

# A few steps of a 2-layer student of a 4-layer teacher on 6 answers; short answers everywhere.
TINY_SETTINGS = [
    "--student_layers=0,3",
    "--max_steps=4",
    "--batch_size=2",
    "--seq_len=64",
    "--warmup_steps=1",
    "--log_every=1",
    "--eval_every=2",
    "--save_every=2",
    "--keep_checkpoints=1",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("demo")
    teacher = root / "teacher"
    make_tiny_checkpoint(
        teacher, "llama", vocab_size=TINY_VOCAB_SIZE, num_hidden_layers=4, initializer_range=0.2
    )
    make_tiny_tokenizer(teacher)
    prompts = [
        "What is the capital of Spain?",
        "Explain a tokenizer.",
        "Tell me about the river.",
        "def add(a, b):",
        "Name a planet.",
        "Count to three.",
        "Why is the sky blue?",
        "Write a haiku.",
    ]
    train, heldout = root / "train.jsonl", root / "heldout.jsonl"
    train.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[:6]))
    heldout.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[6:]))
    args = [
        "--teacher",
        str(teacher),
        "--train-prompts",
        str(train),
        "--heldout-prompts",
        str(heldout),
        "--max-new-tokens",
        "8",
        "--batch-size",
        "4",
        *TINY_SETTINGS,
    ]
    return {"root": root, "args": args}


def run_demo(out: Path, args: list[str], capfd) -> str:
    demo.main(["--out", str(out), *args])
    captured = capfd.readouterr()
    return captured.out + captured.err


def test_demo_runs_end_to_end_skips_finished_stages_and_resumes(tiny, capfd) -> None:
    out = tiny["root"] / "run"
    log = run_demo(out, tiny["args"], capfd)
    report = (out / "report.md").read_text()
    assert "| model | params (M) | KL to teacher ↓ |" in report
    for row in ("| teacher |", "| student before |", "| student after |"):
        assert row in report
    assert "held-out KL gap to the teacher closed" in report and "Answers side by side" in report
    assert (out / "curves.png").stat().st_size > 0 and "![training curves](curves.png)" in report
    assert len((out / "data" / "train.jsonl").read_text().splitlines()) == 6
    teacher = json.loads((out / "eval" / "teacher.json").read_text())
    assert (
        teacher["kl"] == 0.0 and teacher["top1_agreement"] == 1.0 and len(teacher["answers"]) == 2
    )
    assert "step 4/4" in log and "done already" not in log

    # A rerun only rewrites the report.
    log = run_demo(out, tiny["args"], capfd)
    assert log.count("done already") == 5, log
    assert str(REPO / "train.py") not in log
    assert (out / "report.md").read_text().count("skipped (done earlier)") == 5

    # As if the run had stopped after its last checkpoint, before the export and evaluations:
    # training resumes from the checkpoint (no step is trained again) and the rest follows.
    shutil.rmtree(out / "train" / "final")
    for name in ("student_after.json", "teacher.json"):
        (out / "eval" / name).unlink()
    log = run_demo(out, tiny["args"], capfd)
    assert "--resume=true" in log and "resumed from" in log and "step_000004" in log
    assert "step 1/4" not in log and log.count("done already") == 3
    assert (out / "train" / "final" / "config.json").is_file() and (
        out / "eval" / "teacher.json"
    ).is_file()


def test_compare_methods_writes_results(tiny, tmp_path, capfd) -> None:
    demo_out = tiny["root"] / "run"  # the demo run above supplies the data and its own evaluation
    if not (demo_out / "eval" / "teacher.json").is_file():
        run_demo(demo_out, tiny["args"], capfd)
    results = tmp_path / "results.md"
    settings = [
        a
        for a in TINY_SETTINGS
        if not a.startswith(("--eval_every", "--save_every", "--max_steps"))
    ]
    compare.main(
        [
            "--demo",
            str(demo_out),
            "--out",
            str(tmp_path / "compare"),
            "--teacher",
            tiny["args"][1],
            "--methods",
            "sft,jsd",
            "--results",
            str(results),
            "--max-new-tokens",
            "8",
            "--batch-size",
            "4",
            *settings,
            "--max_steps=2",
        ]
    )
    text = results.read_text()
    assert (
        "## make demo" in text
        and "## Methods at equal steps and data" in text
        and "Machine: " in text
    )
    for row in ("| teacher |", "| student before |", "| student after |", "| sft |", "| jsd |"):
        assert row in text
    assert "2 steps x 2 examples" in text
    compare.main(
        [
            "--demo",
            str(demo_out),
            "--methods",
            "",
            "--results",
            str(results),
            "--note",
            "Shared CPU.",
        ]
    )
    text = results.read_text()
    assert "## make demo" in text and "## Methods" not in text and "Shared CPU." in text
    with pytest.raises(ValueError, match="unknown method 'dpo'"):
        compare.main(["--demo", str(demo_out), "--methods", "dpo"])


@pytest.mark.parametrize(
    "args, error, message",
    [
        (["--teacher", "/no/such/teacher"], FileNotFoundError, "no teacher at /no/such/teacher"),
        (["--no_such_setting=1"], ValueError, "unknown setting '--no_such_setting'"),
        (["stray"], ValueError, "unexpected argument 'stray'"),
    ],
)
def test_user_errors(tiny, tmp_path, args, error, message) -> None:
    with pytest.raises(error, match=message):
        demo.main(["--out", str(tmp_path / "x"), *tiny["args"], *args])  # a later --teacher wins


def test_cli_error_is_one_line(tmp_path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "demo.py"),
            "--out",
            str(tmp_path),
            "--teacher",
            str(tmp_path / "none"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        proc.returncode == 1
        and proc.stderr.startswith("error: no teacher at ")
        and proc.stderr.count("\n") == 1
    )
