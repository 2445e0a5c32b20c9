"""Shared pytest fixtures: where the imported teacher lives, and skipping when it is absent.

Run the suite with `make test` (it fetches the teacher first) or `.venv/bin/python -m pytest -q`.
"""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TEACHER_DIR = REPO / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    """The imported SmolLM2-135M-Instruct HF directory; `make test` creates it first."""
    if not (TEACHER_DIR / "config.json").exists():
        pytest.skip(f"teacher not imported: run `make teacher` to create {TEACHER_DIR}")
    return TEACHER_DIR


@pytest.fixture
def one_thread():
    """Torch on one thread for tests of tiny models (`pytest.mark.usefixtures("one_thread")`):
    they gain nothing from a second thread, and on a busy machine every op of a 2-thread run
    waits for both threads to be scheduled (~100x slower small ops)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
