"""One writer per output: an exclusive lock that names its holder and dies with it.

`Lock(path, what=...)` takes an `flock` on `path` (created if absent) or raises a one-line
ValueError naming the process that holds it. The kernel drops an flock when its process dies,
however it dies, so a killed run never leaves a stale lock that blocks the next one; the
file's one line ("pid 123 on host since 2026-12-01 16:00:00") names the holder, and a later
holder names a dead one it took over from (`previous`). Used for training's run directory
(kd/rundir.py) and generate.py's answers file.

Tests: `.venv/bin/python -m pytest -q tests/test_runs.py tests/test_generate.py`.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path


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
        self.previous = _dead(self.file.read().strip())  # a holder that died without releasing
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


def _dead(holder: str) -> str:
    """`holder` (a lock file's line) if that process is gone, else "": a process that let its
    lock go without emptying the file (a run that failed, in this same process) is alive."""
    try:
        _, pid, _, host, *_ = holder.split()
        os.kill(int(pid), 0) if host == socket.gethostname() else None
    except ProcessLookupError:
        return holder
    except (ValueError, OSError):
        return holder if holder else ""
    return holder if host != socket.gethostname() else ""
