"""Compare distillation methods at equal steps and data, and write a results page.

    .venv/bin/python scripts/compare_methods.py    # after `make demo` (it writes the data)
    .venv/bin/python scripts/compare_methods.py --methods sft,jsd --max_steps=50
                                                   # --key=value settings go to train.py

Every method trains the demo's student (runs/demo/student, pruned from the teacher by `make
demo`) for the same steps on the same data, the teacher's greedy answers to the training prompts
(runs/demo/data/, written by `make demo`), and is evaluated like the demo (kd/evaluate.py) on
the 64 held-out prompts. The methods, each pure (alpha = 1, no cross-entropy mixed in):
  sft         cross-entropy on the teacher's text: sequence-level KD (Kim & Rush, arXiv 1606.07947)
  forward_kl  KL(p || q) at every token of it (Hinton et al., arXiv 1503.02531)
  reverse_kl  KL(q || p), mode-seeking (as in MiniLLM's single-step term, arXiv 2306.08543)
  jsd         JSD(beta = 0.5) (GKD's default divergence, arXiv 2306.13649), off-policy
  gkd         JSD on the student's own samples (GKD, lmbda = 1: fully on-policy, answers of
              <= 64 tokens)
Runs live in OUT/<method>/ (default runs/compare); each stage is skipped when its output
exists, so an interrupted comparison resumes. OUT/results.md (or --results FILE; docs/results.md
holds hand-written sections too, so copy what you want there) gets the demo's table (from
runs/demo/eval/) and this comparison, with the settings and the machine; `--methods ""`
writes the demo's section alone.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
from kd.config import TrainConfig, load_config  # noqa: E402
from kd.dtypes import DTYPES, fast_precision  # noqa: E402
from kd.evaluate import (  # noqa: E402
    Rows,
    describe_machine,
    for_eval,
    format_table,
    load_eval_set,
    metrics_note,
    verdict,
)
from kd.pipeline import (  # noqa: E402
    require_demo_data,
    run_script,
    run_train,
    train_args,
    train_overrides,
)
from kd.tokenizer import load_tokenizer  # noqa: E402
from kd.training import initial_student  # noqa: E402

METHODS = {
    "sft": ["--loss=sft"],
    "forward_kl": ["--loss=forward_kl", "--alpha=1.0"],
    "reverse_kl": ["--loss=reverse_kl", "--alpha=1.0"],
    "jsd": ["--loss=jsd", "--alpha=1.0", "--beta=0.5"],
    "gkd": [
        "--method=gkd",
        "--loss=jsd",
        "--alpha=1.0",
        "--beta=0.5",
        "--lmbda=1.0",
        "--max_new_tokens=64",
    ],
}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Other --key=value arguments override "
        "configs/demo.toml settings of train.py for every method.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/compare"),
        help="run directory (default runs/compare)",
    )
    p.add_argument(
        "--demo", type=Path, default=Path("runs/demo"), help="the demo's run directory (data, eval)"
    )
    p.add_argument("--teacher", default="models/smollm2-135m-instruct", help="teacher HF directory")
    p.add_argument(
        "--config", type=Path, default=ROOT.parent / "configs/demo.toml", help="train.py settings"
    )
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS)
    )
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="markdown file to write (default OUT/results.md)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="longest greedy answer (as make demo)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch")
    p.add_argument(
        "--note", default="", help="a sentence on the conditions of the run, for the results file"
    )
    args, rest = p.parse_known_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    require_demo_data(args.demo)
    return args, train_overrides(rest)


def method_args(
    args: argparse.Namespace, method: str, overrides: list[str], precision: str
) -> list[str]:
    """train.py's arguments for one method: the demo's data, this method's settings, then the
    user's overrides."""
    return train_args(
        config=args.config,
        teacher=args.teacher,
        data=args.demo / "data",
        out=args.out / method,
        precision=precision,
        extra=[f"--student={args.demo / 'student'}", *METHODS[method], *overrides],
    )


