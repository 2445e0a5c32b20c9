"""`make demo`: distill a real pretrained teacher into a shallower student on a laptop CPU,
end to end, and report how much of the teacher the student recovered.

    .venv/bin/python scripts/demo.py                 # what `make demo` runs; OUT = runs/demo
    .venv/bin/python scripts/demo.py --out runs/x --max_steps=50   # --key=value goes to train.py

The stages, each skipped when its output exists (every output is written atomically, so
Ctrl-C and a rerun resume where the run stopped; training resumes from its last checkpoint):
  1. The teacher (SmolLM2-135M-Instruct) answers the 320 training prompts of data/prompts/
     greedily with generate.py: the response-distillation data set (sequence-level KD, Kim &
     Rush, arXiv 1606.07947, who train on the teacher's beam-search output, its mode).
     Greedy rather than sampled: it is that mode, it is deterministic, and the held-out
     references below are greedy too, so training and evaluation agree on what to imitate.
  2. The teacher answers the 64 held-out prompts greedily: the evaluation references.
  3. Evaluate the student before distillation: the teacher's layers `student_layers` of
     configs/demo.toml (every third of 30), embeddings and final norm copied (kd/student.py).
  4. Distill: train.py with configs/demo.toml (forward KL + cross-entropy on the teacher's
     responses, a fixed step budget; bf16 where this CPU is faster in it; 3x the steps on a GPU).
  5. Evaluate the distilled student and the teacher (kd/evaluate.py).
  6. OUT/report.md: the table, the training curves (OUT/curves.png), answers side by side.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (train.py's own student construction, reused for "before")
from kd import checkpoint, hf  # noqa: E402
from kd.config import TrainConfig, load_config  # noqa: E402
from kd.dtypes import DTYPES, fast_precision  # noqa: E402
from kd.evaluate import (
    SPEED_BATCH,
    SPEED_TOKENS,
    describe_machine,
    evaluate,
    format_table,
    load_eval_set,
)  # noqa: E402
from kd.model import Transformer  # noqa: E402
from kd.tokenizer import load_tokenizer  # noqa: E402

GPU_STEP_FACTOR = 3  # a GPU does the CPU budget in seconds; spend some of the saving on more steps
EXAMPLES_SHOWN = 2  # held-out answers printed side by side: the first ones, not hand-picked
QUALITY = (
    "kl",
    "ppl",
    "top1_agreement",
    "rouge_l",
)  # metrics where the distilled student must beat "before"
LOWER_IS_BETTER = {"kl", "ppl"}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Other --key=value arguments override "
        "configs/demo.toml settings of train.py (see `train.py --help`).",
    )
    p.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="run directory (default runs/demo)"
    )
    p.add_argument(
        "--teacher",
        default="models/smollm2-135m-instruct",
        help="teacher HF directory (`make teacher`)",
    )
    p.add_argument(
        "--config", type=Path, default=ROOT / "configs/demo.toml", help="train.py settings"
    )
    p.add_argument("--train-prompts", type=Path, default=ROOT / "data/prompts/train.jsonl")
    p.add_argument("--heldout-prompts", type=Path, default=ROOT / "data/prompts/heldout.jsonl")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="longest teacher and student answer"
    )
    p.add_argument(
        "--batch-size", type=int, default=64, help="prompts per batch when generating answers"
    )
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        raise ValueError(
            f"unexpected argument {bad[0]!r}: demo options are listed by --help; train.py settings "
            "are given as --key=value"
        )
    return args, rest


def train_args(args: argparse.Namespace, overrides: list[str], precision: str) -> list[str]:
    """train.py's arguments: the demo config, this run's paths and precision, then the user's overrides."""
    data = args.out / "data"
    return [
        f"--config={args.config}",
        f"--teacher={args.teacher}",
        f"--data={data / 'train.jsonl'}",
        f"--eval_data={data / 'heldout.jsonl'}",
        f"--out={args.out / 'train'}",
        f"--precision={precision}",
        *overrides,
    ]


# ----------------------------------------------------------------------------- running stages


