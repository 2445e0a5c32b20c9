"""Run a teacher once over a training file and cache its top-k log-probs per token.

    .venv/bin/python scripts/cache_teacher.py --teacher models/smollm2-135m-instruct \\
        --data data.jsonl --out cache/smollm2-k32 --top-k 32 --seq-len 512
    # the same arguments, on 8 ranks:
    torchrun --nproc_per_node=8 scripts/cache_teacher.py --teacher models/llama3-70b ...

Then train with `teacher_cache = "cache/smollm2-k32"` (same data file, tokenizer and seq_len):
no teacher in memory (the cache's format: kd/teacher_cache.py). The examples are those
`kd.data.load_examples` makes from --data with the tokenizer (the teacher's unless
--tokenizer) and --seq-len. The teacher runs in bf16 where the CPU (or GPU) is faster in it,
else fp32 (`--teacher-dtype`); log-probs are stored in bf16 (`--dtype`) at temperature 1
(`--temperature`: set it to the training temperature when that is not 1; see
kd/teacher_cache.py for the error of re-tempering). Run again with the same arguments to
resume an interrupted run (it also writes again a shard that is missing, e.g. one deleted
after training reported it damaged); `--max-shards N` stops after N shards (to split a long
job). A read-only or full --out ends in one `error:` line naming the file, and the shards
finished before stay valid: free space and run again with the same arguments.

Under torchrun the teacher is sharded with FSDP2 over the ranks (kd/parallel.py), so a teacher
too big for one device fits on N, and the ranks take the cache's shards in rounds of N, one each
(`--out` must be on a filesystem every rank sees; rank 0 writes the manifest). The files are
byte-identical to a one-process run's, and a run may be resumed with another number of ranks.
A plain `python scripts/cache_teacher.py` is a world of one and runs the same code.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: import kd

from kd import parallel  # noqa: E402
from kd.cache_writer import make_cache_dir, write_cache  # noqa: E402
from kd.data import load_examples  # noqa: E402
from kd.dtypes import DTYPES  # noqa: E402
from kd.hf import check_state_dict, fingerprint, load_state_dict  # noqa: E402
from kd.hf_config import load_config  # noqa: E402
from kd.model import Transformer  # noqa: E402
from kd.model_config import ModelConfig  # noqa: E402
from kd.teacher_cache import STORAGE_DTYPES, CacheSpec, config_sha256, file_sha256  # noqa: E402
from kd.tokenizer import load_tokenizer  # noqa: E402


class Progress:
    """A one-line progress bar on stderr: examples done, rate of this run and time left."""

    def __init__(self, total: int, tokens_per_example: float) -> None:
        self.total, self.tokens_per_example = total, tokens_per_example
        self.start = time.perf_counter()
        self.resumed_at: int | None = None  # examples done before this run, from the first call

    def __call__(self, done: int) -> None:
        if self.resumed_at is None:
            self.resumed_at = done
        elapsed = time.perf_counter() - self.start
        rate = (done - self.resumed_at) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        bar = "#" * int(30 * done / self.total)
        print(
            f"\r[{bar:<30}] {done}/{self.total} examples, "
            f"{rate * self.tokens_per_example:.0f} tokens/s, {eta:.0f} s left",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def end_line(self) -> None:
        """Close the bar's line (if drawn), so that what follows starts a line of its own."""
        if self.resumed_at is not None:
            print(file=sys.stderr)


