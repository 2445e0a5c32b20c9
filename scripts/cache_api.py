"""Turn an API teacher's answers with log-probs into a training file and a teacher cache.

    .venv/bin/python generate.py --api-base http://127.0.0.1:8000/v1 --api-model NAME \\
        --prompts-file prompts.jsonl --output answers.jsonl --chat --top-logprobs 20
    .venv/bin/python scripts/cache_api.py --answers answers.jsonl --student models/student \\
        --data-out train.jsonl --out cache/api --seq-len 512 --teacher-name NAME
    .venv/bin/python train.py --config configs/smollm2_kd.toml --teacher= \\
        --teacher_cache=cache/api --data=train.jsonl --student=models/student --eval_data=

The cache's ids index the student's vocabulary (its tokenizer reads the data, as in
training), so train.py needs no teacher. Answers that do not align token for token with the
student's tokenizer are left out of --data-out and counted by reason (kd/api_cache.py). An
existing --data-out is kept only if equal to what this run writes, and a cache of other
settings in --out is refused: nothing is replaced unasked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: import kd

from kd.api_cache import build_api_cache  # noqa: E402
from kd.teacher_cache import STORAGE_DTYPES  # noqa: E402
from kd.tokenizer import load_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--answers", type=Path, required=True, help="generate.py --top-logprobs output")
    p.add_argument("--student", type=Path, required=True, help="student HF dir (its tokenizer)")
    p.add_argument("--data-out", type=Path, required=True, help="training JSONL to write")
    p.add_argument("--out", type=Path, required=True, help="cache directory to write")
    p.add_argument("--seq-len", type=int, default=512, help="train.py's seq_len")
    p.add_argument("--teacher-name", default="api", help="recorded in the cache's manifest")
    p.add_argument("--top-k", type=int, help="alternatives kept (default: as many as reported)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(STORAGE_DTYPES))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if not (args.student / "config.json").is_file():
            raise FileNotFoundError(f"{args.student}: no config.json; give the student's HF dir")
        if args.top_k is not None and args.top_k < 1:
            raise ValueError(f"--top-k {args.top_k} must be >= 1")
        kept, refused, k = build_api_cache(
            args.answers,
            student=args.student,
            tokenizer=load_tokenizer(args.student),
            data_out=args.data_out,
            out=args.out,
            seq_len=args.seq_len,
            teacher_name=args.teacher_name,
            k=args.top_k,
            dtype=args.dtype,
        )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    why = ", ".join(f"{n} {reason}" for reason, n in refused.most_common()) or "none"
    print(f"{kept} answers kept (refused: {why}); k = {k}; wrote {args.data_out} and {args.out}")


if __name__ == "__main__":
    main()