class Clock:
    """Wall seconds per stage, for the progress lines and the report's time table."""

    def __init__(self) -> None:
        self.t0, self.rows = time.perf_counter(), []

    def stage(self, n: int, name: str, done: Path, work: Callable[[], None]) -> None:
        """Run `work()` unless `done` exists; print a header and the time it took."""
        print(f"\n[{n}/6] {name}", flush=True)
        if done.exists():
            print(f"  done already: {done}")
            self.rows.append((name, None))
            return
        t0 = time.perf_counter()
        work()
        self.rows.append((name, time.perf_counter() - t0))
        print(
            f"  {self.rows[-1][1]:.0f} s; {time.perf_counter() - self.t0:.0f} s since the start",
            flush=True,
        )

    def table(self) -> str:
        lines = ["| stage | wall time |", "| --- | ---: |"]
        lines += [
            f"| {name} | " + ("skipped (done earlier) |" if wall is None else f"{wall:.0f} s |")
            for name, wall in self.rows
        ]
        return "\n".join(lines)


def run_child(cmd: list[str]) -> None:
    """Run a child process to completion. Ctrl-C reaches only us (the child has its own session):
    we pass it on as SIGTERM, on which train.py checkpoints at the next step boundary and
    generate.py stops (its finished batches are already on disk); a second Ctrl-C kills it."""
    print("  $ " + " ".join(cmd), flush=True)
    child = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGTERM)
        print(
            "\ninterrupted: stopping cleanly (Ctrl-C again to kill)...", file=sys.stderr, flush=True
        )
        try:
            child.wait()
        except KeyboardInterrupt:
            child.kill()
            child.wait()
        raise
    if rc != 0:
        raise ChildFailed(
            f"{Path(cmd[1]).name} exited with status {rc} (its message is above); fix it and rerun "
            "the demo: finished stages are kept"
        )


class ChildFailed(Exception):
    """A stage's subprocess failed; it has printed its own error."""


def write_json(path: Path, data: dict) -> None:
    """Write-then-rename, so a result file is complete or absent."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def slug(name: str) -> str:
    return name.replace(" ", "_")


def for_eval(model: Transformer, device: torch.device, dtype: torch.dtype) -> Transformer:
    return model.to(device=device, dtype=dtype).decode_layout().eval().requires_grad_(False)


def student_before(cfg: TrainConfig) -> Transformer:
    """The student exactly as train.py builds it at step 0 (train.student_config/student_weights)."""
    config = train.student_config(cfg, hf.load_config(cfg.teacher[0]))
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(train.student_weights(cfg), strict=True, assign=True)
    return model


def evaluate_stage(
    name: str,
    model: Transformer,
    teacher: Transformer,
    tokenizer,
    eval_set,
    out: Path,
    args: argparse.Namespace,
    answers: list[str] | None = None,
) -> None:
    metrics = evaluate(
        model,
        tokenizer,
        eval_set,
        teacher=teacher,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        answers=answers,
        log=lambda s: print(s, flush=True),
    )
    print(f"  {name}: " + format_table({name: metrics}).splitlines()[-1])
    write_json(out / f"{slug(name)}.json", metrics)


# ----------------------------------------------------------------------------- the report


def metrics_note(n_prompts: int) -> str:
    """What the table's columns are, for the report and docs/results.md."""
    return (
        "KL, perplexity and top-1 agreement are per token of the teacher's greedy held-out answers (teacher-"
        "forced); Rouge-L F1 (MiniLLM protocol) compares each model's greedy answer with the teacher's (the "
        "teacher's own answers are the references: 100 by construction); tokens/s is greedy generation of "
        f"exactly {SPEED_TOKENS} new tokens for the first {min(SPEED_BATCH, n_prompts)} held-out prompts in one "
        "batch, prefill included: "
        "the same work for every model (a speed, not a quality metric)."
    )


