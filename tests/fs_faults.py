"""Full and read-only folders on a real filesystem, for tests of what kd does when a write fails.

`run_on_tmpfs(argv, mount, ...)` runs a command in a private mount namespace (`unshare -Urm`:
no root needed where the kernel allows user namespaces) in which the directory `mount` is a
fresh tmpfs of `size_kb` KiB: writes past that fail with ENOSPC, as on a full disk, and with
`readonly` every write there fails with EROFS. `copy_in` files are put there first, and the
tmpfs's final content is copied to `keep` afterwards, so the test can check what was left.
The rest of the filesystem is the test's own. Where user namespaces are refused (some
containers), the test is skipped.

    result = run_on_tmpfs([sys.executable, "train.py", ...], tmp_path / "out", size_kb=256,
                          keep=tmp_path / "after")
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest


@functools.cache
def _tmpfs_possible() -> bool:
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        probe = ["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {d}"]
        return subprocess.run(probe, capture_output=True).returncode == 0


def run_on_tmpfs(
    argv: list[str],
    mount: Path,
    *,
    size_kb: int = 1024,
    readonly: bool = False,
    copy_in: Path | None = None,
    keep: Path | None = None,
    env: dict | None = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """argv's result (stdout and stderr captured as text) with `mount` a small tmpfs."""
    if not _tmpfs_possible():
        pytest.skip("no private mount namespace here (unshare -Urm and mount refused)")
    mount.mkdir(parents=True, exist_ok=True)
    script = [
        'set -e; size="$1"; dir="$2"; source="$3"; keep="$4"; shift 4',
        'mount -t tmpfs -o size="$size"k tmpfs "$dir"',
        'if [ -n "$source" ]; then cp -a "$source"/. "$dir"/; fi',
        *(['mount -o remount,ro "$dir"'] if readonly else []),
        'set +e; "$@"; rc=$?',
        'if [ -n "$keep" ]; then mkdir -p "$keep" && cp -a "$dir"/. "$keep"/; fi',
        "exit $rc",
    ]
    command = ["unshare", "-Urm", "sh", "-c", "\n".join(script), "sh", str(size_kb), str(mount)]
    command += [str(copy_in or ""), str(keep or ""), *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
