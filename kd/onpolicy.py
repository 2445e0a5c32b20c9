"""On-policy distillation's shared machinery: the student answers, the teacher scores.

Off-policy KD trains the student on text it never writes itself; when it generates, it drifts
into prefixes the teacher never showed it (exposure bias). On-policy methods sample responses
from the student now and train on them: GKD (kd/gkd.py, arXiv 2306.13649) and MiniLLM
(kd/minillm.py, arXiv 2306.08543). This file has what both use:
  * `rollout`: one response per prompt from the mixture alpha p + (1 - alpha) q (alpha 0 is
    the student alone; MiniLLM mixes the teacher in), with log q(y_t) and log p(y_t) of every
    sampled token: kd/sampling.py's `decode` with student and teacher in lockstep;
  * `rollout_batch`: the samples as a training batch in kd/data.py's layout;
  * `with_global_count`: the step's trained-token count, agreed over ranks;
  * `RolloutLog`: response length, sequence reverse KL, repetition and the on-policy share,
    the numbers that show reward hacking and degenerate loops first;
  * `load_prompt_examples`: the prompts an on-policy method samples answers to.

Distributed rollouts: under FSDP2 every forward is a collective, so every rank must call the
models equally often. `rollout` decodes until all rows are done *on every rank*: the caller
passes `all_done(local_done) -> global_done` (an all-reduce, kd/parallel.py), called at the
same steps on every rank; finished rows are fed padding. Sampling defaults to temperature 1,
no top-k or top-p: a biased sampler biases the gradient (MiniLLM's w_t corrects it, GKD's
loss does not).

Tests: `.venv/bin/python -m pytest -q tests/test_onpolicy.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kd import parallel
from kd.data import IGNORE, DataStats, Example, collate, load_examples, load_prompts, read_jsonl
from kd.model import Transformer
from kd.sampling import (
    decode,
    response_mask,
    sample_from_probs,
    sampling_probs,
    this_rank_only,
)
from kd.tokenizer import Tokenizer

COIN_KEY, SAMPLE_KEY = 3, 4  # RNG key kinds (kd/gkd.py's coin, sampling); kd/data.py uses 1, 2


@dataclass(frozen=True)
class RolloutConfig:
    max_new_tokens: int  # response tokens per prompt at most; 128 in TRL's GKD, 256 in MiniLLM
    eos_token_ids: frozenset[int]  # a row stops after sampling one of these (a response token)
    pad_id: int  # fed to finished rows and used to pad batches
    vocab_size: int  # logits rows both models share (teacher padding rows are sliced off)
    temperature: float = 1.0  # sampler temperature; 1 keeps the gradient unbiased
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off


@dataclass
class Rollout:
    """A batch of sampled responses; per-token tensors are (B, N), zero off response_mask."""

    prompts: list[list[int]]  # the B prompts, unpadded
    tokens: Tensor  # (B, N) sampled ids, pad after a row's EOS
    response_mask: Tensor  # (B, N) bool: True on sampled tokens up to and including EOS
    behaviour_logprobs: Tensor  # (B, N) log of the sampler's probability of y_t (the mixture)
    student_logprobs: Tensor | None  # (B, N) log q(y_t) at T = 1, at sampling time (q_old)
    teacher_logprobs: Tensor | None  # (B, N) log p(y_t) at temperature 1

    @property
    def lengths(self) -> Tensor:
        return self.response_mask.sum(-1)  # (B,)


# ----------------------------------------------------------------------------- sampling


def teacher_mixed_probs(
    student_probs: Tensor | None, teacher_probs: Tensor | None, alpha: float
) -> Tensor:
    """MiniLLM's sampler alpha p + (1 - alpha) q; alpha 0 is the student alone, 1 the teacher."""
    if alpha == 0.0:
        return student_probs
    if alpha == 1.0:
        return teacher_probs
    return alpha * teacher_probs + (1.0 - alpha) * student_probs