def _os_error(e: OSError, out: str) -> str:
    """One line for an OSError: ours carry a message; the system's name a file and a cause."""
    if e.errno is None:
        return str(e)
    where = Path(e.filename or out)
    if not where.resolve().is_relative_to(Path(out).resolve()):
        return f"{where}: {e.strerror}"
    return (
        f"cannot write {where}: {e.strerror}; free space or make {out} writable (or choose "
        "another --out), then run again with the same arguments: finished shards are kept"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="teacher HF directory")
    parser.add_argument("--data", required=True, help="training JSONL file (as given to train.py)")
    parser.add_argument("--out", required=True, help="cache directory to write (or resume)")
    parser.add_argument(
        "--top-k", type=int, required=True, help="tokens kept per position, e.g. 32"
    )
    parser.add_argument("--seq-len", type=int, default=512, help="train.py's seq_len")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the teacher's)")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=sorted(STORAGE_DTYPES),
        help="storage dtype of log-probs",
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="temperature of the cached log-probs"
    )
    parser.add_argument(
        "--teacher-dtype",
        default="auto",
        choices=["auto", *sorted(DTYPES)],
        help="auto: bf16 on a GPU or where this CPU is faster in it, else fp32",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="examples per teacher forward")
    parser.add_argument(
        "--examples-per-shard", type=int, default=4096, help="examples per shard file"
    )
    parser.add_argument("--max-shards", type=int, help="stop after writing this many new shards")
    return parser.parse_args(argv)


def load_sharded_teacher(
    path: str, config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> Transformer:
    """The teacher in `dtype`, its blocks sharded over the ranks (FSDP2; a world of one holds
    it whole)."""

    def on_meta() -> Transformer:  # shapes only: memory comes after sharding
        with torch.device("meta"):
            return Transformer(config).to(dtype)

    # Build on the meta device, shard the blocks over the ranks, allocate this rank's shards,
    # then fill them from rank 0's read of the checkpoint (keys and shapes checked).
    teacher = on_meta()
    parallel.shard_teacher(teacher, compile=False)
    teacher.to_empty(device=device)
    parallel.load_full_state_dict(
        teacher,
        parallel.run_on_rank0(
            lambda: check_state_dict(load_state_dict(path, dtype=dtype), on_meta(), path)
        ),
    )
    return teacher


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world = parallel.init_distributed()
    say = print if world.is_main else lambda *args, **kwargs: None  # rank 0 speaks for all
    progress = None
    try:
        if not args.temperature > 0:
            raise ValueError(f"--temperature {args.temperature} must be > 0")
        tokenizer = load_tokenizer(args.tokenizer or args.teacher)
        examples, stats = load_examples(args.data, tokenizer, seq_len=args.seq_len)
        say(stats, file=sys.stderr)
        config = load_config(args.teacher)
        spec = CacheSpec(
            tokenizer_fingerprint=tokenizer.fingerprint(),
            data_sha256=file_sha256(args.data),
            seq_len=args.seq_len,
            teacher_config_sha256=config_sha256(args.teacher),
            vocab_size=config.vocab_size,
            num_examples=len(examples),
            k=args.top_k,
            dtype=args.dtype,
            temperature=args.temperature,
            examples_per_shard=args.examples_per_shard,
            teacher_fingerprint=fingerprint(args.teacher),
        )
        if not 1 <= args.top_k <= config.vocab_size:
            raise ValueError(
                f"--top-k {args.top_k} must be in 1..{config.vocab_size} (the teacher's vocabulary)"
            )
        make_cache_dir(args.out)  # a file there, or a read-only disk: fail before the teacher loads
        # The same dtype on all ranks.
        dtype = DTYPES[parallel.resolve_precision(args.teacher_dtype, world.device)]
        teacher = load_sharded_teacher(args.teacher, config, dtype, world.device)
        info = {"teacher": str(args.teacher), "data": str(args.data)}
        if world.is_main:
            progress = Progress(len(examples), stats.tokens / len(examples))
        complete = write_cache(
            args.out,
            teacher,
            examples,
            spec,
            batch_size=args.batch_size,
            max_shards=args.max_shards,
            info=info,
            on_batch=progress,
            rank=world.rank,
            world_size=world.world_size,
        )
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError, a read-only or full disk
        if progress is not None:
            progress.end_line()
        sys.exit(f"error: {e if isinstance(e, ValueError) else _os_error(e, args.out)}")
    finally:
        parallel.shutdown()
    if progress is not None:
        progress.end_line()
    say(
        f"{args.out}: {'complete' if complete else 'partial: run again to continue'}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