def verdict(before: dict, after: dict) -> tuple[list[str], bool]:
    """Lines saying whether distillation helped on every quality metric and closed half the KL gap.
    The teacher's own KL is 0, so the gap before is before["kl"]."""
    lines, ok = [], True
    for key in QUALITY:
        better = after[key] < before[key] if key in LOWER_IS_BETTER else after[key] > before[key]
        ok &= better
        lines.append(
            f"- {key}: {before[key]:.4g} -> {after[key]:.4g} ({'better' if better else 'NOT better'})"
        )
    recovered = (before["kl"] - after["kl"]) / before["kl"]
    ok &= recovered >= 0.5
    lines.append(f"- held-out KL gap to the teacher closed: {recovered:.0%} (target >= 50%)")
    return lines, ok


def shorten(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def examples_markdown(eval_set, results: dict[str, dict]) -> str:
    blocks = []
    for i in range(min(EXAMPLES_SHOWN, len(eval_set.questions))):
        rows = [
            f"**Prompt:** {shorten(eval_set.questions[i])}",
            "",
            "| model | answer |",
            "| --- | --- |",
        ]
        rows += [
            f"| {name} | {shorten(m['answers'][i]).replace('|', '/')} |"
            for name, m in results.items()
        ]
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks)


def print_examples(eval_set, results: dict[str, dict]) -> None:
    for i in range(min(EXAMPLES_SHOWN, len(eval_set.questions))):
        print(f"\nPrompt: {shorten(eval_set.questions[i])}")
        for name, m in results.items():
            print(f"  {name:>15}: {shorten(m['answers'][i], 240)}")


def write_report(
    args: argparse.Namespace,
    cfg: TrainConfig,
    eval_set,
    results: dict[str, dict],
    clock: Clock,
    device: torch.device,
    curves: bool,
) -> Path:
    table = format_table(results)
    lines, ok = verdict(results["student before"], results["student after"])
    steps = [
        json.loads(line) for line in (args.out / "train/metrics.jsonl").read_text().splitlines()
    ]
    last = next((r for r in reversed(steps) if "tokens_per_s" in r), {})
    report = "\n".join(
        [
            f"# kd demo: {Path(cfg.teacher[0]).name} -> a {len(cfg.student_layers)}-layer student",
            "",
            f"Machine: {describe_machine(device)}; precision {cfg.precision}.",
            "",
            f"Student: teacher layers {list(cfg.student_layers)}, embeddings and final norm copied. "
            f"Data: {args.train_prompts.name} prompts answered greedily by the teacher (<= {args.max_new_tokens} "
            f"tokens). Training: loss {cfg.loss} (alpha {cfg.alpha}, T {cfg.temperature}), {cfg.max_steps} steps of "
            f"{cfg.batch_size * cfg.grad_accum} examples, lr {cfg.lr} (warmup {cfg.warmup_steps}, cosine to "
            f"{cfg.min_lr}), {last.get('tokens_per_s', float('nan')):.0f} training tokens/s at the end.",
            "",
            f"## Held-out results ({len(eval_set.prompts)} prompts, {len(eval_set.examples)} teacher responses)",
            "",
            metrics_note(len(eval_set.prompts)),
            "",
            table,
            "",
            "Distilled vs before:",
            *lines,
            "",
            *(["## Training curves", "", "![training curves](curves.png)", ""] if curves else []),
            "## Answers side by side (the first held-out prompts)",
            "",
            examples_markdown(eval_set, results),
            "",
            "## Time",
            "",
            clock.table(),
        ]
    )
    path = args.out / "report.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(report + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(f"\n{table}\n\nDistilled vs before:\n" + "\n".join(lines))
    print(
        "\nresult: "
        + (
            "the distilled student beats its start on every metric and closed at least half the KL gap"
            if ok
            else "the distilled student did NOT meet the demo's bar (see above)"
        )
    )
    return path


# ----------------------------------------------------------------------------- main