def _check_rollout(student, teacher, prompts: list[list[int]], config, alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"teacher_mix_alpha={alpha} is outside [0, 1]; MiniLLM uses 0.2, GKD 0")
    if (student is None and alpha < 1.0) or (teacher is None and alpha > 0.0):
        raise ValueError(
            f"teacher_mix_alpha={alpha} samples from a model that was not passed: "
            "alpha < 1 needs the student, alpha > 0 the teacher"
        )
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(
            "rollout needs at least one prompt and no empty prompts: check the data's prompts"
        )
    if config.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={config.max_new_tokens} must be >= 1")


@torch.no_grad()
def rollout(
    student: Transformer | None,
    teacher: Transformer | None,
    prompts: list[list[int]],
    config: RolloutConfig,
    *,
    teacher_mix_alpha: float = 0.0,
    seed: int | None = None,
    all_done: Callable[[bool], bool] = this_rank_only,
    cache_dtype: torch.dtype | None = None,
) -> Rollout:
    """Sample one response per prompt from teacher_mix_alpha p + (1 - teacher_mix_alpha) q.

    Student and teacher decode in lockstep, each with its own KV cache (kd/sampling.py's
    `decode`), one token per step for every row. A model that is passed but not needed by the
    sampler (the teacher at alpha 0) still decodes, to score the samples: log p(y_t) feeds
    MiniLLM's reward and the reverse-KL estimate.
    student None: teacher-only sampling (alpha must be 1, GKD's seq_kd); teacher None: alpha 0.
    seed: seeds this call's sampling generator (give each rank its own); None = global RNG.
    all_done: maps this rank's "every row finished" to "every rank finished" (an all-reduce
        under torch.distributed), called at the same steps on every rank (see `decode`).
    cache_dtype: KV-cache dtype, default the embedding's (pass bf16 for fp32 master weights).
    """
    alpha = teacher_mix_alpha
    _check_rollout(student, teacher, prompts, config, alpha)
    roles = {role: m for role, m in (("student", student), ("teacher", teacher)) if m is not None}
    sampled = {"student": alpha < 1.0, "teacher": alpha > 0.0}  # which models the sampler mixes
    device = next(iter(roles.values())).head_weight.device
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    logged: dict[str, list[Tensor]] = {"behaviour": [], **{role: [] for role in roles}}

    def next_token(logits: list[Tensor]) -> Tensor:
        by_role = {role: z[:, : config.vocab_size] for role, z in zip(roles, logits)}  # (B, V)
        probs = {
            role: sampling_probs(
                z, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p
            )
            for role, z in by_role.items()
            if sampled[role]
        }
        mix = teacher_mixed_probs(probs.get("student"), probs.get("teacher"), alpha)  # (B, V)
        ids = sample_from_probs(mix, generator=generator)  # (B,)
        logged["behaviour"].append(mix.gather(-1, ids[:, None]).squeeze(-1).log())
        for role, z in by_role.items():  # log q(y_t), log p(y_t) of the plain (T = 1) models
            logged[role].append(z.float().log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1))
        return ids

    tokens = decode(
        list(roles.values()),
        prompts,
        steps=config.max_new_tokens,
        next_token=next_token,
        eos_token_ids=config.eos_token_ids,
        pad_id=config.pad_id,
        all_done=all_done,
        cache_dtype=cache_dtype,
    )  # (B, n)
    mask = response_mask(tokens, config.eos_token_ids)
    # Finished rows were sampled too (then fed padding): their values are zeroed here.
    values = {k: torch.where(mask, torch.stack(v, dim=1), 0.0) for k, v in logged.items()}
    return Rollout(
        prompts=[list(p) for p in prompts],
        tokens=tokens,
        response_mask=mask,
        behaviour_logprobs=values["behaviour"],
        student_logprobs=values.get("student"),
        teacher_logprobs=values.get("teacher"),
    )


