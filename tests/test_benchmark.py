"""kd/benchmark.py: warm-up until settled, median and spread of the timed steps, the profile's
summary by kind of work.

    .venv/bin/python -m pytest -q tests/test_benchmark.py
"""

import time

import pytest
import torch

from kd.benchmark import agreement, kind_of, median_over_runs, profile, timed


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
