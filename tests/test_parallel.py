"""kd/parallel.py on 2 real gloo processes (mp.spawn): FSDP2 sharding against a plain model.

Each rank holds half of a batch. With loss = (sum of this rank's token losses) / N_global and
FSDP's gradient averaging switched off, the sharded gradients must equal the plain model's
gradient of (sum over the whole batch) / N_global: no factor 1/world_size anywhere. Also:
the frozen teacher (blocks sharded, root left plain) gives the plain model's hidden states and
a usable replicated head weight; the global grad norm is the plain one; `run_on_rank0`
re-raises rank 0's user error on every rank; `agree` sums host numbers.

Run: .venv/bin/python -m pytest -q tests/test_parallel.py
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from kd import parallel
from kd.model import ModelConfig, Transformer

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
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
        parallel.shard_student(model, precision="fp32", activation_checkpointing=False, compile=False)
    model.to_empty(device="cpu")
    parallel.load_full_state_dict(model, parallel.run_on_rank0(lambda: reference_model().state_dict()))
    return model


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, n_global: int) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / n_global


def worker(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
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
        assert abs(norm.item() - ref_norm.item()) < 1e-5 * ref_norm.item(), (norm.item(), ref_norm.item())

        # Teacher: hidden states through sharded blocks, head weight a plain replicated tensor.
        teacher = sharded(teacher=True)
        assert not teacher.head_weight.requires_grad and type(teacher.head_weight) is torch.nn.Parameter
        with torch.no_grad():
            hidden = teacher(ids, output_fn=lambda h, w: h)
            diff = (hidden @ teacher.head_weight.T - reference(ids)).abs().max().item()
        assert diff < 1e-5, f"rank {rank}: teacher logits differ from the plain model by {diff:.2e}"

        assert parallel.agree([rank + 1.0, 2.0]) == [3.0, 4.0]

        def fail() -> None:
            raise ValueError("rank 0 could not read the weights")
        with pytest.raises(ValueError, match="rank 0 could not read"):
            parallel.run_on_rank0(fail)  # rank 1 must raise too, not wait in a broadcast
        # Leave together: rank 0 hosts the rendezvous store, and tearing the group down while
        # rank 1 still reads the last broadcast aborts rank 1 ("terminate called ...").
        parallel.barrier()
    finally:
        parallel.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_plain_model():
    mp.spawn(worker, args=(free_port(),), nprocs=WORLD, join=True)
