"""A JSONL output that a job writes, resumes and finishes: the files beside OUT and their rules.

generate.py writes the teacher's answers to OUT (a local model, or a server behind an API) as
a job that may be killed at any point and rerun. While it works, everything lives in files
named after OUT, and OUT itself appears only once complete:

    OUT.partial       the answers so far, appended and fsync'ed a group of lines at a time
    OUT.partial.json  what made them (model or API, prompts, every sampling setting)
    OUT.partial.lock  held by the one process writing OUT (kd/lock.py)

A rerun with equal settings resumes the partial; with any other, it is refused, naming the
change, so that answers of two settings never mix in one file. OS errors become one line that
names the file and says what to do (`output_error`).

Tests: `.venv/bin/python -m pytest -q tests/test_generate.py tests/test_api_generate.py`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from kd.lock import Lock

# Settings recorded as a hash: a change names what changed and the first 12 hex digits.
HASHED = {
    "model_fingerprint": ("--model", "fingerprint"),
    "tokenizer_fingerprint": ("tokenizer", "fingerprint"),
    "prompts_sha256": ("--prompts-file", "sha256"),
    "prompt_ids_sha256": ("chat template or tokenizer config", "sha256 of the prompt ids"),
}


def describe_change(key: str, old: object, new: object) -> str:
    """One changed setting, e.g. "--temperature 0.0 -> 1.0" or "another --model (...)"."""
    if key in HASHED:
        what, kind = HASHED[key]
        return f"another {what} ({kind} {str(old)[:12]}, now {str(new)[:12]})"
    return f"--{key.replace('_', '-')} {_show(old)} -> {_show(new)}"


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return repr(value) if isinstance(value, str) else str(value)  # None: a setting not given


def check_settings(partial: Path, sidecar: Path, settings: dict) -> None:
    """Refuse to finish `partial` unless its sidecar says it was written with `settings`."""
    start_over = f"delete {partial} and {sidecar} to start over"
    if not sidecar.exists():
        raise ValueError(
            f"{partial} has no {sidecar.name} saying which model and settings wrote it (left "
            f"by an older kd, or deleted), so it cannot be resumed: delete {partial} to start over"
        )
    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8"))["settings"]
        changed = [k for k in {**recorded, **settings} if recorded.get(k) != settings.get(k)]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{sidecar}: not a settings record ({e!r}); {start_over}") from None
    if len(changed) > 1 and "prompt_ids_sha256" in changed:
        changed.remove("prompt_ids_sha256")  # follows from the others; name only the cause
    if changed:
        what = ", ".join(describe_change(k, recorded.get(k), settings.get(k)) for k in changed)
        raise ValueError(
            f"{partial} was written with other settings: {what}; rerun with the same settings "
            f"(recorded in {sidecar}), or {start_over}"
        )


def write_json_atomically(path: Path, value: dict) -> None:
    """`value` as indented JSON, written as `write_text_atomically` writes."""
    write_text_atomically(path, json.dumps(value, indent=1, ensure_ascii=False) + "\n")


def write_text_atomically(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, then rename: `path` holds the old or the new text,
    never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def append_lines(f, data: bytes) -> None:
    """Append whole lines to the partial and fsync them. A failed write (a full disk) cuts
    the file back to its size before, so the partial holds whole appends only."""
    size = os.fstat(f.fileno()).st_size
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked (a disk filling up)
            view = view[os.write(f.fileno(), view) :]
        os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):  # if this fails too, read_partial drops the rest
            os.ftruncate(f.fileno(), size)
        raise OSError(e.errno, e.strerror, f.name) from None  # os.write's error names no file


def output_error(e: OSError, partial: Path) -> str:
    """An OS error on the output files as one line: the path, the reason, what to do."""
    if e.strerror is None:  # raised by us, with its own message
        return str(e)
    if e.errno == errno.ENOSPC:
        todo = "free some space, then rerun with the same settings"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        todo = "make the folder writable, or choose another --output"
    else:
        todo = "fix that and rerun with the same settings, or choose another --output"
    if partial.is_file() and partial.stat().st_size > 0:
        todo += f" (the finished batches are kept in {partial}; a rerun resumes after them)"
    where = e.filename or partial.parent  # a write to an open file names none: the folder
    return f"{where}: {e.strerror}; {todo}"


def output_files(out: Path) -> tuple[Path, Path, Path]:
    """OUT.partial (the answers so far), OUT.partial.json (what made them), OUT.partial.lock."""
    partial = out.with_name(out.name + ".partial")
    return partial, Path(f"{partial}.json"), Path(f"{partial}.lock")


def claim_output(
    out: Path, settings: dict, *, source: str, resume: Callable[[Path], int]
) -> tuple[Lock, int]:
    """Lock the output for this process and check that it may write there: returns the lock and
    `resume(partial)`, what a previous run with the same settings finished (0 for a fresh
    start; `resume` also cuts a torn end off the partial). `source` (the model directory or
    API) goes into the settings record for people to read."""
    partial, sidecar, lock_path = output_files(out)
    if out.is_dir():
        raise ValueError(f"{out}: is a directory; give --output a file, e.g. {out / 'out.jsonl'}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: output directory not found")
    if out.exists():  # checked before the lock file is made, so none is left beside a result
        raise ValueError(f"{out} exists: delete it or choose another --output")
    # The lock is a file of its own, OUT.partial.lock: not OUT.partial, which is truncated and
    # renamed to OUT while we hold it (a process arriving after the rename would lock a new
    # OUT.partial), nor the folder, whose other outputs are other runs; named OUT.partial.* so
    # that everything of an unfinished output lists together. It must be in place before
    # anything is read or written: a refused second process leaves the first's files alone.
    lock = Lock(lock_path, what=f"--output {out}")
    try:
        if lock.previous:
            print(
                f"{out}: took over the lock of {lock.previous}, no longer running", file=sys.stderr
            )
        if out.exists():  # again, under the lock: the holder before us may have finished it
            raise ValueError(f"{out} exists: delete it or choose another --output")
        if partial.exists():
            check_settings(partial, sidecar, settings)
        else:  # the record first: a partial without one could never be resumed
            write_json_atomically(sidecar, {"source": source, "settings": settings})
        return lock, resume(partial) if partial.exists() else 0
    except BaseException:
        lock.release()
        raise


def write_jsonl_atomically(path: Path, records: list[dict]) -> None:
    """A JSONL file, one record a line, written as `write_text_atomically` writes."""
    write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def finish_output(out: Path) -> None:
    """Rename the complete partial to OUT, then remove its record and lock (under the lock)."""
    os.replace(output_files(out)[0], out)  # first: a crash after it leaves OUT whole, and
    remove_partial(out)  # reruns refused


def remove_partial(out: Path) -> None:
    """Once OUT is whole: remove OUT.partial, its settings record and its lock."""
    partial, sidecar, lock_path = output_files(out)
    partial.unlink(missing_ok=True)
    sidecar.unlink(missing_ok=True)
    # Removing a lock file is safe here, though not in general (kd/lock.py): whoever locks it
    # after us, the old file or a new one, finds OUT and stops before writing anything.
    lock_path.unlink(missing_ok=True)
