"""What a training run reports: metrics.jsonl, the console line of a log step, memory and MFU.

train.py appends one JSON record per log step (and per evaluation) to OUT/metrics.jsonl and
prints the same numbers as one line; scripts/plot_metrics.py draws the file. MFU is model
FLOPs (kd/training.py's count) over the GPU's dense bf16 peak.
"""

import json
import os
import resource
import time
from datetime import timedelta
from pathlib import Path

import torch

from kd import parallel

# Dense bf16 tensor-core peak per GPU, for MFU (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB


def gpu_peak_flops(device: torch.device) -> float | None:
    """This GPU's dense bf16 peak from PEAK_BF16_FLOPS; None on CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def step_values(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """The step's loss and the per-token means of the method's sums (ce, divergence), over all
    ranks. Reads the values back: a host-device sync, on log steps only."""
    totals = parallel.all_reduce_sum(torch.stack(list(sums.values()))).tolist()  # host sync
    totals = dict(zip(sums, totals))
    loss, tokens = totals.pop("loss"), totals.pop("tokens", 0.0)
    return {"loss": loss, **{key: value / tokens for key, value in totals.items()}}


def format_step(r: dict, max_steps: int, extra: list[str]) -> str:
    """The one console line of a log step (metrics.jsonl gets the same numbers as JSON)."""
    loss = f"loss {r['loss']:.4f}"
    if "divergence" in r:
        loss += f" (div {r['divergence']:.4f}, ce {r['ce']:.4f})"
    loads = [v for key, v in r.items() if key.startswith("expert_load/")]
    if loads:  # an MoE student: its balancing loss and its busiest expert (1/E when balanced)
        loss += f" | router aux {r['router_aux']:.3f}, busiest expert {max(loads):.0%}"
    parts = [
        f"step {r['step']}/{max_steps}",
        "epoch " + "/".join(f"{e:.2f}" for e in r["epochs"]),  # per data file
        loss,
        f"lr {r['lr']:.2e}",
        f"grad {r['grad_norm']:.3f}",
        f"{r['tokens_per_s']:.0f} tok/s",
        f"mem {r['peak_mem_gb']:.2f} GB",
        f"eta {timedelta(seconds=round(r['eta_s']))}",
        *(f"{key} {r[key]:.3g}" for key in extra),  # the method's own, e.g. on-policy lengths
    ]
    return " | ".join(parts + ([f"mfu {r['mfu']:.1%}"] if "mfu" in r else []))


def log_record(out: Path, record: dict, world: parallel.World) -> None:
    """Append one JSON line to OUT/metrics.jsonl (rank 0)."""
    if world.is_main:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def trim_metrics(out: Path, step: int, world: parallel.World) -> None:
    """On resume, drop records of steps after the checkpoint: they will be logged again. A
    torn last line (the run was killed while appending it) goes too."""
    path = out / "metrics.jsonl"
    if world.is_main and path.is_file():
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", step + 1) <= step:
                kept.append(line + "\n")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


class Meter:
    """Training throughput between log records, and the time left. Evaluation and saving are
    not training: `skip` after them restarts the clock."""

    def __init__(self, step: int, max_steps: int) -> None:
        self.start_step, self.max_steps = step, max_steps
        self.t_start = self.t_last = time.perf_counter()
        self.tokens = 0.0  # this rank's tokens since the last record

    def add(self, tokens: float) -> None:
        self.tokens += tokens

    def skip(self) -> None:
        self.t_last = time.perf_counter()

    def read(self, step: int) -> dict[str, float]:
        """tokens/s over all ranks since the last record (a CPU all-reduce), and the ETA."""
        now = time.perf_counter()
        rate = parallel.agree([self.tokens])[0] / (now - self.t_last)
        eta = (self.max_steps - step) * (now - self.t_start) / (step - self.start_step)
        self.t_last, self.tokens = now, 0.0
        return {"tokens_per_s": rate, "eta_s": eta}
