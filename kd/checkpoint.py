"""Training checkpoints: the full train state, written atomically, the newest K kept.

Layout of OUT/checkpoints/:

    step_000100/            a complete checkpoint (only complete ones carry this name)
        .metadata, *.distcp   model + AdamW state, sharded by torch.distributed.checkpoint (DCP)
        meta.json             step, data-stream state, grad-scaler state, the config
        rng_rank{r}.pt        each rank's CPU/CUDA/numpy/python RNG states
    step_000200.tmp/        a save in progress (or one killed mid-way): never read

A save writes everything into `step_N.tmp/`, waits for every rank, and rank 0 renames it to
`step_N/`: the rename is the commit point (atomic on POSIX), so a save killed at any moment
leaves the previous checkpoint as the newest complete one. `resume` loads the newest complete
checkpoint; the step plus the data state pin the data position (kd/data.py's stream is a
pure function of the step), so the resumed run continues exactly (tests/test_train.py).
"""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd import parallel
from kd.parallel import World


def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def complete_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out: str | Path) -> Path:
    """The newest complete checkpoint; FileNotFoundError (for `resume`) when there is none."""
    found = complete_checkpoints(out)
    if not found:
        raise FileNotFoundError(
            f"resume=true but {checkpoint_root(out)} holds no complete checkpoint; "
            "set resume=false to start a new run"
        )
    return found[-1]


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(
    out: str | Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict,
    world: World,
    keep: int,
) -> Path:
    """Write step_{step}/ atomically (all ranks call this) and delete all but the newest `keep`."""
    root = checkpoint_root(out)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if world.is_main:
        for stale in root.glob("*.tmp"):  # left by a save that was killed
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    parallel.barrier()
    parallel.save_sharded(tmp, model, optimizer)
    torch.save(_rng_state(), tmp / f"rng_rank{world.rank}.pt")
    parallel.barrier()  # every rank's files are written
    if world.is_main:
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
        if final.exists():  # the same step saved again (e.g. SIGTERM right after a save)
            shutil.rmtree(final)
        os.rename(tmp, final)  # the commit point
        for old in complete_checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    parallel.barrier()
    return final


def load_checkpoint(
    path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, world: World
) -> dict:
    """Restore model, optimizer and this rank's RNG from `path`; return its meta.json dict."""
    parallel.load_sharded(path, model, optimizer)
    rng_file = path / f"rng_rank{world.rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "meta.json").read_text())
