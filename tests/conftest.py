"""Shared pytest fixtures: where the imported teacher lives, and skipping when it is absent.

Run the suite with `make test` (it fetches the teacher first) or `.venv/bin/python -m pytest -q`.
"""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEACHER_DIR = REPO / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    """The imported SmolLM2-135M-Instruct HF directory; `make test` creates it first."""
    if not (TEACHER_DIR / "config.json").exists():
        pytest.skip(f"teacher not imported: run `make teacher` to create {TEACHER_DIR}")
    return TEACHER_DIR