def settings_lines(
    cfg: TrainConfig, args: argparse.Namespace, n_train: int, n_heldout: int
) -> list[str]:
    """The settings every row of a table shares, as markdown list items."""
    return [
        f"- student: {cfg.student}, pruned from {Path(cfg.teacher[0]).name} (make demo)",
        f"- data: the teacher's greedy answers to {n_train} training prompts "
        f"({args.demo / 'data'}); evaluation on {n_heldout} held-out prompts and the teacher's "
        "greedy answers to them",
        f"- training: {cfg.max_steps} steps x {cfg.batch_size * cfg.grad_accum} examples, "
        f"seq_len {cfg.seq_len}, lr {cfg.lr} (warmup {cfg.warmup_steps}, cosine to "
        f"{cfg.min_lr}), weight decay {cfg.weight_decay}, precision {cfg.precision}, "
        f"seed {cfg.seed}",
    ]


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def run_methods(
    args: argparse.Namespace,
    configs: dict[str, TrainConfig],
    overrides: list[str],
    *,
    device: torch.device,
    precision: str,
) -> tuple[dict[str, dict], dict[str, float]]:
    """Train and evaluate each method (skipping what is done); the table's rows and the
    training seconds of this run."""
    dtype = DTYPES[precision]
    tokenizer = load_tokenizer(args.teacher)
    eval_set = load_eval_set(args.demo / "data" / "heldout.jsonl", tokenizer)
    rows = Rows(
        args.out,
        args.teacher,
        tokenizer,
        eval_set,
        device=device,
        dtype=dtype,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    seconds = {}
    for method in configs:
        print(f"\n=== {method}", flush=True)
        run = args.out / method
        if not (run / "final").exists():
            t0 = time.perf_counter()
            run_train(method_args(args, method, overrides, precision), run)
            seconds[method] = time.perf_counter() - t0
        rows.row(method, lambda: rows.load(run / "final"))
    first = next(iter(configs.values()))
    table = {
        "teacher": rows.row("teacher", lambda: rows.teacher, answers=eval_set.references),
        "student before": rows.row(
            "student before", lambda: for_eval(initial_student(first), device, dtype)
        ),
    }
    return table | {m: rows.read(m) for m in configs}, seconds


def main(argv: list[str]) -> None:
    args, overrides = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = fast_precision(device)
    configs = {
        m: load_config(method_args(args, m, overrides, precision)) for m in args.methods
    }  # check all first
    args.out.mkdir(parents=True, exist_ok=True)
    rows, seconds = (
        run_methods(args, configs, overrides, device=device, precision=precision)
        if configs
        else ({}, {})
    )

    n_train = len((args.demo / "data" / "train.jsonl").read_text().splitlines())
    n_heldout = len((args.demo / "data" / "heldout.jsonl").read_text().splitlines())
    note = metrics_note(n_heldout)
    lines = [
        "# Results",
        "",
        f"Machine: {describe_machine(device)}." + (f" {args.note}" if args.note else ""),
        "",
    ]
    demo_evals = args.demo / "eval"
    names = ("teacher", "student_before", "student_after")
    if all((demo_evals / f"{n}.json").is_file() for n in names):
        demo_rows = {n.replace("_", " "): read(demo_evals / f"{n}.json") for n in names}
        demo_cfg = load_config(
            [f"--config={args.demo / 'train' / 'train_config.toml'}"]
        )  # as train.py ran it
        verdict_lines, _ = verdict(demo_rows["student before"], demo_rows["student after"])
        lines += [
            "## make demo",
            "",
            f"{demo_cfg.loss} (alpha {demo_cfg.alpha}) on the teacher's answers; full "
            f"report in {args.demo / 'report.md'}.",
            "",
            *settings_lines(demo_cfg, args, n_train, n_heldout),
            "",
            format_table(demo_rows),
            "",
            note,
            "",
            *verdict_lines,
            "",
        ]
    if configs:
        lines += [
            "## Methods at equal steps and data",
            "",
            "Made by `scripts/compare_methods.py`. Every method starts from the same student "
            "and sees the same batches in the same order; alpha = 1 (no cross-entropy mixed "
            "in) except SFT, which is cross-entropy only.",
            "",
            *settings_lines(next(iter(configs.values())), args, n_train, n_heldout),
            "",
            format_table(rows),
            "",
            note,
        ]
    if seconds:
        lines += [
            "",
            "Training wall time this run: "
            + ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items())
            + ".",
        ]
    args.results = args.results or args.out / "results.md"
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(("\n" + format_table(rows) if rows else "") + f"\nwrote {args.results}")


if __name__ == "__main__":
    sys.exit(run_script(main, sys.argv[1:]))
