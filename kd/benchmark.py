"""Timing and profiling a step: what the benchmarks in scripts/ measure with.

A step's first calls cost more than the rest: memory is allocated and paged in, oneDNN builds
its kernels, torch.compile compiles. On a 2-core CPU, a single timed step after one warm-up
call was measured to swing a ratio of two cases from 0.79 to 2.96 between runs. `timed`
therefore warms up until two consecutive steps agree within `settle` (5%), then times each of
`steps` steps (at least 5) on its own and reports the median and the spread
((max - min) / median): the median is robust to one step delayed by another process, and the
spread says how far to trust it.

A machine's speed can drift for minutes (seen on a 2-core VM: the same bf16 matmul at 1,896,
715 and 664 GFLOP/s at different times of one day; one case's steps ~25% slower for the length
of that case), which no median of one case's steps absorbs, and a benchmark that times its
cases one after another then compares a slow minute of one with a fast minute of another.
`interleave` runs every case in a process of its own (`serve` is the case's side), all alive at
once, and times them in rounds, one step of each case per round: a slow minute then slows every
case alike and the ratios of their medians hold. Over several runs (`median_over_runs`,
`agreement`), how far each ratio moved between runs says whether to trust one run.

`profile` runs steps under torch.profiler and returns the per-op table (self time, the time an
op spends outside the ops it calls) and a summary by kind of work (`KINDS`): matrix products,
attention, dtype conversions and copies, elementwise math, reductions, the optimizer, FSDP's
collectives. It is how a step's time that does no model or loss work is found.

Tests: `.venv/bin/python -m pytest -q tests/test_benchmark.py`.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    seconds: float  # median wall seconds per step
    spread: float  # (max - min) / median of the timed steps' wall seconds
    cpu_seconds: float  # median CPU seconds per step, all threads (this process)
    first_seconds: float  # the first call: allocation, kernel set-up, compilation
    warmup_steps: int  # calls before the timed ones, the first included


def one_step(step: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all this process's threads) of one call of step."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def warm_up(
    step: Callable[[], object], *, settle: float = 0.05, max_warmup: int = 10
) -> tuple[float, int]:
    """Call step until two consecutive calls differ by at most `settle` of the smaller (or
    `max_warmup` calls); (the first call's seconds, calls made)."""
    first, _ = one_step(step)
    previous, calls = first, 1
    while calls < max_warmup:
        seconds, _ = one_step(step)
        calls += 1
        if abs(seconds - previous) <= settle * min(seconds, previous):
            break
        previous = seconds
    return first, calls


def summary(
    walls: list[float], cpus: list[float], *, first_seconds: float, warmup_steps: int
) -> Timing:
    """The Timing of timed steps' wall and CPU seconds."""
    median = statistics.median(walls)
    return Timing(
        seconds=median,
        spread=(max(walls) - min(walls)) / median,
        cpu_seconds=statistics.median(cpus),
        first_seconds=first_seconds,
        warmup_steps=warmup_steps,
    )


def timed(
    step: Callable[[], object], *, steps: int = 5, settle: float = 0.05, max_warmup: int = 10
) -> Timing:
    """Warm up (`warm_up`), then time `steps` calls one by one.

    On a CPU shared with other jobs the wall time stretches with their load; the CPU time (all
    threads) stays closer to the work done, so both are reported."""
    if steps < 1:
        raise ValueError(f"steps={steps}: time at least one step")
    first, warmup = warm_up(step, settle=settle, max_warmup=max_warmup)
    walls, cpus = zip(*(one_step(step) for _ in range(steps)))
    return summary(list(walls), list(cpus), first_seconds=first, warmup_steps=warmup)


def matmul_peak(dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of a 2048^3 matmul: the practical peak of this machine in that dtype."""
    a, b = (torch.randn(2048, 2048, device=device, dtype=dtype) for _ in range(2))
    return 2 * 2048**3 / timed(lambda: a @ b, steps=5).seconds


# Kinds of work, by op name (first match wins; the order matters: "aten::_to_copy" is a copy
# before anything else could claim it). Self times add up to the step without double counting.
KINDS = (
    ("attention", r"scaled_dot_product|flash|_efficient_attention"),
    ("matmul", r"::(mm|bmm|addmm|matmul|linear|baddbmm|addmm_)$|_mm_|mkldnn|onednn"),
    ("dtype/copy", r"_to_copy|::copy_|::to$|::clone|::contiguous|_foreach_copy"),
    ("optimizer", r"adam|_foreach_|lerp"),
    ("fsdp", r"fsdp|all_gather|reduce_scatter|all_reduce|split_with_sizes_copy|chunk_cat"),
    ("reduction", r"::(sum|mean|max|amax|logsumexp|norm|_log_softmax|log_softmax|_softmax)"),
    ("embedding", r"embedding"),
    ("index", r"index|gather|scatter|nonzero|masked"),
    (
        "elementwise",
        r"::(mul|add|sub|div|exp|log|neg|rsqrt|pow|silu|gelu|tanh|where|sigmoid|cat|fill)",
    ),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def profile(step: Callable[[], object], *, steps: int = 2, rows: int = 25) -> tuple[str, dict]:
    """(torch.profiler's per-op table, sorted by self time, `rows` rows; self seconds per step
    by kind of work, with "total") over `steps` calls of step (warm it up first)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
            sync()
    events = prof.key_averages()
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort_by, row_limit=rows)
    kinds: dict[str, float] = {}
    for event in events:
        self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        kind = kind_of(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + self_us / 1e6 / steps
    kinds = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
    return table, {**kinds, "total": sum(kinds.values())}


def median_over_runs(
    runs: list[dict[str, dict]], keys: tuple[str, ...]
) -> dict[str, dict[str, float]]:
    """{case: {key: median over runs}} of runs [{case: {key: value, ...}}, ...]."""
    return {
        case: {key: statistics.median(run[case][key] for run in runs) for key in keys}
        for case in runs[0]
    }


def agreement(runs: list[dict[str, float]]) -> tuple[list[str], float]:
    """A line per ratio (its value in each run, its largest relative distance from the first
    run's), and the largest distance of all."""
    lines, worst = [], 0.0
    for key in runs[0]:
        values = [r[key] for r in runs]
        distance = max(abs(v - values[0]) / values[0] for v in values)
        worst = max(worst, distance)
        lines.append(
            f"  {key}: " + ", ".join(f"{v:.2f}" for v in values) + f" (within {distance:.0%})"
        )
    return lines, worst


# --- interleaved cases: each case a process of its own, one step of each per round

REPLY = "kd-benchmark-reply "  # starts a case's answers on its stdout; other lines pass by


def _reply(message: dict) -> None:
    print(REPLY + json.dumps(message), flush=True)


def serve(step: Callable[[], object], *, profile_to: Path | None, end: Callable[[], dict]) -> None:
    """A case process's side of `interleave`: warm step up (`warm_up`) and answer with the first
    call's seconds and the warm-up calls; then answer each line of stdin: "step": one call's
    wall and CPU seconds; "profile": `profile`'s kinds (its table written to profile_to);
    "end": end()'s dict (e.g. peak memory), and return."""
    first, warmup = warm_up(step)
    _reply({"first_seconds": first, "warmup_steps": warmup})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            wall, cpu = one_step(step)
            _reply({"seconds": wall, "cpu_seconds": cpu})
        elif command == "profile" and profile_to is not None:
            table, kinds = profile(step)
            profile_to.write_text(table)
            _reply(kinds)
        elif command == "end":
            _reply(end())
            return
        else:
            raise ValueError(f"unknown benchmark command {command!r}")


class _Case:
    """A running case process (`serve` at its other end)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file: a full pipe would block it
        pipe = subprocess.PIPE
        self.process = subprocess.Popen(
            command, stdin=pipe, stdout=pipe, stderr=self.stderr, text=True, env=env
        )

    def ask(self, command: str | None) -> dict:
        """Send command (None: only read), return the case's answer."""
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        self.process.wait()
        self.stderr.seek(0)
        raise RuntimeError(f"case {self.name} failed:\n{self.stderr.read()[-3000:]}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.stderr.close()


def interleave(
    commands: dict[str, list[str]], *, steps: int, profile: bool, env: dict[str, str]
) -> dict[str, dict]:
    """{case: Timing's fields, "profile" (with profile), and the case's end() dict}.

    commands: {case: the command line of a process that calls `serve`}. The cases start one at
    a time, each warming up alone, and stay alive (their memory all at once); then `steps`
    rounds time one step of each case in turn; then each case alone is profiled and ended.
    Raises RuntimeError with the case's stderr when one fails."""
    if steps < 1:
        raise ValueError(f"steps={steps}: time at least one step")
    cases: dict[str, _Case] = {}
    try:
        ready = {}
        for name, command in commands.items():
            cases[name] = _Case(name, command, env)
            ready[name] = cases[name].ask(None)
        times: dict[str, list[dict]] = {name: [] for name in cases}
        for _ in range(steps):
            for name, case in cases.items():
                times[name].append(case.ask("step"))
        results = {}
        for name, case in cases.items():
            walls = [t["seconds"] for t in times[name]]
            cpus = [t["cpu_seconds"] for t in times[name]]
            results[name] = asdict(summary(walls, cpus, **ready[name]))
            if profile:
                results[name]["profile"] = case.ask("profile")
            results[name] |= case.ask("end")
        return results
    finally:
        for case in cases.values():
            case.close()
