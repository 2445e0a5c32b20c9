"""All of kd's `torch.distributed` code: process group, FSDP2 sharding, weight loading,
gradient clipping, collectives and DCP checkpoint I/O. `train.py` calls these functions.

Sharding follows torchtitan (2024): `fully_shard` each transformer block, then the root, with
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: parameters and AdamW state stay
fp32 shards ("master weights"); each block's parameters are all-gathered in bf16 just before
it runs and freed after; gradients are reduce-scattered in fp32. A plain `python train.py`
is a world of one process (an in-memory store, no ports) and runs the very same code.

Gradient scaling: every loss term is already divided by the global valid-token count, so the
gradients must be *summed* over ranks. FSDP2 divides by the world size by default;
`set_gradient_divide_factor(1.0)` turns that off (tests/test_parallel.py checks 1 vs 2 ranks).

The frozen teacher is sharded block by block too, but its root parameters (embeddings, final
norm, head) are left out of FSDP (`ignored_params`): they stay ordinary replicated tensors,
so `teacher.head_weight` can be used by the loss outside the teacher's forward.

Tested by tests/test_parallel.py (2 gloo processes vs 1) and the train tests.
"""

import contextlib
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from kd.dtypes import DTYPES, fast_precision

T = TypeVar("T")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`precision = "auto"` -> "bf16" or "fp32" by `fast_dtype`, timed on rank 0 and broadcast so
    that every rank computes in the same dtype; any other value is returned as it is.

    fp16 on a CPU is refused: CPUs have no fast fp16 matmul, and fp16's loss scaling skips the
    first steps of every run while it finds its scale (a short run trains not at all)."""
    if precision == "fp16" and device.type == "cpu":
        raise ValueError(
            "precision=fp16 on a CPU: no fast fp16 there, and its loss scaling skips "
            "steps; use bf16 (where the CPU has it) or fp32, or auto"
        )
    if precision != "auto":
        return precision
    box = [fast_precision(device) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass(frozen=True)
class World:
    rank: int  # this process, 0 .. world_size - 1
    world_size: int  # number of processes (GPUs, or CPU processes)
    device: torch.device  # cuda:LOCAL_RANK, or cpu

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> World:
    """Join the process group torchrun describes (env://), or form a world of one.

    On CUDA the group is "cuda:nccl,cpu:gloo": NCCL for tensors on the GPU, gloo for small
    CPU tensors (the per-step control values), which then never wait for the GPU.
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return World(dist.get_rank(), dist.get_world_size(), device)


def shutdown() -> None:
    """Leave the process group, rank 0 last. Rank 0's process hosts the rendezvous store (the
    TCP store at MASTER_ADDR), and a peer still tearing its group down when that process
    exits aborts ("terminate called without an active exception": 2 of 12 two-rank MiniLLM
    runs of train.py, 0 of 36 with this): every rank counts itself out in the store, and
    rank 0 waits for all of them."""
    if not dist.is_initialized():
        return
    store = dist.distributed_c10d._get_default_store()  # outlives the group
    rank, size = dist.get_rank(), dist.get_world_size()
    dist.destroy_process_group()
    if size == 1:
        return
    store.add("kd_left", 1)
    while rank == 0 and store.add("kd_left", 0) < size:
        time.sleep(0.01)


def barrier() -> None:
    dist.barrier()


# ----------------------------------------------------------------------------- sharding


def shard_student(
    model: nn.Module, *, precision: str, activation_checkpointing: bool, compile: bool
) -> None:
    """FSDP2 on each block, then the root (embeddings, final norm, head); gradients are summed
    over ranks, never averaged.

    In a world of one process there is nothing to shard or reduce, and FSDP2's copies are the
    whole cost: blocks keep their gathered (cast) parameters from forward to backward instead
    of gathering them again, and no divide factor is set, since with one set FSDP2 divides every
    gradient by it out of place (a full copy of each, even dividing by 1)."""
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
    alone = dist.get_world_size() == 1
    layers = model.model.layers
    for i, block in enumerate(layers):
        if activation_checkpointing:
            # Keep only the block's input; recompute its activations during backward.
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        if compile:
            layers[i] = block = torch.compile(
                block
            )  # state-dict keys gain `_orig_mod.`; DCP strips it
        fully_shard(block, mp_policy=policy, reshard_after_forward=not alone)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule) and not alone:
            module.set_gradient_divide_factor(1.0)  # see the module docstring
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM


