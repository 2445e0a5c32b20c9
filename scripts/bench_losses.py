"""Benchmark: peak memory and time of a naive materialized KD loss vs the chunked one.

One forward + backward of forward-KL distillation (alpha 0.5, T 2) from hidden states
(N x H) through a student head (V x H) and a teacher head, gradients into the student hidden
states and head. "naive" is the usual snippet: full fp32 logits of both models, F.kl_div +
F.cross_entropy over all N x V entries. "chunked" is
`kd.chunked_loss.chunked_distillation_loss` (for forward KL, its analytic-gradient path).
With --topk K the teacher is an offline cache of its top-K log-probs (`kd.losses.TopK`, built
from the teacher head before timing): "naive" is then `kd.losses.distillation_loss` on the
full student logits (autograd), "chunked" the same loss through
`chunked_distillation_loss(teacher_logits=...)` (its analytic top-k path). With --softcap C both
heads cap their logits as Gemma 2 does, z = C tanh(u / C) (C = 30 there): "naive" caps the full
logits, "chunked" gets `kd.model.Head(w, C)`.

Each (implementation, case) runs in a fresh subprocess so that peak memory is its own:
on CPU the peak resident set (ru_maxrss) minus the resident set after the inputs are built;
on CUDA torch.cuda.max_memory_allocated minus the inputs. Time is one forward + backward after
a small warm-up, as wall-clock seconds and as CPU seconds of the process (all threads): on a
shared machine the wall clock also counts time other processes held the cores, CPU time less so.
No repeats: read the time ratios loosely.
Naive cases whose logits alone would exceed --max-naive-gib are skipped.

Run:  .venv/bin/python scripts/bench_losses.py            # the full grid (slow on CPU)
      .venv/bin/python scripts/bench_losses.py --quick    # ~1 min smoke run
      .venv/bin/python scripts/bench_losses.py --device cuda
      .venv/bin/python scripts/bench_losses.py --tokens 4096 8192 --shapes 576x49152
      .venv/bin/python scripts/bench_losses.py --quick --topk 32    # a top-32 teacher cache
      .venv/bin/python scripts/bench_losses.py --tokens 1024 4096 --shapes 640x262144 --softcap 30
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kd.chunked_loss import chunked_distillation_loss  # noqa: E402
from kd.losses import LossOptions, TopK, distillation_loss  # noqa: E402
from kd.model import Head, softcap  # noqa: E402

TEMPERATURE, ALPHA = 2.0, 0.5
OPTIONS = LossOptions(divergence="forward_kl", temperature=TEMPERATURE, alpha=ALPHA)
NAIVE_COPIES = 7  # live (N x V) fp32 buffers at the naive peak (measured: 6.5)


def naive_loss(
    h: torch.Tensor,
    w: torch.Tensor,
    th: torch.Tensor,
    tw: torch.Tensor,
    labels: torch.Tensor,
    *,
    cap: float | None,
) -> torch.Tensor:
    """The usual snippet: both models' logits in fp32, then KL + CE over the valid tokens."""
    logits = (h @ w.T).float()  # (N, V)
    with torch.no_grad():
        teacher_logits = (th @ tw.T).float()  # (N, V)
    if cap is not None:
        logits, teacher_logits = softcap(logits, cap), softcap(teacher_logits, cap)
    log_q = F.log_softmax(logits / TEMPERATURE, dim=-1)
    log_p = F.log_softmax(teacher_logits / TEMPERATURE, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # KL(p || q) per token
    ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    valid = labels != -100
    return (
        ALPHA * TEMPERATURE**2 * (kl * valid).sum() + (1 - ALPHA) * (ce * valid).sum()
    ) / valid.sum()


def chunked_loss(h, w, th, tw, labels, *, cap: float | None, chunk_size: int) -> torch.Tensor:
    student, teacher = Head(w, cap), Head(tw, cap)
    loss, _ = chunked_distillation_loss(
        h, student, th, teacher, labels, OPTIONS, chunk_size=chunk_size
    )
    return loss


def naive_topk_loss(
    h: torch.Tensor, w: torch.Tensor, teacher: TopK, labels: torch.Tensor
) -> torch.Tensor:
    """kd's dense top-k loss: full fp32 student logits, autograd through `distillation_loss`."""
    loss, _ = distillation_loss((h @ w.T).float(), teacher, labels, OPTIONS)
    return loss


def chunked_topk_loss(h, w, teacher: TopK, labels, *, chunk_size: int) -> torch.Tensor:
    loss, _ = chunked_distillation_loss(
        h, w, None, None, labels, OPTIONS, chunk_size=chunk_size, teacher_logits=teacher
    )
    return loss


def topk_teacher(th: torch.Tensor, tw: torch.Tensor, k: int) -> TopK:
    """The teacher's top-k log-probs at T, as a cache holds them; 256 rows at a time."""
    parts = [
        torch.log_softmax(th[i : i + 256] @ tw.T / TEMPERATURE, -1).topk(k, dim=-1)
        for i in range(0, th.shape[0], 256)
    ]
    return TopK(torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts]))


