"""kd/parallel.py on 2 real gloo processes (mp.spawn): FSDP2 sharding against a plain model.

Each rank holds half of a batch. With loss = (sum of this rank's token losses) / N_global and
FSDP's gradient averaging switched off, the sharded gradients must equal the plain model's
gradient of (sum over the whole batch) / N_global: no factor 1/world_size anywhere. Also:
the frozen teacher (blocks sharded, root left plain) gives the plain model's hidden states and
a usable replicated head weight; the global grad norm is the plain one; inside
`gathered` (on-policy rollouts) repeated forwards all-gather once and give the same output,
and everything is sharded again after; `run_on_rank0`
re-raises rank 0's user error on every rank; `agree` sums host numbers; precision "auto"
resolves to one dtype on every rank, the faster one on this CPU.

Run: .venv/bin/python -m pytest -q tests/test_parallel.py
"""

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from kd import dtypes, parallel
from kd.model import Transformer
from kd.model_config import ModelConfig

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
WORLD = 2


def reference_model() -> Transformer:
    model = Transformer(CONFIG)
    model.init_weights(seed=0)
    return model


def sharded(*, teacher: bool) -> Transformer:
    with torch.device("meta"):
        model = Transformer(CONFIG)
    if teacher:
        parallel.shard_teacher(model, compile=False)
    else:
        parallel.shard_student(
            model, precision="fp32", activation_checkpointing=False, compile=False
        )
    model.to_empty(device="cpu")
    parallel.load_full_state_dict(
        model, parallel.run_on_rank0(lambda: reference_model().state_dict())
    )
    return model


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, n_global: int) -> torch.Tensor:
    return (
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        / n_global
    )


def worker(rank: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    world = parallel.init_distributed()
    try:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, CONFIG.vocab_size, (4, 10), generator=g)
        labels = torch.randint(0, CONFIG.vocab_size, (4, 10), generator=g)
        mine = slice(2 * rank, 2 * rank + 2)  # this rank's half of the batch

        # Student: sharded gradients of the per-rank loss sums == plain gradient of the global sum.
        student = sharded(teacher=False)
        summed_loss(student(ids[mine]), labels[mine], ids.numel()).backward()
        norm = parallel.clip_grad_norm_(list(student.parameters()), max_norm=0.0)
        reference = reference_model()
        summed_loss(reference(ids), labels, ids.numel()).backward()
        expected = dict(reference.named_parameters())
        for name, p in student.named_parameters():
            diff = (p.grad.full_tensor() - expected[name].grad).abs().max().item()
            # fp32: only the summation order differs (two half-batches, then a gloo sum).
            assert diff < 1e-6, f"rank {rank} {name}: gradient differs from 1 process by {diff:.2e}"
        ref_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
        assert abs(norm.item() - ref_norm.item()) < 1e-5 * ref_norm.item(), (
            norm.item(),
            ref_norm.item(),
        )

        # Teacher: hidden states through sharded blocks, head weight a plain replicated tensor.
        teacher = sharded(teacher=True)
        assert (
            not teacher.head_weight.requires_grad
            and type(teacher.head_weight) is torch.nn.Parameter
        )
        with torch.no_grad():
            hidden = teacher(ids, output_fn=lambda h, head: h)
            diff = (hidden @ teacher.head_weight.T - reference(ids)).abs().max().item()
        assert diff < 1e-5, f"rank {rank}: teacher logits differ from the plain model by {diff:.2e}"

        # gathered (on-policy rollouts): many forwards, one all-gather per block, same outputs,
        # everything resharded on exit.
        def all_gathers(fn) -> int:
            with (
                torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
                torch.no_grad(),
            ):
                fn()
            # The blocks' all-gathers.
            return sum(
                e.count for e in prof.key_averages() if e.key.startswith("FSDP::all_gather (")
            )

        with torch.no_grad():
            plain = student(ids[mine])
        per_forward = all_gathers(lambda: student(ids[mine]))
        # Every block gathers its weights in each forward.
        assert per_forward >= CONFIG.num_hidden_layers, per_forward
        with parallel.gathered(student, teacher):
            assert all_gathers(lambda: [student(ids[mine]) for _ in range(3)]) == per_forward
            with torch.no_grad():
                assert torch.equal(student(ids[mine]), plain)
        assert all(isinstance(p, DTensor) for p in student.parameters()), "resharded on exit"
        assert all_gathers(lambda: [student(ids[mine]) for _ in range(2)]) == 2 * per_forward
        with parallel.gathered():  # rollout_gathered = false: nothing changes
            assert all_gathers(lambda: [student(ids[mine]) for _ in range(2)]) == 2 * per_forward

        assert parallel.agree([rank + 1.0, 2.0]) == [3.0, 4.0]
        precisions = [None] * WORLD
        torch.distributed.all_gather_object(
            precisions, parallel.resolve_precision("auto", world.device)
        )
        assert precisions[0] in ("bf16", "fp32") and len(set(precisions)) == 1, precisions
        assert parallel.resolve_precision("fp32", world.device) == "fp32"
        with pytest.raises(ValueError, match="precision=fp16 on a CPU"):
            parallel.resolve_precision("fp16", world.device)

        def fail() -> None:
            raise ValueError("rank 0 could not read the weights")

        with pytest.raises(ValueError, match="rank 0 could not read"):
            parallel.run_on_rank0(fail)  # rank 1 must raise too, not wait in a broadcast
        parallel.barrier()
    finally:
        parallel.shutdown()  # rank 0 last: see its docstring


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_plain_model():
    mp.spawn(worker, args=(free_port(),), nprocs=WORLD, join=True)


def test_fast_dtype_picks_the_faster_matmul():
    """bf16 only where it is faster: ~3x faster with AVX512-BF16/AMX, ~70x slower on AVX2."""
    # Decided without touching a GPU.
    assert dtypes.fast_dtype(torch.device("cuda")) == torch.bfloat16

    def seconds(dtype: torch.dtype) -> float:  # a bigger matmul than fast_dtype's own, best of 3
        a, b = torch.randn(256, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        a @ b
        return min(_timed(lambda: a @ b) for _ in range(3))

    ratio = seconds(torch.bfloat16) / seconds(torch.float32)
    if 0.5 < ratio < 2:
        pytest.skip(f"bf16/fp32 matmul time ratio {ratio:.2f}: too close to call on this CPU")
    assert dtypes.fast_dtype(torch.device("cpu")) == (
        torch.bfloat16 if ratio < 1 else torch.float32
    ), ratio


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
