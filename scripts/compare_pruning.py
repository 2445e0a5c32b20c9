"""Compare four ways to cut the demo's student from its teacher, at equal size and training.

    .venv/bin/python scripts/compare_pruning.py    # after `make demo` (it writes the data)
    .venv/bin/python scripts/compare_pruning.py --out runs/cmp --max_steps=50
                                                   # --key=value settings go to train.py

Four students of about half the teacher's size (SmolLM2-135M: 134.5M parameters):
  layer_cut    the teacher's layers 0, 3, ..., 24, 29, chosen without looking at any data
               (63.7M: an 11th layer would pass --params)
  depth        the same number of blocks, those of highest Block Influence (ShortGPT, arXiv
               2403.03853): the same size, only the choice of layers differs
  width        all 30 blocks; K/V groups and hidden channels at fit_budget's floors, MLP
               channels as many as --params allows (Minitron's width axes, arXiv 2407.14679)
  depth_width  kd.prune.fit_budget(--params): moderate width cuts first, then depth; the
               student `make demo` trains
The importance scores come from one calibration pass of the teacher over the first --samples
answers of the demo's training data (kd/prune.py). Each student is evaluated before training,
distilled with configs/demo.toml's settings on the demo's data (the same batches in the same
order for every row), and evaluated after, as the demo evaluates (kd/evaluate.py). The table
goes to OUT/report.md and stdout. Runs live in OUT/<row>/ and every finished stage is skipped,
so an interrupted comparison resumes.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kd.config import load_config  # noqa: E402
from kd.data import load_examples  # noqa: E402
from kd.dtypes import DTYPES, fast_precision  # noqa: E402
from kd.evaluate import Rows, describe_machine, format_table, load_eval_set  # noqa: E402
from kd.hf import load_model, save_state_dict  # noqa: E402
from kd.hf_config import load_config as load_model_config  # noqa: E402
from kd.model_config import ModelConfig  # noqa: E402
from kd.pipeline import (  # noqa: E402
    require_demo_data,
    run_script,
    run_train,
    train_args,
    train_overrides,
    write_text,
)
from kd.prune import (  # noqa: E402
    Importance,
    Sizes,
    calibration_batches,
    fit_budget,
    importance,
    num_params,
    parse_count,
    prune,
    pruned_config,
)
from kd.student import layer_subset_config, layer_subset_state_dict  # noqa: E402
from kd.tokenizer import load_tokenizer  # noqa: E402


def every_third(layers: int) -> list[int]:
    """Layers 0, 3, 6, ... with the last one (the one the head reads) in place of the last pick:
    [0, 3, ..., 24, 29] of 30."""
    picks = list(range(0, layers, 3))
    return [*picks[:-1], layers - 1]


ROWS = ("layer_cut", "depth", "width", "depth_width")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Other --key=value arguments override configs/demo.toml settings of train.py.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/compare_pruning"), help="run directory")
    p.add_argument("--demo", type=Path, default=Path("runs/demo"), help="the demo's run directory")
    p.add_argument("--teacher", default="models/smollm2-135m-instruct", help="teacher HF directory")
    p.add_argument("--config", type=Path, default=ROOT / "configs/demo.toml")
    p.add_argument("--samples", type=int, default=128, help="calibration sequences")
    p.add_argument("--params", default="67M", help="budget of width and depth_width (as demo)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest greedy answer")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch")
    args, rest = p.parse_known_args(argv)
    require_demo_data(args.demo)
    return args, train_overrides(rest)


def width_sizes(config: ModelConfig, depth_width: Sizes, params: int, multiple: int = 8) -> Sizes:
    """Every layer kept; K/V groups and hidden channels as `depth_width` (fit_budget's floors,
    reached before it cuts depth); then the most MLP channels, in multiples of `multiple`, that
    keep the model within `params`."""
    if depth_width.layers == config.num_hidden_layers:
        raise ValueError(f"{params:,} parameters need no depth cut: the width row would equal it")
    for ffn in range(config.intermediate_size, 0, -multiple):
        sizes = Sizes(config.num_hidden_layers, ffn, depth_width.heads, depth_width.hidden)
        if num_params(pruned_config(config, sizes, list(range(sizes.layers)))) <= params:
            return sizes
    raise ValueError(f"no width-only model of {config.model_type} fits {params:,} parameters")


def make_students(args, teacher, tokenizer, out: Path) -> dict[str, Path]:
    """Each row's initial student as an HF directory OUT/<row>/student (kept if it exists; the
    calibration runs only if some student is missing)."""
    config, sd = teacher.config, teacher.state_dict()
    budget, cut = parse_count(args.params), every_third(config.num_hidden_layers)
    depth_width = fit_budget(config, budget)
    paths = {row: out / row / "student" for row in ROWS}
    if all((path / "config.json").is_file() for path in paths.values()):
        return paths
    imp = calibrate(args, teacher, tokenizer)
    cuts = {
        "depth": dict(layers=len(cut)),
        "width": vars(width_sizes(config, depth_width, budget)),
        "depth_width": vars(depth_width),
    }
    for row in ROWS:
        if (paths[row] / "config.json").is_file():
            continue
        if row == "layer_cut":
            student = layer_subset_config(config, cut), layer_subset_state_dict(sd, cut)
        else:
            student = prune(teacher, imp, **cuts[row])
        save_state_dict(student[1], student[0], paths[row], tokenizer_from=args.teacher)
        print(f"{row}: {num_params(student[0]):,} parameters, {describe(student[0])}", flush=True)
    return paths


def describe(c: ModelConfig) -> str:
    return (
        f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, ffn {c.intermediate_size}, "
        f"{c.num_attention_heads} heads"
    )


def calibrate(args, teacher, tokenizer) -> Importance:
    examples, _ = load_examples(args.demo / "data" / "train.jsonl", tokenizer, seq_len=256)
    t0 = time.perf_counter()
    imp = importance(teacher, calibration_batches(examples[: args.samples], batch_size=8))
    print(f"calibration: {imp.tokens} tokens in {time.perf_counter() - t0:.0f} s", flush=True)
    return imp


def main(argv: list[str]) -> None:
    args, overrides = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = fast_precision(device)

    def row_args(row: str, student: Path) -> list[str]:
        extra = [f"--student={student}", "--student_layers=", *overrides]
        return train_args(
            config=args.config,
            teacher=args.teacher,
            data=args.demo / "data",
            out=args.out / row / "train",
            precision=precision,
            extra=extra,
        )

    cfg = load_config(row_args("check", args.out))  # every setting checked before any work
    tokenizer = load_tokenizer(args.teacher)
    teacher = load_model(args.teacher, dtype=torch.float32, device=device).eval()
    students = make_students(args, teacher, tokenizer, args.out)
    del teacher
    eval_set = load_eval_set(args.demo / "data" / "heldout.jsonl", tokenizer)
    (args.out / "eval").mkdir(parents=True, exist_ok=True)
    rows = Rows(
        args.out / "eval",
        args.teacher,
        tokenizer,
        eval_set,
        device=device,
        dtype=DTYPES[precision],
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    table = {"teacher": rows.row("teacher", lambda: rows.teacher, answers=eval_set.references)}
    seconds = {}
    for row, student in students.items():
        print(f"\n=== {row}: {describe(load_model_config(student))}", flush=True)
        table[f"{row} before"] = rows.row(f"{row} before", lambda s=student: rows.load(s))
        run = args.out / row / "train"
        if not (run / "final").is_dir():
            t0 = time.perf_counter()
            run_train(row_args(row, student), run)
            seconds[row] = time.perf_counter() - t0
        table[f"{row} after"] = rows.row(f"{row} after", lambda r=run: rows.load(r / "final"))
    write_report(args, cfg, table, students, seconds, device)


def write_report(args, cfg, table, students, seconds, device) -> None:
    lines = [
        "# Pruning, then distilling: four students of about half the teacher's size",
        "",
        f"Machine: {describe_machine(device)}; precision {cfg.precision}.",
        f"Command: `{' '.join(['python scripts/compare_pruning.py', *sys.argv[1:]])}`.",
        "",
        *[f"- {row}: {describe(load_model_config(s))}" for row, s in students.items()],
        f"- training: {cfg.loss} (alpha {cfg.alpha}), {cfg.max_steps} steps x "
        f"{cfg.batch_size * cfg.grad_accum} examples, lr {cfg.lr}, on "
        f"{args.demo / 'data' / 'train.jsonl'}",
        "",
        format_table(table),
        "",
        "Training wall time: " + ", ".join(f"{r} {s:.0f} s" for r, s in seconds.items()),
    ]
    path = args.out / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    print("\n" + format_table(table) + f"\nwrote {path}")


if __name__ == "__main__":
    sys.exit(run_script(main, sys.argv[1:]))