def make_inputs(n: int, hidden: int, vocab: int, device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(n, hidden, generator=g)).to(device).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(device).requires_grad_()
    th = torch.randn(n, hidden, generator=g).to(device)
    tw = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(device)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::10] = -100  # some padding
    return h, w, th, tw, labels.to(device)


def run_one(
    impl: str,
    n: int,
    hidden: int,
    vocab: int,
    chunk_size: int,
    device: str,
    topk: int = 0,
    cap: float | None = None,
) -> dict[str, float]:
    """Measure one case in this (fresh) process; topk > 0: a top-k teacher cache, not the head;
    cap: both heads' logit softcap."""
    if topk:
        naive, chunked = naive_topk_loss, chunked_topk_loss
    else:
        naive, chunked = partial(naive_loss, cap=cap), partial(chunked_loss, cap=cap)
    fn = naive if impl == "naive" else partial(chunked, chunk_size=chunk_size)

    def inputs_of(n: int, vocab: int) -> tuple:
        h, w, th, tw, labels = make_inputs(n, hidden, vocab, device)
        if topk:
            return h, w, topk_teacher(th, tw, min(topk, vocab)), labels
        return h, w, th, tw, labels

    small = inputs_of(64, 512)
    fn(*small).backward()  # warm-up: kernels, allocator, lazy imports
    del small
    inputs = inputs_of(n, vocab)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux: KiB)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn(*inputs).backward()
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_mib": peak / 2**20, "seconds": seconds, "cpu_seconds": cpu_seconds}


def _times(result: dict[str, float]) -> str:
    return f"{result['seconds']:.1f} ({result['cpu_seconds']:.1f})"


def _row(n: int, hidden: int, vocab: int, naive: dict | None, chunked: dict, gib: float) -> str:
    """One markdown table row; naive is None when it was skipped (estimated at `gib` GiB)."""
    if naive is None:
        return (
            f"| {n} | {hidden} | {vocab} | skipped (~{gib:.0f} GiB) | {chunked['peak_mib']:.0f} "
            f"| - | - | {_times(chunked)} | - |"
        )
    mem_ratio = chunked["peak_mib"] / naive["peak_mib"]
    time_ratio = chunked["seconds"] / naive["seconds"]
    cpu_ratio = chunked["cpu_seconds"] / naive["cpu_seconds"]
    return (
        f"| {n} | {hidden} | {vocab} | {naive['peak_mib']:.0f} | {chunked['peak_mib']:.0f} | "
        f"{mem_ratio:.2f} | {_times(naive)} | {_times(chunked)} | "
        f"{time_ratio:.2f} ({cpu_ratio:.2f}) |"
    )


def _measure_in_subprocess(
    impl: str, n: int, hidden: int, vocab: int, args: argparse.Namespace
) -> dict[str, float]:
    """`run_one` in a fresh Python process, so that its peak memory is its own."""
    cmd = [sys.executable, __file__, "--run-one", impl, str(n), str(hidden), str(vocab)]
    cmd += [str(args.chunk_size), args.device, str(args.topk), str(args.softcap)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["576x49152", "2048x128256", "640x262144"],
        help="HIDDENxVOCAB (SmolLM2-135M, Llama 3.2 1B, Gemma 3 270M)",
    )
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--max-naive-gib", type=float, default=10.0, help="skip naive cases estimated above this"
    )
    parser.add_argument(
        "--quick", action="store_true", help="one small case (1024 tokens, 576x49152)"
    )
    parser.add_argument(
        "--topk",
        type=int,
        default=0,
        help="teacher as its cached top-K log-probs (e.g. 32); 0: the dense head",
    )
    parser.add_argument(
        "--softcap", type=float, default=0.0, help="cap both heads' logits (Gemma 2: 30); 0: none"
    )
    parser.add_argument("--run-one", nargs=8, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.run_one:
        impl, n, hidden, vocab, chunk, device, topk, cap = args.run_one
        cap = float(cap) or None
        result = run_one(impl, int(n), int(hidden), int(vocab), int(chunk), device, int(topk), cap)
        print(json.dumps(result))
        return
    if args.quick:
        args.tokens, args.shapes = [1024], ["576x49152"]

    threads = torch.get_num_threads()
    teacher = f"top-{args.topk} cache" if args.topk else "dense head"
    capped = f", logits softcapped at {args.softcap:g}" if args.softcap else ""
    print(
        f"device {args.device}, torch {torch.__version__}, {threads} threads, "
        f"chunk_size {args.chunk_size}, teacher {teacher}{capped}"
    )
    print(
        "| tokens | hidden | vocab | naive peak MiB | chunked peak MiB | mem ratio "
        "| naive s (CPU s) | chunked s (CPU s) | time ratio (CPU) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shape in args.shapes:
        hidden, vocab = (int(x) for x in shape.split("x"))
        for n in args.tokens:
            estimate_gib = NAIVE_COPIES * n * vocab * 4 / 2**30
            naive = None
            if estimate_gib <= args.max_naive_gib:
                naive = _measure_in_subprocess("naive", n, hidden, vocab, args)
            chunked = _measure_in_subprocess("chunked", n, hidden, vocab, args)
            print(_row(n, hidden, vocab, naive, chunked, estimate_gib), flush=True)


if __name__ == "__main__":
    main()
