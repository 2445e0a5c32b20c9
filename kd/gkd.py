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

import numpy as np
from torch import Tensor

from kd.data import Batches, Example, collate
from kd.model import Transformer
from kd.offpolicy import KDLoss
from kd.onpolicy import (
    COIN_KEY,
    Rollout,
    RolloutLog,
    Sampler,
    rollout_batch,
    with_global_count,
)


def on_policy(*, seed: int, step: int, micro_batch: int, lmbda: float) -> bool:
    """GKD's coin: is this micro-batch student-generated? Probability lmbda, the same on every
    rank."""
    return bool(np.random.default_rng((COIN_KEY, seed, step, micro_batch)).random() < lmbda)


def gkd_micro_batches(
    sampler: Sampler, micro_examples: list[list[Example]], *, step: int, lmbda: float, seq_kd: bool
) -> tuple[list[dict[str, Tensor]], list[Rollout]]:
    """This rank's micro-batches of one GKD step, and the rollouts behind the on-policy ones.

    Per micro-batch: with probability lmbda the student answers the prompts (the teacher
    decodes alongside to score them); else the data's responses, or with seq_kd the teacher's
    own samples. Each batch is in kd/data.py's `collate` layout.
    """
    batches, rollouts = [], []
    pad_id = sampler.config.pad_id
    for m, examples in enumerate(micro_examples):
        prompts = [e.prompt_ids for e in examples]
        if on_policy(seed=sampler.seed, step=step, micro_batch=m, lmbda=lmbda):
            r = sampler.sample(prompts, step=step, micro_batch=m, teacher_mix_alpha=0.0)
            rollouts.append(r)
        elif seq_kd:
            r = sampler.sample(
                prompts, step=step, micro_batch=m, teacher_mix_alpha=1.0, with_student=False
            )
        else:
            batches.append(collate(examples, pad_id=pad_id))
            continue
        batches.append(rollout_batch(r, pad_id=pad_id))
    return batches, rollouts


class GKD:
    """The method train.py runs for `method = "gkd"` (the members kd/offpolicy.py describes):
    the step's micro-batches from `gkd_micro_batches`, each scored by `kd` (any divergence)."""

    def __init__(
        self, data: Batches, sampler: Sampler, kd: KDLoss, *, lmbda: float, seq_kd: bool
    ) -> None:
        self.data, self.sampler, self.kd = data, sampler, kd
        self.lmbda, self.seq_kd = lmbda, seq_kd
        self.teachers = kd.teachers  # the loss's ([] for SFT on the samples)
        self.log = RolloutLog()

    def micro_batches(self, step: int) -> list[dict[str, Tensor]]:
        """Sample now where the coin says so; every rank decodes until all ranks' rows are
        done (the sampler's all_done), so FSDP's collectives line up."""
        with self.sampler.gathered():
            batches, rollouts = gkd_micro_batches(
                self.sampler,
                self.data.examples(step),
                step=step,
                lmbda=self.lmbda,
                seq_kd=self.seq_kd,
            )
        self.log.add(rollouts, micro_batches=len(batches))
        return with_global_count(batches)

    def loss(self, student: Transformer, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        return self.kd(student, batch)

    def log_fields(self) -> dict[str, float]:
        return self.log.fields()
