"""Training checkpoints: the full train state, written atomically, the newest K kept.

Layout of OUT/checkpoints/:

    step_000100/            a complete checkpoint (only complete ones carry this name)
        .metadata, *.distcp   model + AdamW state, sharded by torch.distributed.checkpoint (DCP)
        meta.json             step, data-stream state, grad-scaler state, the config, the
                              run's identity, and each file's size and sha256
        rng_rank{r}.pt        each rank's CPU/CUDA/numpy/python RNG states
    step_000200.tmp/        a save in progress (or one killed mid-way): never read

A save writes everything into `step_N.tmp/`, waits for every rank, and rank 0 renames it to
`step_N/`: the rename is the commit point (atomic on POSIX), so a save killed at any moment
leaves the previous checkpoint as the newest complete one. Files can still be damaged later
(a disk error, a partial copy): `latest_checkpoint` verifies each file's size and sha256
against meta.json and falls back to the newest checkpoint that verifies, saying why it
skipped the others. Each rank hashes a share of the files, at save and at resume (sha256
reads ~1-2 GB/s: an 8B student's 100 GB of weights and AdamW state cost ~10 s on 8 ranks).
The step plus the data state pin the data position (kd/data.py's stream is a pure function
of the step), so the resumed run continues exactly (tests/test_train.py).
"""

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
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


def latest_checkpoint(out: str | Path, *, log: Callable[[str], None] = print) -> Path:
    """The newest complete checkpoint whose files verify (every rank calls this). Newer ones
    that fail are skipped, each named with what is wrong (`log`); FileNotFoundError (for
    `resume`) when there is none at all, ValueError when none verifies."""
    found = complete_checkpoints(out)
    if not found:
        raise FileNotFoundError(
            f"resume=true but {checkpoint_root(out)} holds no complete checkpoint; "
            "set resume=false to start a new run"
        )
    failed = []
    for path in reversed(found):
        problems = _problems(path)
        if not problems:
            for note in failed:
                log(f"skipped {note}")
            return path
        failed.append(f"{path}: {'; '.join(problems)}")
    raise ValueError(
        f"no checkpoint in {checkpoint_root(out)} verifies ({' | '.join(failed)}); restore "
        "the files from a copy, or start a new run"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _records(directory: Path) -> dict[str, dict]:
    """{file name: {"bytes", "sha256"}} of a save's files; each rank hashes every world_size-th
    file (all ranks list the same files: the caller has waited for every rank's writes)."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    rank, world_size = parallel.rank_and_size()
    mine = {
        name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
        for i, name in enumerate(names)
        if i % world_size == rank
    }
    return {name: r for part in parallel.gather_objects(mine) for name, r in part.items()}


def _problems(path: Path) -> list[str]:
    """What is wrong with a checkpoint's files ([] if nothing), found by all ranks together."""
    try:
        files = json.loads((path / "meta.json").read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError
    except FileNotFoundError:
        return ["meta.json is missing"]
    except KeyError:
        return []  # a checkpoint that records no checksums: resumed unverified
    except (OSError, ValueError, TypeError):
        return ["meta.json is unreadable"]
    rank, world_size = parallel.rank_and_size()
    mine = []
    for i, (name, record) in enumerate(sorted(files.items())):
        if i % world_size != rank:
            continue
        file = path / name
        if not file.is_file():
            mine.append(f"{name} is missing")
        elif file.stat().st_size != record["bytes"]:
            mine.append(f"{name} has {file.stat().st_size} of its {record['bytes']} bytes")
        elif _sha256(file) != record["sha256"]:
            mine.append(f"{name} does not match its sha256")
    return [problem for part in parallel.gather_objects(mine) for problem in part]


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

    def prepare() -> None:
        for stale in root.glob("*.tmp"):  # left by a save that was killed
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)

    parallel.run_on_rank0(prepare)  # a failure there (a read-only disk) stops every rank
    parallel.save_sharded(tmp, model, optimizer)
    rng_file, error = tmp / f"rng_rank{world.rank}.pt", None
    try:
        torch.save(_rng_state(), rng_file)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        error = f"{rng_file} could not be written ({' '.join(str(e).split())[:200]})"
    errors = [e for e in parallel.gather_objects(error) if e]  # also: every rank has written
    if errors:
        raise OSError(f"the checkpoint could not be written: {errors[0]}")
    files = _records(tmp)

    def commit() -> None:
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta, "files": files}, indent=1))
        if final.exists():  # the same step saved again (e.g. SIGTERM right after a save)
            shutil.rmtree(final)
        os.rename(tmp, final)  # the commit point
        for old in complete_checkpoints(out)[:-keep]:
            shutil.rmtree(old)

    parallel.run_on_rank0(commit)  # a failure there (a full disk) stops every rank
    return final


def load_checkpoint(
    path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, world: World
) -> dict:
    """Restore model, optimizer and this rank's RNG from `path`; return its meta.json dict."""
    parallel.load_sharded(path, model, optimizer)
    rng_file = path / f"rng_rank{world.rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved
        _set_rng_state(torch.load(rng_file, weights_only=False))
    meta = json.loads((path / "meta.json").read_text())
    meta.pop("files", None)  # checked by latest_checkpoint
    return meta