def shard_teacher(model: nn.Module, *, compile: bool) -> None:
    """Frozen, eval mode, blocks sharded; parameters keep their dtype (the teacher is built in
    the compute dtype)."""
    model.requires_grad_(False)
    model.eval()
    layers = model.model.layers
    for i, block in enumerate(layers):
        if compile:
            layers[i] = block = torch.compile(block)
        fully_shard(block)
    # A root FSDP module whose own parameters are all ignored: the blocks are then non-root and
    # free their gathered weights after each forward, while embeddings/norm/head stay plain.
    block_params = {p for block in layers for p in block.parameters()}
    fully_shard(model, ignored_params={p for p in model.parameters() if p not in block_params})


def load_full_state_dict(model: nn.Module, state_dict: dict[str, Tensor] | None) -> None:
    """Fill a sharded model (materialized with `to_empty`) from rank 0's full state dict.

    Rank 0 alone reads the checkpoint (state_dict), the others pass None; each parameter is
    broadcast and every rank keeps its shard, so no rank ever holds two full copies.
    """
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    # A shallow copy: set_model_state_dict replaces the dict's values with the loaded shards.
    set_model_state_dict(model, dict(state_dict or {}), options=options)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded state dict on rank 0's CPU (empty on other ranks), e.g. for an HF export."""
    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


@contextlib.contextmanager
def gathered(*models: nn.Module) -> Iterator[None]:
    """Keep the models' FSDP2 parameters all-gathered from their first forward to the block's end.

    By default every block all-gathers its parameters before each forward and frees them
    after: right for training, one forward per micro-batch. An on-policy rollout makes one
    forward per sampled token, so it would gather the whole student and teacher that many
    times; inside this block each is gathered once, at the cost of one full copy of each
    model (in its compute dtype) per rank while it lasts. On exit every module is resharded
    and the blocks go back to resharding after forward (the root keeps FSDP's default for
    the root: it stays gathered until backward).
    """
    modules = [m for model in models for m in model.modules() if isinstance(m, FSDPModule)]
    roots = {id(model) for model in models}
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            if id(m) not in roots:
                m.set_reshard_after_forward(True, recurse=False)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Off for all micro-batches but the last: gradients accumulate unreduced, then one
    reduce-scatter."""
    model.set_requires_gradient_sync(enabled)


def grad_scaler(precision: str, device: torch.device) -> ShardedGradScaler | None:
    """fp16 needs loss scaling (its exponent range underflows small gradients); bf16/fp32 do not.

    ShardedGradScaler all-reduces the found-inf flag, so every rank skips the same steps.
    """
    return ShardedGradScaler(device=device.type) if precision == "fp16" else None


def clip_grad_norm_(parameters: list[nn.Parameter], max_norm: float) -> Tensor:
    """Global 2-norm of all gradients (all shards, all ranks); scale them down to max_norm if above.

    ||g|| = sqrt(sum_ranks sum_shards ||g_shard||^2): with DTensor gradients the local norm is a
    partial sum that `full_tensor()` all-reduces. max_norm = 0 only measures.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm, foreach=True)
    return norm


# ----------------------------------------------------------------------------- collectives


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum a tensor over ranks, in place, and return it."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def agree(values: list[float]) -> list[float]:
    """Sum a few host numbers over ranks, on CPU (gloo): no wait for the GPU."""
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def rank_and_size() -> tuple[int, int]:
    """(this rank, number of ranks); (0, 1) without a process group."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_objects(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] without a group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_ranks(flag: bool) -> bool:
    """True only when `flag` is True on every rank (a CPU all-reduce): the done flag of
    on-policy rollouts, so that every rank keeps decoding, and calling FSDP's collectives,
    until all are done."""
    return agree([float(flag)])[0] == dist.get_world_size()


# ----------------------------------------------------------------------------- DCP


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and AdamW state into directory `path` (DCP)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    except CheckpointException as e:  # raised on every rank, with each failed rank's error
        reasons = sorted(
            {str(error[0] if isinstance(error, tuple) else error) for error in e.failures.values()}
        )
        raise OSError(
            f"{path}: the checkpoint could not be written ({'; '.join(reasons)})"
        ) from None


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read a `save_sharded` directory back into the (sharded) model and optimizer, in place.

    DCP reshards on load, so a checkpoint of N ranks resumes on M.
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def run_on_rank0(fn: Callable[[], T]) -> T | None:
    """fn() on rank 0 only (e.g. reading a checkpoint), None elsewhere; if it raises a user
    error or an OS error (a full disk) there, every rank raises it, instead of the others
    waiting forever in a broadcast."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
            error = e
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]
    return result
