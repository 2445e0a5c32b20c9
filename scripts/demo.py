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
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kd.config import TrainConfig, load_config  # noqa: E402
from kd.dtypes import DTYPES, fast_precision  # noqa: E402
from kd.evaluate import (  # noqa: E402
    EvalSet,
    Rows,
    describe_machine,
    for_eval,
    format_table,
    load_eval_set,
    metrics_note,
    verdict,
)
from kd.pipeline import run_child, run_script, run_train, train_args  # noqa: E402
from kd.tokenizer import load_tokenizer  # noqa: E402
from kd.training import initial_student  # noqa: E402

GPU_STEP_FACTOR = 3  # a GPU does the CPU budget in seconds; spend some of the saving on more steps
EXAMPLES_SHOWN = 2  # held-out answers printed side by side: the first ones, not hand-picked


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


def demo_train_args(args: argparse.Namespace, overrides: list[str], precision: str) -> list[str]:
    """train.py's arguments: the demo config, this run's paths and precision, then the user's
    overrides."""
    return train_args(
        config=args.config,
        teacher=args.teacher,
        data=args.out / "data",
        out=args.out / "train",
        precision=precision,
        extra=overrides,
    )


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


# ----------------------------------------------------------------------------- the report


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


def report_text(
    args: argparse.Namespace,
    cfg: TrainConfig,
    eval_set: EvalSet,
    results: dict[str, dict],
    clock: Clock,
    device: torch.device,
    curves: bool,
) -> str:
    """OUT/report.md: settings, the table, the verdict, curves, answers, time per stage."""
    lines, _ = verdict(results["student before"], results["student after"])
    steps = (args.out / "train/metrics.jsonl").read_text().splitlines()
    last = next((r for r in map(json.loads, reversed(steps)) if "tokens_per_s" in r), {})
    n_prompts = len(eval_set.prompts)
    return "\n".join(
        [
            f"# kd demo: {Path(cfg.teacher[0]).name} -> a {len(cfg.student_layers)}-layer student",
            "",
            f"Machine: {describe_machine(device)}; precision {cfg.precision}.",
            "",
            f"Student: teacher layers {list(cfg.student_layers)}, embeddings and final norm "
            f"copied. Data: {args.train_prompts.name} prompts answered greedily by the teacher "
            f"(<= {args.max_new_tokens} tokens). Training: loss {cfg.loss} (alpha {cfg.alpha}, "
            f"T {cfg.temperature}), {cfg.max_steps} steps of {cfg.batch_size * cfg.grad_accum} "
            f"examples, lr {cfg.lr} (warmup {cfg.warmup_steps}, cosine to {cfg.min_lr}), "
            f"{last.get('tokens_per_s', float('nan')):.0f} training tokens/s at the end.",
            "",
            f"## Held-out results ({n_prompts} prompts, {len(eval_set.examples)} teacher "
            "responses)",
            "",
            metrics_note(n_prompts),
            "",
            format_table(results),
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


def write_report(args: argparse.Namespace, text: str, results: dict[str, dict]) -> Path:
    """Write OUT/report.md atomically and print the table and the verdict."""
    path = args.out / "report.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    lines, ok = verdict(results["student before"], results["student after"])
    print(f"\n{format_table(results)}\n\nDistilled vs before:\n" + "\n".join(lines))
    if ok:
        result = "the distilled student beats its start on every metric and closed at least "
        result += "half the KL gap"
    else:
        result = "the distilled student did NOT meet the demo's bar (see above)"
    print("\nresult: " + result)
    return path


# ----------------------------------------------------------------------------- the stages


def teacher_answers(args: argparse.Namespace, precision: str, prompts: Path, output: Path):
    """Stages 1 and 2: generate.py writes the teacher's greedy answers to `prompts`."""
    command = [sys.executable, str(ROOT / "generate.py"), "--model", args.teacher]
    command += ["--prompts-file", str(prompts), "--output", str(output), "--chat"]
    command += ["--temperature", "0", "--max-new-tokens", str(args.max_new_tokens)]
    command += ["--batch-size", str(args.batch_size), "--dtype", precision]
    return lambda: run_child(command)


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
    cfg = load_config(demo_train_args(args, overrides, precision))  # checks every setting first
    if device.type == "cuda" and not any(o.startswith("--max_steps=") for o in overrides):
        overrides = [*overrides, f"--max_steps={cfg.max_steps * GPU_STEP_FACTOR}"]
        cfg = load_config(demo_train_args(args, overrides, precision))
    print(f"kd demo: {describe_machine(device)}; compute in {precision}; output in {args.out}")
    data, evals = args.out / "data", args.out / "eval"
    data.mkdir(parents=True, exist_ok=True)
    evals.mkdir(parents=True, exist_ok=True)

    train_answers = teacher_answers(args, precision, args.train_prompts, data / "train.jsonl")
    clock.stage(1, "teacher answers the training prompts", data / "train.jsonl", train_answers)
    held_out = teacher_answers(args, precision, args.heldout_prompts, data / "heldout.jsonl")
    clock.stage(2, "teacher answers the held-out prompts", data / "heldout.jsonl", held_out)

    tokenizer = load_tokenizer(args.teacher)
    eval_set = load_eval_set(data / "heldout.jsonl", tokenizer)
    dtype = DTYPES[precision]
    rows = Rows(
        evals,
        args.teacher,
        tokenizer,
        eval_set,
        device=device,
        dtype=dtype,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )

    def evaluate_before() -> None:
        rows.row("student before", lambda: for_eval(initial_student(cfg), device, dtype))

    def evaluate_after() -> None:  # the teacher's greedy answers are the references (stage 2)
        rows.row("student after", lambda: rows.load(args.out / "train" / "final"))
        rows.row("teacher", lambda: rows.teacher, answers=eval_set.references)

    clock.stage(
        3,
        "evaluate the student before distillation",
        evals / "student_before.json",
        evaluate_before,
    )
    train_argv = demo_train_args(args, overrides, precision)
    clock.stage(
        4,
        f"distill: {cfg.max_steps} steps of train.py ({cfg.loss})",
        args.out / "train" / "final",
        lambda: run_train(train_argv, args.out / "train"),
    )
    clock.stage(
        5,
        "evaluate the distilled student and the teacher",
        evals / "teacher.json",
        evaluate_after,
    )

    print("\n[6/6] report")
    curves = args.out / "curves.png"
    plot = [sys.executable, str(ROOT / "scripts/plot_metrics.py"), str(args.out / "train")]
    run_child([*plot, "--out", str(curves)])
    results = {name: rows.read(name) for name in ("teacher", "student before", "student after")}
    print_examples(eval_set, results)
    text = report_text(args, cfg, eval_set, results, clock, device, curves.is_file())
    report = write_report(args, text, results)
    seconds = time.perf_counter() - clock.t0
    print(f"\nreport: {report}  (curves: {curves})\ndemo finished in {seconds:.0f} s")


if __name__ == "__main__":
    sys.exit(run_script(main, sys.argv[1:]))
