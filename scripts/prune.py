"""Prune a teacher into a smaller student by activation importance (Minitron, arXiv 2407.14679).

    .venv/bin/python scripts/prune.py models/smollm2-135m-instruct out/pruned-60m \\
        --data data.jsonl --params 60M
    .venv/bin/python scripts/prune.py TEACHER OUT --data FILE --layers 24 --ffn 1024 --heads 6

The teacher is loaded in fp32 and run once over the first --samples examples that
`kd.data.load_examples` makes of --data (any JSONL kd trains on; --seq-len tokens at most each)
to score every block, MLP channel, attention head and hidden channel (kd/prune.py). Then the
most important are kept: either the sizes given (--layers, --ffn, --heads, --hidden; any left
out stay whole) or, with --params, the sizes `kd.prune.fit_budget` picks for that many
parameters (moderate cuts of MLP width, K/V groups and hidden size first, then layers; widths
in multiples of --multiple). OUT is written atomically as a HF directory with the teacher's
tokenizer, which kd and transformers both load; distill into it next (train.py with
`student = "OUT"`). An existing OUT is replaced only with --overwrite. A table of what was kept
goes to stdout. Mistakes (a missing file, a size the teacher cannot give, a budget below the
smallest model) end in one `error:` line and exit status 1.

SmolLM2-135M -> 60M with 50 short records: 17 layers, 6 heads, ffn 1024, hidden 504, in about
6 s on 2 CPU cores (3 s of it calibration).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: import kd

from kd.data import load_examples  # noqa: E402
from kd.hf import load_model, save_state_dict  # noqa: E402
from kd.hf_config import load_config  # noqa: E402
from kd.model_config import ModelConfig  # noqa: E402
from kd.prune import (  # noqa: E402
    Sizes,
    calibration_batches,
    fit_budget,
    importance,
    kept_layers,
    num_params,
    parse_count,
    prune,
    resolve_sizes,
)
from kd.tokenizer import load_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", help="teacher HF directory")
    parser.add_argument("out", help="directory to write the pruned model to")
    parser.add_argument("--data", required=True, help="calibration JSONL (any file kd trains on)")
    parser.add_argument("--samples", type=int, default=256, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence at most")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    parser.add_argument("--params", help="parameter budget, e.g. 60M: sizes by fit_budget")
    parser.add_argument("--multiple", type=int, default=8, help="--params: sizes' granularity")
    parser.add_argument("--layers", type=int, help="transformer blocks to keep")
    parser.add_argument("--ffn", type=int, help="MLP channels to keep per layer")
    parser.add_argument("--heads", type=int, help="query heads to keep per layer (whole groups)")
    parser.add_argument("--hidden", type=int, help="hidden (embedding) channels to keep")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="where the calibration runs")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    return parser.parse_args(argv)


def target_sizes(args: argparse.Namespace, config: ModelConfig) -> Sizes:
    """The sizes asked for: by --params, or by the explicit sizes (one way, not both)."""
    explicit = {k: getattr(args, k) for k in ("layers", "ffn", "heads", "hidden")}
    given = [f"--{k}" for k, v in explicit.items() if v is not None]
    if args.params is not None and given:
        raise ValueError(f"give --params or {', '.join(given)}, not both")
    if args.params is not None:
        if args.multiple < 1:
            raise ValueError(f"--multiple {args.multiple} must be >= 1")
        return fit_budget(config, parse_count(args.params), multiple=args.multiple)
    if not given:
        raise ValueError("say what to keep: --params, or any of --layers --ffn --heads --hidden")
    return resolve_sizes(config, **explicit)


class Progress:
    """One line on stderr: sequences done, tokens per second, time left."""

    def __init__(self, total: int) -> None:
        self.total, self.start = total, time.perf_counter()

    def __call__(self, sequences: int, tokens: int) -> None:
        elapsed = time.perf_counter() - self.start
        left = elapsed / sequences * (self.total - sequences)
        print(
            f"\rcalibration: {sequences}/{self.total} sequences, "
            f"{tokens / elapsed:.0f} tokens/s, {left:.0f} s left",
            end="\n" if sequences == self.total else "",
            file=sys.stderr,
            flush=True,
        )


def report(before: ModelConfig, after: ModelConfig, layers: list[int], seconds: float) -> None:
    """The table of what was kept, on stdout."""

    def heads(c: ModelConfig) -> str:
        return f"{c.num_attention_heads}/{c.num_key_value_heads}"

    rows = [
        ("layers", before.num_hidden_layers, after.num_hidden_layers),
        ("hidden", before.hidden_size, after.hidden_size),
        ("ffn", before.intermediate_size, after.intermediate_size),
        ("heads (query/KV)", heads(before), heads(after)),
        ("parameters", f"{num_params(before):,}", f"{num_params(after):,}"),
    ]
    print(f"{'':<18}{'teacher':>14}    {'pruned':>12}")
    for name, old, new in rows:
        print(f"{name:<18}{old!s:>14} -> {new!s:>12}")
    kept = "all" if len(layers) == before.num_hidden_layers else " ".join(map(str, layers))
    print(f"kept layers: {kept}")
    print(f"calibration: {seconds:.1f} s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        for name in ("samples", "seq_len", "batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
        out = Path(args.out)
        if out.exists() and out.resolve() == Path(args.teacher).resolve():
            raise ValueError(f"OUT {out} is the teacher's directory; choose another")
        if out.exists() and not args.overwrite:
            raise ValueError(f"{out} exists; choose another OUT or pass --overwrite to replace it")
        config = load_config(args.teacher)
        sizes = target_sizes(args, config)  # before the slow part: a bad size fails at once
        tokenizer = load_tokenizer(args.teacher)
        examples, stats = load_examples(args.data, tokenizer, seq_len=args.seq_len)
        examples = examples[: args.samples]
        print(stats, file=sys.stderr)
        teacher = load_model(args.teacher, dtype=torch.float32, device=args.device).eval()
        start = time.perf_counter()
        scores = importance(
            teacher,
            calibration_batches(examples, batch_size=args.batch_size),
            on_batch=Progress(len(examples)),
        )
        seconds = time.perf_counter() - start
        pruned, state_dict = prune(teacher, scores, **asdict(sizes))
        save_state_dict(state_dict, pruned, args.out, tokenizer_from=args.teacher)
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError, an unwritable OUT
        sys.exit(f"error: {e}")
    report(config, pruned, kept_layers(scores, sizes.layers), seconds)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
