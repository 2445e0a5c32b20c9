"""A run directory belongs to one run: who holds it, which run it holds, how it is saved.

A training run owns OUT:
- `claim` takes OUT/.lock (kd/lock.py: held as long as the process lives, so a killed run
  never leaves a stale lock that blocks the next one; a refusal, or the take-over of a dead
  holder's lock, names the process), refuses a fresh
  start into a directory that holds a run (checkpoints, final/, metrics.jsonl,
  train_config.toml) unless `overwrite = true` removes it, and refuses `--out` naming a file.
- `identity` is what a resume must find unchanged: every setting that changes what a step
  computes, what the model directories hold (`kd.hf.fingerprint`, so a moved directory still
  resumes), the student's architecture and the teacher cache. Every checkpoint records it;
  `resume` refuses a checkpoint of another run, naming each difference, except the
  SAFE_TO_CHANGE settings the user lists in `resume_changes` (then logged).
- `save` checkpoints the run; `export` checkpoints the last step before it writes the student
  to OUT/final (atomically), so a full disk at the export loses nothing: `--resume=true`
  exports again.

Tests: `.venv/bin/python -m pytest -q tests/test_runs.py`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from kd import checkpoint, hf, parallel
from kd.config import SAFE_TO_CHANGE, TrainConfig
from kd.lock import Lock
from kd.model_config import ModelConfig
from kd.runlog import log_record, trim_metrics
from kd.teacher_cache import read_manifest
from kd.training import Run

LOCK_FILE = ".lock"
# What a run writes into OUT; any of them means OUT holds a run already.
RUN_FILES = ("checkpoints", "final", "metrics.jsonl", "train_config.toml")
# Settings that are paths: what they hold is compared instead (the models by fingerprint, the
# data by kd/data.py's stream check), so a run moved to another disk resumes.
PATHS = ("teacher", "student", "init_from", "teacher_cache", "data", "lm_data")
# Settings of this start alone.
THIS_START = ("out", "resume", "resume_changes", "overwrite")


_held: list[Lock] = []  # this process's run directory locks, released by `release_all`


def release_all() -> None:
    """Release the run directory locks this process holds (train.py's exit path)."""
    while _held:
        _held.pop().release()


def claim(out: Path, *, resume: bool, overwrite: bool) -> Lock:
    """Lock OUT for this run and check that the run may start there (see the docstring)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory; choose a directory")
    out.mkdir(parents=True, exist_ok=True)
    lock = Lock(out / LOCK_FILE, what=f"run directory {out}")
    if lock.previous:
        notice = f"{out}: took over the lock of {lock.previous}, which is no longer running"
        print(notice, file=sys.stderr)
    try:
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found and not resume:
            if not overwrite:
                raise ValueError(
                    f"{out} already holds {', '.join(found)} of a run; pass --resume=true to "
                    "continue it, --overwrite=true to replace it, or choose another --out"
                )
            for name in found:  # asked for: the old run goes
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    except BaseException:
        lock.release()
        raise
    _held.append(lock)
    return lock


# ----------------------------------------------------------------------------- identity


def identity(cfg: TrainConfig, student_config: ModelConfig) -> dict:
    """What a resume must find unchanged, as JSON data (see the module docstring)."""

    def model(path: str) -> str | None:
        return hf.fingerprint(path) if path else None

    cache = None
    if cfg.teacher_cache:  # its spec says what the cache holds (teacher, data, k, T)
        spec = asdict(read_manifest(Path(cfg.teacher_cache))[0])
        cache = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    settings = {k: v for k, v in asdict(cfg).items() if k not in PATHS + THIS_START}
    found = {
        "settings": settings,
        "teacher": [model(t) for t in cfg.teacher],
        "student": model(cfg.student),
        "init_from": model(cfg.init_from),
        "student_config": asdict(student_config),
        "teacher_cache": cache,
    }
    return json.loads(json.dumps(found))  # tuples as lists: as a checkpoint stores it


MODELS = {
    "teacher": "the teacher(s) hold other weights or configs",
    "student": "--student holds another model",
    "init_from": "--init_from holds another model",
    "student_config": "the student has another architecture",
    "teacher_cache": "the teacher cache holds another teacher or settings",
}


def check_resume(saved: dict | None, now: dict, allowed: tuple[str, ...]) -> list[str]:
    """The changes a resume accepts (those in `allowed`, all SAFE_TO_CHANGE); a ValueError
    naming every other difference between the checkpoint's identity and this start's."""
    if saved is None:  # a checkpoint that records no identity: nothing to compare
        return ["the checkpoint records no identity: the settings were not compared"]
    refused, accepted = [], []
    for key in sorted(set(saved["settings"]) | set(now["settings"])):
        old, new = saved["settings"].get(key), now["settings"].get(key)
        if old == new:
            continue
        change = f"{key} {json.dumps(old)} -> {json.dumps(new)}"
        if key in allowed:
            accepted.append(change)
        elif key in SAFE_TO_CHANGE:
            refused.append(f"{change} (to accept it: --resume_changes={key})")
        else:
            refused.append(change)
    refused += [why for key, why in MODELS.items() if saved.get(key) != now.get(key)]
    if refused:
        raise ValueError(
            f"resume refused, this is not the checkpoint's run: {'; '.join(refused)}. Resume "
            "with the run's own settings (its train_config.toml), or start a new run elsewhere"
        )
    return accepted


# ----------------------------------------------------------------------------- save, resume


def save(run: Run, step: int) -> Path:
    """Checkpoint the run at `step` (atomically; all ranks call this)."""
    meta = {name: stream.state_dict() for name, stream in run.streams.items()}
    meta |= {"scaler": run.scaler.state_dict() if run.scaler else None, "config": asdict(run.cfg)}
    meta["identity"] = run.identity
    return checkpoint.save_checkpoint(
        run.out,
        step=step,
        model=run.student,
        optimizer=run.optimizer,
        meta=meta,
        world=run.world,
        keep=run.cfg.keep_checkpoints,
    )


def resume(run: Run) -> int:
    """Load the newest checkpoint that verifies, if it is this run's; its step (= the data
    position). The accepted changes are printed and logged in metrics.jsonl."""
    path = checkpoint.latest_checkpoint(run.out, log=run.say)
    saved = json.loads((path / "meta.json").read_text())
    changes = parallel.run_on_rank0(
        lambda: check_resume(saved.get("identity"), run.identity, run.cfg.resume_changes)
    )
    meta = checkpoint.load_checkpoint(
        path, model=run.student, optimizer=run.optimizer, world=run.world
    )
    for name, stream in run.streams.items():  # refuses other data, seed or global batch
        stream.load_state_dict(meta.get(name) or {})
    if run.scaler is not None:
        run.scaler.load_state_dict(meta["scaler"])
    trim_metrics(run.out, meta["step"], run.world)
    run.say(f"resumed from {path} at step {meta['step']}")
    if changes:
        run.say(f"resumed with changed settings: {'; '.join(changes)}")
        log_record(run.out, {"step": meta["step"], "resumed_with_changes": changes}, run.world)
    return meta["step"]


def export(run: Run, step: int) -> Path:
    """The student as an HF directory in OUT/final (transformers and generate.py load it),
    after a checkpoint of `step`: if the export fails (a full disk), nothing is lost."""
    saved = checkpoint.checkpoint_root(run.out) / f"step_{step:06d}"
    if not saved.exists():
        saved = save(run, step)
    final = run.out / "final"
    state_dict = parallel.full_state_dict(run.student)  # all ranks take part; rank 0 gets it

    def write() -> None:
        try:
            hf.save_state_dict(
                state_dict, run.student.config, final, tokenizer_from=run.cfg.tokenizer_dir
            )
        except OSError as e:
            raise ValueError(
                f"{final}: the export failed ({e.strerror or e}); the run is saved in {saved}: "
                "free some space, then rerun with --resume=true to export it"
            ) from None

    parallel.run_on_rank0(write)
    return final
