"""The optimizer and its learning-rate schedule: AdamW with decay only on matrices, and linear
warmup then cosine decay (the schedule of GPT-3 / Chinchilla-style runs).

Pure functions: `lr_at(step, ...)` is the whole schedule, so resuming needs no scheduler
state beyond the step count. Used by `train.py`; tested in tests/test_train_units.py.
"""

import math

import torch
from torch import nn


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr: float) -> float:
    """Learning rate of optimizer step `step` (1-based).

    warmup:  lr * step / warmup_steps                               for step <= warmup_steps
    cosine:  min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2  after it, where
             progress = (step - warmup_steps) / (max_steps - warmup_steps), capped at 1
    """
    if step <= warmup_steps:
        return lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, fused: bool = True
) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices (projections, embeddings), none on vectors.

    Decaying RMSNorm gains or biases pulls them towards 0, which is not a prior anyone wants;
    matrices are what decoupled decay (Loshchilov & Hutter, arXiv 1711.05101) regularizes.
    fused=True: one kernel per parameter tensor on CUDA and on CPU, instead of ~8 passes over
    memory. Measured here on the 64M-parameter SmolLM2 student (2 busy cores, FSDP2 DTensor
    parameters): 11.2 s -> 2.0 s per step, results bitwise equal. fp16 runs pass fused=False:
    the fused kernel does not accept ShardedGradScaler's found-inf flag (a shape error on CPU).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
