"""Output directories that belong to one run: an exclusive lock, and what a start may find.

A training run owns OUT: `claim` takes OUT/.lock (an `flock` held as long as the process
lives, so a killed run never leaves a stale lock that blocks the next one; the file names its
holder, so a refusal, or the take-over of a dead holder's lock, names the process), refuses a
fresh start into a directory that holds a run (checkpoints, final/, metrics.jsonl,
train_config.toml) unless `overwrite = true` removes it, and refuses `--out` naming a file.

    lock = claim(Path("runs/x"), resume=False, overwrite=False)   # rank 0 only
    ...
    lock.release()

`Lock` also guards other outputs one writer at a time (generate.py's answers file).
Tests: `.venv/bin/python -m pytest -q tests/test_runs.py`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"
# What a run writes into OUT; any of them means OUT holds a run already.
RUN_FILES = ("checkpoints", "final", "metrics.jsonl", "train_config.toml")


class Lock:
    """An exclusive lock on `path` (created if absent), held until `release` or exit.

    flock: the kernel drops it when the process dies, however it dies. The file holds one
    line naming the holder ("pid 123 on host since 2026-12-01 16:00:00"), left behind by a
    process that did not release it: the next holder names it as the dead process it took
    over from (`previous`).
    """

    def __init__(self, path: Path, *, what: str) -> None:
        self.path = path
        self.file = open(path, "a+", encoding="utf-8")  # held until release()
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ValueError(
                f"{what} is in use by {holder} ({path} is locked); wait for it to finish, "
                "or stop it, or choose another output"
            ) from None
        self.file.seek(0)
        self.previous = self.file.read().strip()  # a holder that died without releasing
        self.file.seek(0)
        self.file.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}\n")
        self.file.flush()

    def release(self) -> None:
        """Empty the file (nobody holds it) and unlock. The file stays: removing a lock file
        lets a process that opened it before the removal lock an orphan beside a new one."""
        if not self.file.closed:
            self.file.truncate(0)
            self.file.flush()
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


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
                    f"{out} holds a run already ({', '.join(found)}); pass --resume=true to "
                    "continue it, --overwrite=true to replace it, or choose another --out"
                )
            for name in found:  # asked for: the old run goes
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    except BaseException:
        lock.release()
        raise
    return lock