@dataclass
class Sampler:
    """What every rollout of a run shares: both models, the sampler settings, the seeds and
    how ranks agree. `sample` draws one micro-batch's responses; `gathered()` keeps the FSDP
    weights all-gathered around a step's rollouts when `gather` is set (once per rollout,
    instead of once per token, at the cost of one whole copy of each model per rank)."""

    student: Transformer
    teacher: Transformer
    config: RolloutConfig
    seed: int = 0  # with (step, micro-batch, rank): the sampling seed of each rollout
    rank: int = 0
    all_done: Callable[[bool], bool] = this_rank_only  # parallel.all_ranks under torchrun
    cache_dtype: torch.dtype | None = None  # KV cache; the compute dtype for fp32 masters
    gather: bool = False

    def sample(
        self,
        prompts: list[list[int]],
        *,
        step: int,
        micro_batch: int,
        teacher_mix_alpha: float,
        with_student: bool = True,
    ) -> Rollout:
        """`rollout` of the prompts, seeded by (seed, step, micro-batch, rank); with_student
        False: the teacher samples and scores alone (teacher_mix_alpha 1)."""
        seed = sample_seed(seed=self.seed, step=step, micro_batch=micro_batch, rank=self.rank)
        return rollout(
            self.student if with_student else None,
            self.teacher,
            prompts,
            self.config,
            teacher_mix_alpha=teacher_mix_alpha,
            seed=seed,
            all_done=self.all_done,
            cache_dtype=self.cache_dtype,
        )

    def gathered(self) -> contextlib.AbstractContextManager:
        return parallel.gathered(*((self.student, self.teacher) if self.gather else ()))


# ----------------------------------------------------------------------------- rollouts as batches


def rollout_batch(r: Rollout, *, pad_id: int) -> dict[str, Tensor]:
    """Right-padded training batch of prompt + response, labels on the response only (kd/data.py's
    `collate` layout: labels already shifted, IGNORE elsewhere), on the rollout's device.

    Right padding needs no attention mask, so `train.py`'s `forward_loss` trains on it as on
    any data batch: this is GKD's on-policy batch.
    """
    lengths = r.lengths.tolist()  # host sync, once per rollout
    examples = []
    for prompt, row, n in zip(r.prompts, r.tokens.tolist(), lengths):
        ids = prompt + row[:n]
        labels = [IGNORE] * (len(prompt) - 1) + row[:n] + [IGNORE]
        examples.append(Example(ids, labels, prompt, n))
    return {k: v.to(r.tokens.device) for k, v in collate(examples, pad_id=pad_id).items()}


def align(r: Rollout, values: Tensor, width: int) -> Tensor:
    """Per-token values (B, N) moved to the label positions of `rollout_batch`: (B, width).

    Response token j of row b is the label at column len(prompt_b) - 1 + j.
    """
    B, N = values.shape
    plen = torch.tensor([len(p) for p in r.prompts], device=values.device)
    cols = plen[:, None] - 1 + torch.arange(N, device=values.device)[None]  # (B, N)
    wide = torch.zeros(B, int(plen.max()) + N, dtype=values.dtype, device=values.device)
    # Masked tokens sit past their row's last label, so they can only write zeros to unused columns.
    wide.scatter_(1, cols, torch.where(r.response_mask, values, 0))
    return wide[:, :width]


def sample_seed(*, seed: int, step: int, micro_batch: int, rank: int) -> int:
    """A sampling seed per (step, micro-batch, rank): reproducible, different on each rank."""
    return int(np.random.default_rng((SAMPLE_KEY, seed, step, micro_batch, rank)).integers(2**62))


