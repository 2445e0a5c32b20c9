"""Runs made of stages in child processes: `make demo` and the method comparison.

Each stage of scripts/demo.py and scripts/compare_methods.py is a child process (generate.py,
train.py) or an evaluation, skipped when its output exists; every output is written
atomically, so Ctrl-C and a rerun resume where a run stopped (training from its last
checkpoint). Tests: `.venv/bin/python -m pytest -q tests/test_demo.py`.
"""

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from kd import checkpoint

REPO = Path(__file__).resolve().parent.parent


def run_script(main: Callable[[list[str]], None], argv: list[str]) -> int:
    """A script's exit status: user errors are one `error: ...` line (status 1), Ctrl-C says
    how to resume (status 130: the stages done so far are kept)."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, ChildFailed) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run it again to resume where it stopped", file=sys.stderr)
        return 130
    return 0


class ChildFailed(Exception):
    """A stage's subprocess failed; it has printed its own error."""


def run_child(cmd: list[str]) -> None:
    """Run a child process to completion. Ctrl-C reaches only us (the child has its own
    session): we pass it on as SIGTERM, on which train.py checkpoints at the next step boundary
    and generate.py stops (its finished batches are already on disk); a second Ctrl-C kills
    it."""
    print("  $ " + " ".join(cmd), flush=True)
    child = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGTERM)
        print("\ninterrupted: stopping cleanly (Ctrl-C again to kill)...", file=sys.stderr)
        try:
            child.wait()
        except KeyboardInterrupt:
            child.kill()
            child.wait()
        raise
    if rc != 0:
        raise ChildFailed(
            f"{Path(cmd[1]).name} exited with status {rc} (its message is above); fix it and "
            "rerun: finished stages are kept"
        )


def write_text(path: Path, text: str) -> None:
    """Write-then-rename, so a result file is complete or absent."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def train_overrides(rest: list[str]) -> list[str]:
    """The arguments argparse left over, which must all be train.py's --key=value settings."""
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        raise ValueError(
            f"unexpected argument {bad[0]!r}: options are listed by --help; train.py settings "
            "are given as --key=value"
        )
    return rest


def require_demo_data(demo: Path) -> None:
    """A comparison trains on `make demo`'s data: demo/data/train.jsonl and heldout.jsonl."""
    for name in ("train.jsonl", "heldout.jsonl"):
        if not (demo / "data" / name).is_file():
            raise FileNotFoundError(
                f"{demo / 'data' / name} not found: run `make demo` first (its stages 1-2 write "
                "the teacher's answers), or pass --demo DIR"
            )


def train_args(
    *, config: Path, teacher: str, data: Path, out: Path, precision: str, extra: list[str]
) -> list[str]:
    """train.py's arguments for a run on a demo data directory (`data`/train.jsonl to train,
    `data`/heldout.jsonl to evaluate): the config, the paths and precision, then `extra`
    (later --key=value settings win)."""
    return [
        f"--config={config}",
        f"--teacher={teacher}",
        f"--data={data / 'train.jsonl'}",
        f"--eval_data={data / 'heldout.jsonl'}",
        f"--out={out}",
        f"--precision={precision}",
        *extra,
    ]


def run_train(argv: list[str], out: Path) -> None:
    """train.py with `argv` (its --out is `out`) until out/final exists: resumed from the last
    checkpoint when an earlier run stopped (started anew if it stopped before any). ChildFailed
    when it stops early again (a SIGTERM, on which it checkpoints)."""
    if checkpoint.complete_checkpoints(out):
        again = ["--resume=true"]
    else:  # an earlier attempt that stopped before its first checkpoint leaves nothing to keep
        again = ["--overwrite=true"] if out.exists() else []
    run_child([sys.executable, str(REPO / "train.py"), *argv, *again])
    if not (out / "final").is_dir():
        raise ChildFailed(f"train.py stopped before its last step ({out}); run again to resume it")
