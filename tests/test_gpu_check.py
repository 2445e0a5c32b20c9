"""scripts/check_precision.py on the real teacher (where this CPU runs bf16 natively) and
scripts/gpu_check.sh's refusal on a machine without a GPU.

    .venv/bin/python -m pytest -q tests/test_gpu_check.py
"""

import subprocess
import sys

import pytest
import torch

from kd.dtypes import fast_dtype
from tests.conftest import REPO

CPU = torch.device("cpu")


@pytest.mark.skipif(
    fast_dtype(CPU) != torch.bfloat16, reason="bf16 is emulated on this CPU (~70x slower)"
)
def test_bf16_teacher_keeps_its_predictions(teacher_dir):
    check = [sys.executable, "scripts/check_precision.py", "--model", str(teacher_dir)]
    out = subprocess.run([*check, "--device", "cpu"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("OK")
    # A limit no real model meets: the same run fails, naming the limits.
    out = subprocess.run([*check, "--max-kl", "0"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 1 and "FAIL: bf16 departs from fp32" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_refuses_without_a_gpu(teacher_dir, tmp_path):
    out = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: .venv/bin/python sees no CUDA device; this check is for a GPU machine"
    ]
    assert not (tmp_path / "out").exists()
