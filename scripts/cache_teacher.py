"""Run a teacher once over a training file and cache its top-k log-probs per token (kd/teacher_cache.py).

    .venv/bin/python scripts/cache_teacher.py --teacher models/smollm2-135m-instruct \\
        --data data.jsonl --out cache/smollm2-k32 --top-k 32 --seq-len 512

Then train with `teacher_cache = "cache/smollm2-k32"` (same data file, tokenizer and seq_len):
no teacher in memory. The examples are those `kd.data.load_examples` makes from --data with
the tokenizer (the teacher's unless --tokenizer) and --seq-len. The teacher runs in bf16
where the CPU (or GPU) is faster in it, else fp32 (`--teacher-dtype`), log-probs are stored in bf16 (`--dtype`) at temperature 1 (`--temperature`:
set it to the training temperature when that is not 1; see kd/teacher_cache.py for the error
of re-tempering). Run again with the same arguments to resume an interrupted run; `--max-shards
N` stops after N new shards (to split a long job). One process; sharding a teacher too big for
one device over several with torchrun is a follow-up.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: import kd

from kd.data import load_examples  # noqa: E402
from kd.hf import load_config, load_model  # noqa: E402
from kd.parallel import fast_dtype  # noqa: E402
from kd.teacher_cache import DTYPES, CacheSpec, config_sha256, file_sha256, write_cache  # noqa: E402
from kd.tokenizer import load_tokenizer  # noqa: E402

TEACHER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _progress(total: int, tokens_per_example: float) -> Callable[[int], None]:
    """A one-line progress bar on stderr: examples done, rate of this run and time left."""
    start = time.perf_counter()
    resumed_at: list[int] = []  # examples done before this run, from the first call

    def show(done: int) -> None:
        if not resumed_at:
            resumed_at.append(done)
        elapsed = time.perf_counter() - start
        rate = (done - resumed_at[0]) / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        bar = "#" * int(30 * done / total)
        print(f"\r[{bar:<30}] {done}/{total} examples, {rate * tokens_per_example:.0f} tokens/s, "
              f"{eta:.0f} s left", end="", file=sys.stderr, flush=True)

    return show


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="teacher HF directory")
    parser.add_argument("--data", required=True, help="training JSONL file (as given to train.py)")
    parser.add_argument("--out", required=True, help="cache directory to write (or resume)")
    parser.add_argument("--top-k", type=int, required=True, help="tokens kept per position, e.g. 32")
    parser.add_argument("--seq-len", type=int, default=512, help="train.py's seq_len")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the teacher's)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="storage dtype of log-probs")
    parser.add_argument("--temperature", type=float, default=1.0, help="temperature of the cached log-probs")
    parser.add_argument("--teacher-dtype", default="auto", choices=["auto", *sorted(TEACHER_DTYPES)],
                        help="auto: bf16 on a GPU or where this CPU is faster in it, else fp32")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per teacher forward")
    parser.add_argument("--examples-per-shard", type=int, default=4096, help="examples per shard file")
    parser.add_argument("--max-shards", type=int, help="stop after writing this many new shards")
    args = parser.parse_args(argv)
    try:
        if not args.temperature > 0:
            raise ValueError(f"--temperature {args.temperature} must be > 0")
        tokenizer = load_tokenizer(args.tokenizer or args.teacher)
        examples, stats = load_examples(args.data, tokenizer, seq_len=args.seq_len)
        print(stats, file=sys.stderr)
        config = load_config(args.teacher)
        spec = CacheSpec(
            tokenizer_fingerprint=tokenizer.fingerprint(), data_sha256=file_sha256(args.data),
            seq_len=args.seq_len, teacher_config_sha256=config_sha256(args.teacher),
            vocab_size=config.vocab_size, num_examples=len(examples), k=args.top_k, dtype=args.dtype,
            temperature=args.temperature, examples_per_shard=args.examples_per_shard,
        )
        if not 1 <= args.top_k <= config.vocab_size:
            raise ValueError(f"--top-k {args.top_k} must be in 1..{config.vocab_size} (the teacher's vocabulary)")
        teacher_dtype = fast_dtype(torch.device("cpu")) if args.teacher_dtype == "auto" else TEACHER_DTYPES[args.teacher_dtype]
        teacher = load_model(args.teacher, dtype=teacher_dtype).eval().requires_grad_(False)
        info = {"teacher": str(args.teacher), "data": str(args.data)}
        complete = write_cache(args.out, teacher, examples, spec, batch_size=args.batch_size,
                               max_shards=args.max_shards, info=info,
                               on_batch=_progress(len(examples), stats.tokens / len(examples)))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(file=sys.stderr)
    print(f"{args.out}: {'complete' if complete else 'partial: run again to continue'}", file=sys.stderr)


if __name__ == "__main__":
    main()
