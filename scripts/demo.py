"""`make demo`: distill a real pretrained teacher into a student pruned from it, on a laptop CPU,
end to end, and report how much of the teacher the student recovered.

    .venv/bin/python scripts/demo.py                 # what `make demo` runs; OUT = runs/demo
    .venv/bin/python scripts/demo.py --out runs/x --max_steps=50   # --key=value goes to train.py
    .venv/bin/python scripts/demo.py --precision=fp32   # every stage in fp32 (default: auto)

The stages, each skipped when its output exists (every output is written atomically, so
Ctrl-C and a rerun resume where the run stopped; training resumes from its last checkpoint):
  1. The teacher (SmolLM2-135M-Instruct) answers the 320 training prompts of data/prompts/
     greedily with generate.py (OUT/data/answers.jsonl): the response-distillation data set
     (sequence-level KD, Kim & Rush, arXiv 1606.07947, who train on the teacher's beam-search
     output, its mode). Greedy rather than sampled: it is that mode, it is deterministic, and
     the held-out references below are greedy too, so training and evaluation agree on what
     to imitate. Answers that loop (a word 3-gram 3 or more times, kd.evaluate.is_degenerate)
     are left out of OUT/data/train.jsonl: a student imitates loops all too well.
  2. The teacher answers the 64 held-out prompts greedily: the evaluation references (all kept).
  3. Prune the teacher into the student (scripts/prune.py, kd/prune.py): activation importance
     on the training answers, then MLP channels, K/V groups, hidden channels and layers cut to
     --student-params (67M: at most half the teacher's 134.5M).
  4. Evaluate the student before distillation.
  5. Distill: train.py with configs/demo.toml (forward KL + cross-entropy on the teacher's
     responses, a fixed step budget; bf16 where this CPU is faster in it; 3x the steps on a GPU).
  6. Evaluate the distilled student and the teacher (kd/evaluate.py).
  7. OUT/report.md: the table, the training curves (OUT/curves.png), answers side by side.
"""

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kd.config import TrainConfig, load_config  # noqa: E402
from kd.data import read_jsonl  # noqa: E402
from kd.dtypes import DTYPES, fast_precision  # noqa: E402
from kd.evaluate import (  # noqa: E402
    EvalSet,
    Rows,
    describe_machine,
    for_eval,
    format_table,
    is_degenerate,
    load_eval_set,
    metrics_note,
    verdict,
)
from kd.hf_config import load_config as load_model_config  # noqa: E402
from kd.pipeline import (  # noqa: E402
    run_child,
    run_script,
    run_train,
    train_args,
    train_overrides,
    write_json,
    write_text,
)
from kd.prune import parse_count  # noqa: E402
from kd.tokenizer import load_tokenizer  # noqa: E402
from kd.training import initial_student  # noqa: E402

GPU_STEP_FACTOR = 3  # a GPU does the CPU budget in seconds; spend some of the saving on more steps
STAGES = 7
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
    p.add_argument(
        "--student-params",
        default="67M",
        help="parameter budget of the pruned student (scripts/prune.py --params)",
    )
    p.add_argument(
        "--calibration-samples", type=int, default=128, help="answers the pruning scores use"
    )
    args, rest = p.parse_known_args(argv)
    parse_count(args.student_params)  # a bad budget fails now, not after the teacher's answers
    return args, train_overrides(rest)


def demo_train_args(args: argparse.Namespace, overrides: list[str], precision: str) -> list[str]:
    """train.py's arguments: the demo config, this run's paths and precision, then the user's
    overrides."""
    return train_args(
        config=args.config,
        teacher=args.teacher,
        data=args.out / "data",
        out=args.out / "train",
        precision=precision,
        extra=[f"--student={args.out / 'student'}", *overrides],
    )


# ----------------------------------------------------------------------------- running stages


