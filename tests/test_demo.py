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
spec = importlib.util.spec_from_file_location(
    "compare_pruning_script", REPO / "scripts" / "compare_pruning.py"
)
compare_pruning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_pruning)

# A few steps of a 2-layer student of a 4-layer teacher on 6 answers; short answers everywhere.
TINY_SETTINGS = [
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
        "--student-params",
        "100K",  # the teacher has 180,800: fit_budget gives 2 layers, ffn 88, hidden 56
        *TINY_SETTINGS,
    ]
    return {"root": root, "args": args}


def run_demo(out: Path, args: list[str], capfd) -> str:
    demo.main(["--out", str(out), *args])
    captured = capfd.readouterr()
    return captured.out + captured.err


@pytest.mark.slow
def test_demo_runs_end_to_end_skips_finished_stages_and_resumes(tiny, capfd) -> None:
    out = tiny["root"] / "run"
    log = run_demo(out, tiny["args"], capfd)
    report = (out / "report.md").read_text()
    assert "| model | params (M) | KL to teacher ↓ |" in report
    for row in ("| teacher |", "| student before |", "| student after |"):
        assert row in report
    assert "held-out KL gap to the teacher closed" in report and "Answers side by side" in report
    assert (out / "curves.png").stat().st_size > 0 and "![training curves](curves.png)" in report
    answers = (out / "data" / "answers.jsonl").read_text().splitlines()
    kept = (out / "data" / "train.jsonl").read_text().splitlines()
    assert len(answers) == 6 and set(kept) <= set(answers)
    assert [json.loads(r)["response"] for r in answers if r not in kept] == [
        r for r in (json.loads(a)["response"] for a in answers) if demo.is_degenerate(r)
    ]
    assert f"kept {len(kept)} of 6 answers" in log
    student = json.loads((out / "student" / "config.json").read_text())
    assert (student["num_hidden_layers"], student["hidden_size"]) == (2, 56)
    assert "pruned from the teacher by activation importance" in report
    teacher = json.loads((out / "eval" / "teacher.json").read_text())
    assert (
        teacher["kl"] == 0.0 and teacher["top1_agreement"] == 1.0 and len(teacher["answers"]) == 2
    )
    assert "step 4/4" in log and "done already" not in log

    # A rerun only rewrites the report.
    log = run_demo(out, tiny["args"], capfd)
    assert log.count("done already") == 6, log
    assert str(REPO / "train.py") not in log
    assert (out / "report.md").read_text().count("skipped (done earlier)") == 6

    # As if the run had stopped after its last checkpoint, before the export and evaluations:
    # training resumes from the checkpoint (no step is trained again) and the rest follows.
    shutil.rmtree(out / "train" / "final")
    for name in ("student_after.json", "teacher.json"):
        (out / "eval" / name).unlink()
    log = run_demo(out, tiny["args"], capfd)
    assert "--resume=true" in log and "resumed from" in log and "step_000004" in log
    assert "step 1/4" not in log and log.count("done already") == 4
    assert (out / "train" / "final" / "config.json").is_file() and (
        out / "eval" / "teacher.json"
    ).is_file()


def test_a_rerun_with_other_settings_is_refused(tiny, tmp_path, capfd) -> None:
    out = tiny["root"] / "run"  # the demo run above
    if not (out / "demo.json").is_file():
        run_demo(out, tiny["args"], capfd)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="made with student_params = '100K', not '90K'"):
        demo.main(["--out", str(out), *tiny["args"], "--student-params", "90K"])
    with pytest.raises(ValueError, match="made with train_overrides"):
        demo.main(["--out", str(out), *tiny["args"], "--lr=1e-3"])
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and has no demo.json"):
        demo.main(["--out", str(other), *tiny["args"]])
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_compare_pruning_writes_its_table(tiny, tmp_path, capfd) -> None:
    demo_out = tiny["root"] / "run"  # the demo run above supplies the data
    if not (demo_out / "data" / "heldout.jsonl").is_file():
        run_demo(demo_out, tiny["args"], capfd)
    assert compare_pruning.every_third(30) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 29]
    assert compare_pruning.every_third(4) == [0, 3]
    out = tmp_path / "cmp"
    settings = [a for a in TINY_SETTINGS if not a.startswith(("--eval_every", "--max_steps"))]
    common = ["--demo", str(demo_out), "--out", str(out), "--teacher", tiny["args"][1]]
    common += ["--params", "100K", "--samples", "4", "--max-new-tokens", "8", "--batch-size", "4"]
    compare_pruning.main([*common, *settings, "--max_steps=2"])
    text = (out / "report.md").read_text()
    rows = [f"| {r} {when} |" for r in compare_pruning.ROWS for when in ("before", "after")]
    assert all(row in text for row in rows) and "| teacher |" in text
    configs = {
        r: json.loads((out / r / "student" / "config.json").read_text())
        for r in compare_pruning.ROWS
    }
    sizes = {r: (c["num_hidden_layers"], c["hidden_size"]) for r, c in configs.items()}
    # 4 teacher layers: the cut keeps 0 and 3, depth the 2 of highest Block Influence, width all
    # 4 narrower, depth_width fit_budget's 2 layers (tests/test_prune.py checks the rule itself)
    assert sizes == {
        "layer_cut": (2, 64),
        "depth": (2, 64),
        "width": (4, 56),
        "depth_width": (2, 56),
    }
    assert "Command: `" in text and "2 steps x 2 examples" in text
    log = capfd.readouterr().out
    compare_pruning.main([*common, *settings, "--max_steps=2"])  # everything is done: skipped
    assert "train.py" not in capfd.readouterr().out and "step 2/2" in log


@pytest.mark.parametrize(
    "args, error, message",
    [
        (["--teacher", "/no/such/teacher"], FileNotFoundError, "no teacher at /no/such/teacher"),
        (["--no_such_setting=1"], ValueError, "unknown setting '--no_such_setting'"),
        (["stray"], ValueError, "unexpected argument 'stray'"),
        (["--student-params", "lots"], ValueError, "parameter count 'lots'"),
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
