"""kd/benchmark.py: warm-up until settled, median and spread of the timed steps, the profile's
summary by kind of work, and cases in processes of their own timed in interleaved rounds.

    .venv/bin/python -m pytest -q tests/test_benchmark.py
"""

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from kd.benchmark import agreement, interleave, kind_of, median_over_runs, profile, timed

REPO = Path(__file__).resolve().parent.parent


def test_timed_warms_up_until_two_steps_agree_and_takes_the_median():
    # A step that is slow twice (allocation, compilation), then steady with one outlier.
    durations = iter([0.2, 0.1, 0.02, 0.02, 0.02, 0.02, 0.09, 0.02, 0.02, 0.02])

    def step():
        time.sleep(next(durations))

    t = timed(step, steps=5, settle=0.5)  # sleep() overshoots by ~1 ms: a loose settle
    assert t.warmup_steps == 4  # 0.2, 0.1, 0.02, then 0.02 agrees with 0.02
    assert t.first_seconds >= 0.2
    assert t.seconds == pytest.approx(0.02, abs=0.01)  # the outlier 0.09 is not the median
    assert t.spread > 2  # (0.09 - 0.02) / 0.02: the outlier shows in the spread


def test_timed_stops_warming_up_at_max_warmup():
    calls = []
    t = timed(lambda: calls.append(time.sleep(0.001 * 2 ** len(calls))), steps=1, max_warmup=3)
    assert t.warmup_steps == 3 and len(calls) == 4  # never settles: 3 warm-up calls, 1 timed


def test_timed_refuses_zero_steps():
    with pytest.raises(ValueError, match="steps=0"):
        timed(lambda: None, steps=0)


@pytest.mark.parametrize(
    "name, kind",
    [
        ("aten::mm", "matmul"),
        ("aten::addmm", "matmul"),
        ("aten::bmm", "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("aten::_to_copy", "dtype/copy"),
        ("aten::copy_", "dtype/copy"),
        ("aten::_fused_adamw_", "optimizer"),
        ("aten::_foreach_mul_", "optimizer"),
        ("FSDP::all_gather_copy_in", "fsdp"),
        ("aten::_log_softmax", "reduction"),
        ("aten::sum", "reduction"),
        ("aten::mul", "elementwise"),
        ("aten::silu_backward", "elementwise"),
        ("aten::_log_softmax_backward_data", "reduction"),
        ("aten::unsqueeze", "other"),
        ("aten::scatter_add_", "index"),
        ("aten::embedding_dense_backward", "embedding"),
    ],
)
def test_kind_of_names_the_work(name, kind):
    assert kind_of(name) == kind


def test_profile_sums_self_time_by_kind():
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def step():
        (a @ b).to(torch.float64).sum()

    step()
    table, kinds = profile(step, steps=2)
    assert "aten::mm" in table
    assert {"matmul", "dtype/copy", "reduction"} <= set(kinds)
    parts = sum(v for k, v in kinds.items() if k != "total")
    assert kinds["total"] == pytest.approx(parts)
    assert all(v >= 0 for v in kinds.values())


def test_median_over_runs_takes_each_case_median():
    runs = [
        {"kd": {"seconds": 5.0, "mem": 2.0}, "sft": {"seconds": 3.0, "mem": 1.0}},
        {"kd": {"seconds": 9.0, "mem": 2.2}, "sft": {"seconds": 3.2, "mem": 1.0}},  # a slow minute
        {"kd": {"seconds": 5.2, "mem": 2.1}, "sft": {"seconds": 2.9, "mem": 1.1}},
    ]
    assert median_over_runs(runs, ("seconds", "mem")) == {
        "kd": {"seconds": 5.2, "mem": 2.1},
        "sft": {"seconds": 3.0, "mem": 1.0},
    }


def test_agreement_is_the_largest_move_from_the_first_run():
    lines, worst = agreement([{"a": 1.0, "b": 2.0}, {"a": 1.05, "b": 1.5}])
    assert worst == pytest.approx(0.25)  # b: |1.5 - 2| / 2
    assert lines == ["  a: 1.00, 1.05 (within 5%)", "  b: 2.00, 1.50 (within 25%)"]


# A case process: its step sleeps, then logs the case's name (the order of the steps).
CASE = """
import sys, time
from pathlib import Path
name, seconds, log, profile_to = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
if seconds < 0:
    raise SystemExit("case " + name + " cannot start")
from kd.benchmark import serve
def step():
    time.sleep(seconds)
    with log.open("a") as f:
        f.write(name + "\\n")
print("other output on stdout")
serve(step, profile_to=Path(profile_to), end=lambda: {"peak_memory_gb": 1.5})
"""


def case_command(name: str, seconds: float, log: Path, tmp_path: Path) -> list[str]:
    profile_to = tmp_path / f"{name}.txt"
    return [sys.executable, "-c", CASE, name, str(seconds), str(log), str(profile_to)]


def test_interleave_takes_one_step_of_each_case_per_round(tmp_path):
    log = tmp_path / "steps.log"
    commands = {
        name: case_command(name, s, log, tmp_path) for name, s in (("a", 0.02), ("b", 0.05))
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    results = interleave(commands, steps=3, profile=True, env=env)
    steps = log.read_text().split()
    warm = results["a"]["warmup_steps"] + results["b"]["warmup_steps"]
    # a warms up alone, then b; then 3 rounds a, b; then each profiled (2 steps) alone
    assert (
        steps[:warm] == ["a"] * results["a"]["warmup_steps"] + ["b"] * results["b"]["warmup_steps"]
    )
    assert steps[warm:] == ["a", "b"] * 3 + ["a", "a", "b", "b"]
    assert results["a"]["seconds"] == pytest.approx(0.02, abs=0.015)
    assert results["b"]["seconds"] == pytest.approx(0.05, abs=0.015)
    assert results["a"]["peak_memory_gb"] == 1.5  # the case's own end() answer
    assert "total" in results["b"]["profile"] and (tmp_path / "b.txt").is_file()


def test_interleave_reports_a_failing_case_with_its_stderr(tmp_path):
    log = tmp_path / "steps.log"
    commands = {  # b fails before a starts
        "b": case_command("b", -1, log, tmp_path),
        "a": case_command("a", 0.0, log, tmp_path),
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with pytest.raises(RuntimeError, match="case b failed:(.|\\n)*case b cannot start"):
        interleave(commands, steps=1, profile=False, env=env)