class Clock:
    """Wall seconds per stage, for the progress lines and the report's time table."""

    def __init__(self) -> None:
        self.t0, self.rows = time.perf_counter(), []

    def stage(self, n: int, name: str, done: Path, work: Callable[[], None]) -> None:
        """Run `work()` unless `done` exists; print a header and the time it took."""
        print(f"\n[{n}/{STAGES}] {name}", flush=True)
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
    s = load_model_config(args.out / "student")
    n_train = len(list(read_jsonl(args.out / "data" / "train.jsonl")))
    n_answers = len(list(read_jsonl(args.out / "data" / "answers.jsonl")))
    return "\n".join(
        [
            f"# kd demo: {Path(cfg.teacher[0]).name} -> a student pruned to "
            f"{results['student before']['params_m']:.1f}M parameters",
            "",
            f"Machine: {describe_machine(device)}; precision {cfg.precision}.",
            "",
            f"Student: pruned from the teacher by activation importance (scripts/prune.py "
            f"--params {args.student_params}): {s.num_hidden_layers} layers, hidden "
            f"{s.hidden_size}, MLP {s.intermediate_size}, {s.num_attention_heads} query heads in "
            f"{s.num_key_value_heads} K/V groups. Data: the teacher's greedy answers to "
            f"{args.train_prompts.name}'s prompts (<= {args.max_new_tokens} tokens), {n_train} of "
            f"{n_answers} kept (the others loop). Training: loss {cfg.loss} (alpha {cfg.alpha}, "
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
    write_text(path, text + "\n")
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


def drop_loops(answers: Path, train: Path) -> None:
    """Write the records of `answers` whose response does not loop to `train`, atomically."""
    records = [record for _, record in read_jsonl(answers)]
    kept = [r for r in records if not is_degenerate(r["response"])]
    write_text(train, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    print(f"  kept {len(kept)} of {len(records)} answers; {len(records) - len(kept)} loop")


def make_data_and_student(args: argparse.Namespace, precision: str, clock: Clock) -> None:
    """Stages 1-3: the teacher's answers (training and held-out) and the pruned student."""
    data = args.out / "data"

    def training_answers() -> None:
        teacher_answers(args, precision, args.train_prompts, data / "answers.jsonl")()
        drop_loops(data / "answers.jsonl", data / "train.jsonl")

    clock.stage(
        1,
        "teacher answers the training prompts; looping answers are left out",
        data / "train.jsonl",
        training_answers,
    )
    held_out = teacher_answers(args, precision, args.heldout_prompts, data / "heldout.jsonl")
    clock.stage(2, "teacher answers the held-out prompts", data / "heldout.jsonl", held_out)
    student = args.out / "student"
    prune = [sys.executable, str(ROOT / "scripts/prune.py"), args.teacher, str(student)]
    prune += ["--data", str(data / "train.jsonl"), "--params", args.student_params]
    prune += ["--samples", str(args.calibration_samples)]
    clock.stage(
        3,
        f"prune the teacher to a student of {args.student_params} parameters",
        student / "config.json",
        lambda: run_child(prune),
    )


def claim_out(args: argparse.Namespace, overrides: list[str], precision: str) -> None:
    """Record this demo's settings in OUT/demo.json, or check a rerun's against them: stages are
    skipped when their output exists, so a rerun with other settings would mix two demos."""
    settings = {
        "teacher": str(args.teacher),
        "config": str(args.config),
        "train_prompts": str(args.train_prompts),
        "heldout_prompts": str(args.heldout_prompts),
        "max_new_tokens": args.max_new_tokens,
        "student_params": args.student_params,
        "calibration_samples": args.calibration_samples,
        "precision": precision,
        "train_overrides": overrides,
    }
    path = args.out / "demo.json"
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in settings if before.get(k) != settings[k]]
        if changed:
            k = changed[0]
            raise ValueError(
                f"{args.out} holds a demo made with {k} = {before.get(k)!r}, not {settings[k]!r}; "
                "rerun it as it was, or choose another --out"
            )
        return
    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(
            f"{args.out} is not empty and has no demo.json (another run or an older demo's "
            "layout); choose another --out or delete it"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


# ----------------------------------------------------------------------------- main


def main(argv: list[str]) -> None:
    args, overrides = parse_args(argv)
    clock = Clock()
    if not (Path(args.teacher) / "config.json").is_file():
        raise FileNotFoundError(
            f"no teacher at {args.teacher}: run `make teacher` (or pass --teacher DIR)"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # --precision=fp32 (or bf16) sets every stage's dtype: generation, training, evaluation
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("--precision=")]
    precision = given[-1] if given and given[-1] != "auto" else fast_precision(device)
    cfg = load_config(demo_train_args(args, overrides, precision))  # checks every setting first
    if device.type == "cuda" and not any(o.startswith("--max_steps=") for o in overrides):
        overrides = [*overrides, f"--max_steps={cfg.max_steps * GPU_STEP_FACTOR}"]
        cfg = load_config(demo_train_args(args, overrides, precision))
    print(f"kd demo: {describe_machine(device)}; compute in {precision}; output in {args.out}")
    claim_out(args, overrides, precision)
    data, evals = args.out / "data", args.out / "eval"
    data.mkdir(parents=True, exist_ok=True)
    evals.mkdir(parents=True, exist_ok=True)

    make_data_and_student(args, precision, clock)

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
        4,
        "evaluate the student before distillation",
        evals / "student_before.json",
        evaluate_before,
    )
    train_argv = demo_train_args(args, overrides, precision)
    clock.stage(
        5,
        f"distill: {cfg.max_steps} steps of train.py ({cfg.loss})",
        args.out / "train" / "final",
        lambda: run_train(train_argv, args.out / "train"),
    )
    clock.stage(
        6,
        "evaluate the distilled student and the teacher",
        evals / "teacher.json",
        evaluate_after,
    )

    print(f"\n[{STAGES}/{STAGES}] report")
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
