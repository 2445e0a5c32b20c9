"""Plot a train.py run: training loss parts and held-out eval curves from OUT/metrics.jsonl.

    # writes runs/smollm2_kd/metrics.png:
    .venv/bin/python scripts/plot_metrics.py runs/smollm2_kd
    # several runs on one figure:
    .venv/bin/python scripts/plot_metrics.py runs/a runs/b --out cmp.png

Left: training loss (solid) and its divergence / cross-entropy parts (dashed / dotted) per
step. Right: held-out KL to the teacher and top-1 agreement. matplotlib is optional: without
it the script prints the last values of each run instead and says how to get the figure.
"""

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """(training records, eval records) of OUT/metrics.jsonl."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the `out` directory of a train.py run")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_kl" in r]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="train.py output directories")
    parser.add_argument(
        "--out", type=Path, help="PNG to write (default: RUN/metrics.png of the first run)"
    )
    args = parser.parse_args(argv)
    try:
        data = {run: read_metrics(run) for run in args.runs}
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        import matplotlib
    except ImportError:
        for run, (train, evals) in data.items():
            last = {**(train[-1] if train else {}), **(evals[-1] if evals else {})}
            print(f"{run}: {json.dumps(last)}")
        print(
            "matplotlib is not installed (pip install matplotlib) for the figure", file=sys.stderr
        )
        return 0
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    twin = right.twinx()  # top-1 agreement, a fraction, on its own axis
    for run, (train, evals) in data.items():
        steps = [r["step"] for r in train]
        (line,) = left.plot(steps, [r["loss"] for r in train], label=f"{run.name} loss")
        if train and "divergence" in train[0]:  # absent for loss = sft
            left.plot(
                steps,
                [r["divergence"] for r in train],
                "--",
                color=line.get_color(),
                label=f"{run.name} divergence",
            )
        left.plot(
            steps, [r["ce"] for r in train], ":", color=line.get_color(), label=f"{run.name} CE"
        )
        if evals:
            eval_steps = [r["step"] for r in evals]
            (line,) = right.plot(
                eval_steps, [r["eval_kl"] for r in evals], "o-", label=f"{run.name} KL"
            )
            twin.plot(
                eval_steps,
                [r["eval_top1_agreement"] for r in evals],
                "s--",
                color=line.get_color(),
                label=f"{run.name} top-1",
            )
    left.set(xlabel="step", ylabel="training loss (per token)", title="training")
    right.set(xlabel="step", ylabel="KL(teacher || student), nats/token (solid)", title="held-out")
    twin.set_ylabel("top-1 agreement with the teacher (dashed)")
    left.legend(fontsize=8)
    right.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    out = args.out or args.runs[0] / "metrics.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