def main(argv: list[str]) -> None:
    args, overrides = parse_args(argv)
    clock = Clock()
    if not (Path(args.teacher) / "config.json").is_file():
        raise FileNotFoundError(
            f"no teacher at {args.teacher}: run `make teacher` (or pass --teacher DIR)"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = fast_precision(device)
    dtype = DTYPES[precision]
    cfg = load_config(
        train_args(args, overrides, precision)
    )  # checks every setting before any work
    if device.type == "cuda" and not any(o.startswith("--max_steps=") for o in overrides):
        overrides = [*overrides, f"--max_steps={cfg.max_steps * GPU_STEP_FACTOR}"]
        cfg = load_config(train_args(args, overrides, precision))
    print(f"kd demo: {describe_machine(device)}; compute in {precision}; output in {args.out}")
    data, evals = args.out / "data", args.out / "eval"
    data.mkdir(parents=True, exist_ok=True)
    evals.mkdir(parents=True, exist_ok=True)

    def teacher_answers(prompts: Path, output: Path):
        return lambda: run_child(
            [
                sys.executable,
                str(ROOT / "generate.py"),
                "--model",
                args.teacher,
                "--prompts-file",
                str(prompts),
                "--output",
                str(output),
                "--chat",
                "--temperature",
                "0",
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--batch-size",
                str(args.batch_size),
                "--dtype",
                precision,
            ]
        )

    clock.stage(
        1,
        "teacher answers the training prompts",
        data / "train.jsonl",
        teacher_answers(args.train_prompts, data / "train.jsonl"),
    )
    clock.stage(
        2,
        "teacher answers the held-out prompts",
        data / "heldout.jsonl",
        teacher_answers(args.heldout_prompts, data / "heldout.jsonl"),
    )

    tokenizer = load_tokenizer(args.teacher)
    eval_set = load_eval_set(data / "heldout.jsonl", tokenizer)
    teacher = None

    def get_teacher() -> Transformer:  # loaded once, only if an evaluation still has to run
        nonlocal teacher
        if teacher is None:
            teacher = for_eval(hf.load_model(args.teacher, dtype=dtype), device, dtype)
        return teacher

    clock.stage(
        3,
        "evaluate the student before distillation",
        evals / "student_before.json",
        lambda: evaluate_stage(
            "student before",
            for_eval(student_before(cfg), device, dtype),
            get_teacher(),
            tokenizer,
            eval_set,
            evals,
            args,
        ),
    )

    train_dir = args.out / "train"

    def distill() -> None:
        resume = ["--resume=true"] if checkpoint.complete_checkpoints(train_dir) else []
        run_child(
            [
                sys.executable,
                str(ROOT / "train.py"),
                *train_args(args, overrides, precision),
                *resume,
            ]
        )
        if not (
            train_dir / "final"
        ).is_dir():  # train.py stops early, with a checkpoint, on a SIGTERM
            raise ChildFailed(
                f"train.py stopped before step {cfg.max_steps}; run the demo again to resume it"
            )

    clock.stage(
        4, f"distill: {cfg.max_steps} steps of train.py ({cfg.loss})", train_dir / "final", distill
    )

    def evaluate_after() -> None:
        if not (
            evals / "student_after.json"
        ).exists():  # done before an interrupted teacher evaluation
            student = for_eval(hf.load_model(train_dir / "final", dtype=dtype), device, dtype)
            evaluate_stage(
                "student after", student, get_teacher(), tokenizer, eval_set, evals, args
            )
        # The teacher's greedy answers are the references (stage 2): not generated a second time.
        evaluate_stage(
            "teacher",
            get_teacher(),
            get_teacher(),
            tokenizer,
            eval_set,
            evals,
            args,
            answers=eval_set.references,
        )

    clock.stage(
        5, "evaluate the distilled student and the teacher", evals / "teacher.json", evaluate_after
    )

    print("\n[6/6] report")
    curves = args.out / "curves.png"
    run_child(
        [
            sys.executable,
            str(ROOT / "scripts/plot_metrics.py"),
            str(train_dir),
            "--out",
            str(curves),
        ]
    )
    results = {
        name: json.loads((evals / f"{slug(name)}.json").read_text(encoding="utf-8"))
        for name in ("teacher", "student before", "student after")
    }
    print_examples(eval_set, results)
    report = write_report(args, cfg, eval_set, results, clock, device, curves.is_file())
    print(
        f"\nreport: {report}  (curves: {curves})\ndemo finished in {time.perf_counter() - clock.t0:.0f} s"
    )


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, ChildFailed) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: run the demo again to resume where it stopped", file=sys.stderr)
        sys.exit(130)