def with_global_count(batches: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """The batches without their example index, each with `num_tokens`: the trained tokens of
    this step's batches on all ranks. One CPU all-reduce: the responses are sampled now, so no
    rank knows the others' lengths."""
    local = sum(float((b["labels"] != IGNORE).sum()) for b in batches)
    num_tokens = torch.tensor(parallel.agree([local])[0])
    return [
        {**{k: v for k, v in b.items() if k != "index"}, "num_tokens": num_tokens} for b in batches
    ]


# ----------------------------------------------------------------------------- logging


def repeated_ngrams(tokens: list[int], n: int = 4) -> tuple[int, int]:
    """(n-grams that already occurred earlier in the sequence, all n-grams): degenerate loops
    and reward hacking show up here before anywhere else."""
    seen, repeats = set(), 0
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        repeats += gram in seen
        seen.add(gram)
    return repeats, max(len(tokens) - n + 1, 0)


def rollout_sums(rollouts: list[Rollout], *, micro_batches: int) -> list[float]:
    """[sequences, response tokens, sum of sequence reverse-KL estimates, repeated 4-grams, 4-grams,
    rollouts (on-policy micro-batches), micro_batches] of one step's rollouts.

    Sums, so that train.py adds them over steps and ranks (one CPU all-reduce) before
    dividing (`rollout_metrics`). The estimate of KL_seq(q || p) of one sequence is
    sum_t log q(y_t) - log p(y_t): unbiased on student samples (alpha 0, temperature 1), lower
    than the truth on teacher-mixed ones.
    """
    sums = [0.0] * 5
    for r in rollouts:
        sums[0] += len(r.prompts)
        sums[1] += float(r.response_mask.sum())  # host sync
        if r.student_logprobs is not None and r.teacher_logprobs is not None:
            sums[2] += float((r.student_logprobs - r.teacher_logprobs).sum())  # host sync
        for row, n in zip(r.tokens.tolist(), r.lengths.tolist()):
            repeats, grams = repeated_ngrams(row[:n])
            sums[3] += repeats
            sums[4] += grams
    return sums + [len(rollouts), micro_batches]


def rollout_metrics(sums: list[float]) -> dict[str, float]:
    """Log values from summed `rollout_sums`; NaN-free when a step had no rollout."""
    sequences = max(sums[0], 1.0)
    return {
        "response_length": sums[1] / sequences,
        "seq_reverse_kl": sums[2] / sequences,
        "repetition": sums[3] / max(sums[4], 1.0),
        "on_policy_fraction": sums[5] / max(sums[6], 1.0),
    }


class RolloutLog:
    """`rollout_sums` of the steps since the last log record, added up here, then over ranks
    in `fields` (one CPU all-reduce, on log steps only)."""

    def __init__(self) -> None:
        self.sums = [0.0] * 7

    def add(self, rollouts: list[Rollout], *, micro_batches: int) -> None:
        step = rollout_sums(rollouts, micro_batches=micro_batches)
        self.sums = [a + b for a, b in zip(self.sums, step)]

    def fields(self) -> dict[str, float]:
        """The log record's rollout numbers over all ranks; starts the next sums."""
        sums, self.sums = parallel.agree(self.sums), [0.0] * 7
        return rollout_metrics(sums)


# ----------------------------------------------------------------------------- data and checks


def load_prompt_examples(
    path: str | Path,
    tokenizer: Tokenizer,
    *,
    method: str,
    seq_len: int,
    max_new_tokens: int,
    needs_responses: bool,
) -> tuple[list[Example], DataStats]:
    """Training data of an on-policy method: every record must carry a prompt.

    needs_responses (GKD with lmbda < 1 and no seq_kd): `load_examples`, prompts and data
    responses. Otherwise prompts alone suffice (`load_prompts`; a "response" is ignored) and
    come back as Examples with no trained token; prompts over seq_len - max_new_tokens are
    dropped, so a prompt plus its response fits seq_len.
    """
    for where, record in read_jsonl(path):
        if "prompt" not in record and "messages" not in record:
            raise ValueError(
                f"{where}: method={method} samples responses to prompts, but this record has none; "
                'use {"prompt": ...} or {"messages": ...} records (plain text goes in lm_data)'
            )
        if needs_responses and "prompt" in record and "response" not in record:
            raise ValueError(
                f'{where}: no "response", but with lmbda < 1 and seq_kd = false '
                f"method={method} also trains on the data's responses; set lmbda = 1, or "
                "seq_kd = true, or add responses"
            )
    if needs_responses:
        return load_examples(path, tokenizer, seq_len=seq_len)
    if seq_len - max_new_tokens < 1:
        raise ValueError(
            f"seq_len={seq_len} leaves no room for a prompt beside "
            f"max_new_tokens={max_new_tokens}; raise seq_len or lower max_new_tokens"
        )
    prompts, stats = load_prompts(path, tokenizer, max_len=seq_len - max_new_tokens)
    return [Example(p.ids, [IGNORE] * len(p.ids), p.ids, 0) for p in prompts], stats
