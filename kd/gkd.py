"""GKD: generalized knowledge distillation on the student's own answers (arXiv 2306.13649).

Off-policy KD trains the student on text it never writes itself; when it generates, it drifts
into prefixes the teacher never showed it (exposure bias). GKD (Agarwal et al.) mixes in the
student's own samples: with probability `lmbda` a micro-batch's responses are sampled from
the student now (kd/onpolicy.py's rollout), else they are the data's (or, with `seq_kd`, the
teacher's own samples: sequence-level KD, Kim & Rush, arXiv 1606.07947). The loss is any
divergence of kd/losses.py (GKD's default: JSD, beta 0.5) on the response tokens, with no
gradient through sampling: kd/offpolicy.py's `kd_loss` on the sampled batch,

    (1 - lmbda) E_{y ~ data}[D] + lmbda E_{y ~ q}[D].

The coin is a pure function of (seed, step, micro-batch), the same on every rank, so either
all ranks roll out or none does (FSDP's collectives line up); sampling is seeded by (seed,
step, micro-batch, rank), so a resumed run samples what an uninterrupted one did.

How to run: `method = "gkd"` in a train.py config (configs/gkd_cpu.toml, docs/onpolicy.md).
Tests: `.venv/bin/python -m pytest -q tests/test_onpolicy.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from kd import parallel
from kd.data import Batches, Example, collate
from kd.losses import LossOptions
from kd.model import Transformer
from kd.offpolicy import kd_loss
from kd.onpolicy import (
    COIN_KEY,
    Rollout,
    RolloutConfig,
    RolloutLog,
    rollout,
    rollout_batch,
    sample_seed,
    with_global_count,
)
from kd.sampling import this_rank_only


def on_policy(*, seed: int, step: int, micro_batch: int, lmbda: float) -> bool:
    """GKD's coin: is this micro-batch student-generated? Probability lmbda, the same on every
    rank."""
    return bool(np.random.default_rng((COIN_KEY, seed, step, micro_batch)).random() < lmbda)


def gkd_micro_batches(
    student: Transformer,
    teacher: Transformer,
    micro_examples: list[list[Example]],
    config: RolloutConfig,
    *,
    step: int,
    seed: int,
    rank: int,
    lmbda: float,
    seq_kd: bool,
    all_done: Callable[[bool], bool] = this_rank_only,
    cache_dtype: torch.dtype | None = None,
) -> tuple[list[dict[str, Tensor]], list[Rollout]]:
    """This rank's micro-batches of one GKD step, and the rollouts behind the on-policy ones.

    Per micro-batch: with probability lmbda the student answers the prompts (the teacher
    decodes alongside to score them); else the data's responses, or with seq_kd the teacher's
    own samples. Each batch is in kd/data.py's `collate` layout.
    """
    batches, rollouts = [], []
    for m, examples in enumerate(micro_examples):
        prompts = [e.prompt_ids for e in examples]
        seeded = dict(
            seed=sample_seed(seed=seed, step=step, micro_batch=m, rank=rank),
            all_done=all_done,
            cache_dtype=cache_dtype,
        )
        if on_policy(seed=seed, step=step, micro_batch=m, lmbda=lmbda):
            r = rollout(student, teacher, prompts, config, teacher_mix_alpha=0.0, **seeded)
            rollouts.append(r)
        elif seq_kd:
            r = rollout(None, teacher, prompts, config, teacher_mix_alpha=1.0, **seeded)
        else:
            batches.append(collate(examples, pad_id=config.pad_id))
            continue
        batches.append(rollout_batch(r, pad_id=config.pad_id))
    return batches, rollouts


class GKD:
    """The method train.py runs for `method = "gkd"` (the four members of kd/offpolicy.py's)."""

    def __init__(
        self,
        data: Batches,
        *,
        student: Transformer,
        teacher: Transformer,
        teachers: list[Transformer],
        rollout: RolloutConfig,
        lmbda: float,
        seq_kd: bool,
        seed: int,
        rank: int,
        gathered: bool,
        cache_dtype: torch.dtype | None,
        options: LossOptions,
        vocab: int,
        chunk_size: int,
    ) -> None:
        # teacher scores the samples; teachers are the loss's ([] for SFT on the samples)
        self.data, self.student, self.teacher, self.teachers = data, student, teacher, teachers
        self.rollout, self.lmbda, self.seq_kd = rollout, lmbda, seq_kd
        self.seed, self.rank, self.gathered, self.cache_dtype = seed, rank, gathered, cache_dtype
        self.options, self.vocab, self.chunk_size = options, vocab, chunk_size
        self.log = RolloutLog()

    def micro_batches(self, step: int) -> list[dict[str, Tensor]]:
        """Sample now where the coin says so. Every rank decodes until all ranks' rows are
        done (parallel.all_ranks), so FSDP's collectives line up; `gathered` keeps the weights
        all-gathered for the whole rollout instead of once per token."""
        models = (self.student, self.teacher) if self.gathered else ()
        with parallel.gathered(*models):
            batches, rollouts = gkd_micro_batches(
                self.student,
                self.teacher,
                self.data.examples(step),
                self.rollout,
                step=step,
                seed=self.seed,
                rank=self.rank,
                lmbda=self.lmbda,
                seq_kd=self.seq_kd,
                all_done=parallel.all_ranks,
                cache_dtype=self.cache_dtype,
            )
        self.log.add(rollouts, micro_batches=len(batches))
        return with_global_count(batches)

    def loss(self, student: Transformer, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        return kd_loss(
            student,
            batch,
            teachers=self.teachers,
            options=self.options,
            vocab=self.vocab,
            chunk_size=self.chunk_size,
        )

    def log_fields(self) -> dict[str, float]:
        return self.log.fields()
