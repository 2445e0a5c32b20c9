"""On-policy distillation: the student learns on its own samples. GKD and MiniLLM, one rollout.

Off-policy KD trains the student on text it never writes itself; when it generates, it drifts
into prefixes the teacher never showed it (exposure bias). Both methods here sample responses
from the student (our own KV-cached decoder, `rollout`) and train on them:

* GKD (Agarwal et al., arXiv 2306.13649): with probability `lmbda` a micro-batch is
  student-generated, else it comes from the data (`seq_kd`: teacher-generated); the loss is
  any divergence of kd/losses.py (default JSD, beta 0.5) on the response tokens, with no
  gradient through sampling, so `train.py`'s ordinary `forward_loss` trains on it.
* MiniLLM (Gu et al., arXiv 2306.08543): policy gradient on the sequence-level reverse KL
  KL(q || p) = E_{y~q} sum_t log q(y_t|y<t) - log p(y_t|y<t). Per-token reward
  r_t = log p(y_t) - log q(y_t), return R_t = sum_{t'>=t} r_t', and the three stabilizers:
    1. single-step decomposition: the exact full-vocabulary token-level KL(q_t || p_t) is its
       own loss term (kd/losses.py reverse_kl, chunked), beside the sampled long-term term;
    2. teacher-mixed sampling: y_t ~ alpha p + (1 - alpha) q (alpha 0.2), corrected by the
       per-token importance weight w_t = q(y_t) / (alpha p(y_t) + (1 - alpha) q(y_t));
    3. length normalization: R_t divided by the number of tokens from t to the end.
  The long-term term is PPO's clipped surrogate (clip 0.2) with ratio w_t q_theta / q_old,
  on whitened returns. An optional language-modelling loss on pretraining text is `train.py`'s
  own `forward_loss` on a second data source (MiniLLM's "pt loss", with its optional KD part).

Where we follow the reference code (LMOps/minillm) rather than the paper's equations: the
policy-gradient return keeps r_t (the paper's long-term term starts at R_{t+1}); advantages
are whitened (mean 0, variance 1 over the batch's response tokens on all ranks; the reference
also counts padding, we do not); w_t is detached and enters the PPO ratio, so the clip bounds
w_t * ratio; the single-step term is unweighted (the authors found w_t there unstable,
LMOps issue #255). The reference makes 4 PPO passes over each set of rollouts; here each
rollout feeds one gradient step, so rho = w_t q_theta / q_old = w_t there and the clip acts on
w_t. One difference on purpose: the EOS token is a response token (trained and rewarded):
with pad = eos the reference masks it and the student cannot learn when to stop.

Distributed rollouts: under FSDP2 every forward is a collective, so every rank must call the
models equally often. `rollout` decodes until all rows are done *on every rank*: the caller
passes `all_done(local_done) -> global_done` (an all-reduce, kd/parallel.py), called at the
same steps on every rank; finished rows are fed padding. This file itself never touches
torch.distributed. GKD's coin flip is a pure function of (seed, step, micro-batch), the same
on every rank, so either all ranks roll out or none does. Sampling defaults to temperature 1,
no top-k or top-p: a biased sampler biases the gradient (MiniLLM's w_t corrects it, GKD does not).

Tests: `.venv/bin/python -m pytest -q tests/test_onpolicy.py`. How to run: `method = "gkd"`
or `"minillm"` in a train.py config (configs/gkd_cpu.toml, configs/minillm_cpu.toml).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kd.chunked_loss import chunked_distillation_loss
from kd.data import IGNORE, DataStats, Example, collate, load_examples, load_prompts, read_jsonl
from kd.losses import LossOptions, token_count
from kd.model import Transformer
from kd.sampling import last_logits, sample_from_probs, sampling_probs
from kd.tokenizer import Tokenizer

Tensor = torch.Tensor
_COIN_KEY, _SAMPLE_KEY = 3, 4  # RNG key kinds; kd/data.py uses 1 and 2


def this_rank_only(done: bool) -> bool:
    """`all_done` for a single process: done when this rank is done."""
    return done


@dataclass(frozen=True)
class RolloutConfig:
    max_new_tokens: int  # response tokens per prompt at most; 128 in TRL's GKD, 256 in MiniLLM
    eos_token_ids: frozenset[
        int
    ]  # a row stops after sampling one of these (kept as a response token)
    pad_id: int  # fed to finished rows and used to pad batches
    vocab_size: int  # logits rows both models share (teacher padding rows are sliced off)
    temperature: float = 1.0  # sampler temperature; 1 keeps the gradient unbiased
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off


@dataclass
class Rollout:
    """A batch of sampled responses; per-token tensors are (B, N), zero where response_mask is False."""

    prompts: list[list[int]]  # the B prompts, unpadded
    tokens: Tensor  # (B, N) sampled ids, pad after a row's EOS
    response_mask: Tensor  # (B, N) bool: True on sampled tokens up to and including EOS
    behaviour_logprobs: Tensor  # (B, N) log of the sampler's probability of y_t (the mixture)
    student_logprobs: Tensor | None  # (B, N) log q(y_t) at temperature 1, at sampling time (q_old)
    teacher_logprobs: Tensor | None  # (B, N) log p(y_t) at temperature 1

    @property
    def lengths(self) -> Tensor:
        return self.response_mask.sum(-1)  # (B,)


# ----------------------------------------------------------------------------- sampling


def teacher_mixed_probs(
    student_probs: Tensor | None, teacher_probs: Tensor | None, alpha: float
) -> Tensor:
    """MiniLLM's sampler alpha p + (1 - alpha) q; alpha 0 is the student alone, 1 the teacher alone."""
    if alpha == 0.0:
        return student_probs
    if alpha == 1.0:
        return teacher_probs
    return alpha * teacher_probs + (1.0 - alpha) * student_probs


def importance_weights(student_logprobs: Tensor, behaviour_logprobs: Tensor) -> Tensor:
    """w_t = q(y_t) / mix(y_t): reweights tokens drawn from the mixture to the student's own law.
    Per token, as MiniLLM does: a sequence's exact weight, the product over t, grows in variance
    with the length."""
    return (student_logprobs - behaviour_logprobs).exp()


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

    Student and teacher each prefill the left-padded prompts and then decode in lockstep with
    their own KV cache (conventions in kd/model.py), one token per step for every row. A
    model that is passed but not needed by the sampler (the teacher at alpha 0) still decodes,
    to score the samples: log p(y_t) feeds MiniLLM's reward and the reverse-KL estimate.
    student None: teacher-only sampling (alpha must be 1, GKD's seq_kd); teacher None: alpha 0.
    seed: seeds this call's sampling generator (give each rank its own); None = global RNG.
    all_done: maps this rank's "every row finished" to "every rank finished" (an all-reduce
        under torch.distributed); it is called at the same steps on every rank, and decoding
        stops only when it says True, so all ranks make the same number of forward calls.
    cache_dtype: KV-cache dtype, default the embedding's (pass bf16 for fp32 master weights).
    """
    alpha = teacher_mix_alpha
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
    roles = {role: m for role, m in (("student", student), ("teacher", teacher)) if m is not None}
    models = list(roles.values())
    sampled = {"student": alpha < 1.0, "teacher": alpha > 0.0}  # which models the sampler mixes
    device = models[0].model.embed_tokens.weight.device
    B, P, N, V = (
        len(prompts),
        max(len(p) for p in prompts),
        config.max_new_tokens,
        config.vocab_size,
    )
    S = P + N - 1  # decode step i writes token i at slot P + i; the last token is never fed back

    # Left padding: row b holds its prompt in slots P - len(b) .. P - 1; True = real slot.
    tokens = torch.full((B, P), config.pad_id, dtype=torch.long)
    mask = torch.ones(B, S, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, : P - len(p)] = False
    tokens, mask = tokens.to(device), mask.to(device)
    eos = torch.tensor(sorted(config.eos_token_ids), dtype=torch.long, device=device)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    # The done check reads a value back (a host-device sync), then maybe all-reduces: on an
    # accelerator only every 8 steps. The schedule depends on the step only: same on all ranks.
    check_every = 1 if device.type == "cpu" else 8

    out = {k: torch.zeros(B, N, device=device) for k in ("behaviour", "student", "teacher")}
    out_ids = torch.full((B, N), config.pad_id, dtype=torch.long, device=device)
    active = torch.zeros(B, N, dtype=torch.bool, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for m in models:
        m.setup_cache(B, S, dtype=cache_dtype, device=device)
    try:
        logits = [
            m(
                tokens,
                input_pos=torch.arange(P, device=device),
                attention_mask=mask,
                output_fn=last_logits,
            )[:, :V]
            for m in models
        ]  # (B, V) each
        pos = torch.tensor([P], device=device)  # the slot the next decode step writes
        for i in range(N):
            by_role = dict(zip(roles, logits))
            probs = {
                role: sampling_probs(
                    z, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p
                )
                for role, z in by_role.items()
                if sampled[role]
            }
            mix = teacher_mixed_probs(probs.get("student"), probs.get("teacher"), alpha)  # (B, V)
            next_ids = sample_from_probs(mix, generator=generator).masked_fill(
                done, config.pad_id
            )  # (B,)
            out_ids[:, i], active[:, i] = next_ids, ~done
            out["behaviour"][:, i] = mix.gather(-1, next_ids[:, None]).squeeze(-1).log()
            for role, z in by_role.items():  # log q(y_t), log p(y_t) of the plain (T = 1) models
                out[role][:, i] = (
                    z.float().log_softmax(-1).gather(-1, next_ids[:, None]).squeeze(-1)
                )
            done |= torch.isin(next_ids, eos)
            if i + 1 == N or (
                (i + 1) % check_every == 0 and all_done(bool(done.all()))
            ):  # host sync
                break
            logits = [
                m(next_ids[:, None], input_pos=pos, attention_mask=mask)[:, -1, :V] for m in models
            ]
            pos += 1
    finally:
        for m in models:
            m.clear_cache()

    n = i + 1
    zeroed = {k: torch.where(active[:, :n], v[:, :n], 0.0) for k, v in out.items()}
    return Rollout(
        prompts=[list(p) for p in prompts],
        tokens=out_ids[:, :n],
        response_mask=active[:, :n],
        behaviour_logprobs=zeroed["behaviour"],
        student_logprobs=zeroed["student"] if student is not None else None,
        teacher_logprobs=zeroed["teacher"] if teacher is not None else None,
    )


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
    """A sampling seed per (step, micro-batch, rank): reproducible, and different on each rank."""
    return int(np.random.default_rng((_SAMPLE_KEY, seed, step, micro_batch, rank)).integers(2**62))


# ----------------------------------------------------------------------------- MiniLLM pieces


def returns(rewards: Tensor, mask: Tensor, *, length_norm: bool) -> Tensor:
    """R_t = sum_{t' >= t} r_t' over the response (gamma = 1, as MiniLLM); with length_norm
    divided by the number of response tokens from t to the end (LMOps `lens`). (B, N), 0 off-mask.

    Without it a long response sums more rewards and the policy drifts in length: in MiniLLM's
    ablation (GPT-2 1.5B -> 120M, Dolly) Rouge-L falls from 24.6 to 14.7.
    """
    r = torch.where(mask, rewards, 0.0)
    R = r.flip(-1).cumsum(-1).flip(-1)  # reverse cumulative sum
    if length_norm:
        remaining = mask.float().flip(-1).cumsum(-1).flip(-1).clamp(min=1.0)
        R = R / remaining
    return torch.where(mask, R, 0.0)


def whiten(
    x: Tensor, mask: Tensor, *, all_reduce_sum: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries of every rank (biased variance).

    One all-reduce of (sum x, sum x^2, count) in float64, where the one-pass variance
    E[x^2] - E[x]^2 loses nothing for returns of size ~1-100. 0 off-mask.
    """
    xd = torch.where(mask, x, 0.0).double()
    stats = torch.stack([xd.sum(), xd.pow(2).sum(), mask.sum().double()])
    if all_reduce_sum is not None:
        stats = all_reduce_sum(stats)
    n = stats[2].clamp(min=1.0)
    mean = stats[0] / n
    var = (stats[1] / n - mean**2).clamp(min=0.0)
    return torch.where(mask, ((xd - mean) * torch.rsqrt(var + 1e-8)).to(x.dtype), 0.0)


def ppo_clipped_sum(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    weights: Tensor,
    mask: Tensor,
    *,
    clip: float,
) -> Tensor:
    """sum_t max(-A_t rho_t, -A_t clip(rho_t, 1 - c, 1 + c)), rho_t = w_t q_theta(y_t) / q_old(y_t).

    PPO (arXiv 1707.06347): the max of the two losses is the pessimistic bound, so moving rho
    past 1 +- c earns nothing. A sum over masked tokens; the caller divides by the global count.
    """
    ratio = (logprobs - old_logprobs).exp() * weights
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip))
    return torch.where(mask, loss, 0.0).sum()


def token_logprobs(
    hidden: Tensor, head_weight: Tensor, labels: Tensor, *, chunk_size: int
) -> Tensor:
    """log q(labels) = log_softmax(hidden @ W^T)[labels] in fp32, (B, T), 0 where IGNORE.

    Chunks of tokens under activation checkpointing: only one (chunk x V) block of logits
    exists at a time, forward and backward (it is recomputed in backward).
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    flat_y = labels.reshape(-1)
    valid = flat_y != IGNORE
    targets = flat_y.masked_fill(~valid, 0)

    def chunk(h: Tensor, w: Tensor, y: Tensor) -> Tensor:
        return F.linear(h, w).float().log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)  # (n,)

    parts = [
        checkpoint(
            chunk,
            flat_h[s : s + chunk_size],
            head_weight,
            targets[s : s + chunk_size],
            use_reentrant=False,
        )
        for s in range(0, flat_h.shape[0], chunk_size)
    ]
    return torch.where(valid, torch.cat(parts), 0.0).reshape(labels.shape)


def minillm_batch(
    r: Rollout,
    *,
    pad_id: int,
    length_norm: bool = True,
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """`rollout_batch` plus, at the label positions, q_old(y_t), w_t and the whitened advantages.

    r_t = log p(y_t) - log q_old(y_t); R_t by `returns`; advantages whitened over this
    micro-batch's response tokens on all ranks (`all_reduce_sum`, as LMOps' `whiten`).
    """
    if r.student_logprobs is None or r.teacher_logprobs is None:
        raise ValueError(
            "minillm_batch needs a rollout scored by both models: pass student and teacher to rollout"
        )
    batch = rollout_batch(r, pad_id=pad_id)
    width = batch["input_ids"].shape[1]
    R = returns(r.teacher_logprobs - r.student_logprobs, r.response_mask, length_norm=length_norm)
    batch["advantages"] = align(r, whiten(R, r.response_mask, all_reduce_sum=all_reduce_sum), width)
    batch["old_logprobs"] = align(r, r.student_logprobs, width)
    batch["weights"] = align(r, importance_weights(r.student_logprobs, r.behaviour_logprobs), width)
    return batch


def minillm_loss(
    student: Transformer,
    teacher: Transformer,
    batch: dict[str, Tensor],
    *,
    num_tokens: int | Tensor | None,
    vocab: int,
    clip: float = 0.2,
    chunk_size: int = 1024,
) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's MiniLLM loss: (PPO long-term sum + single-step KL sum) / num_tokens.

    single-step: sum_t KL(q_theta(.|y<t) || p(.|y<t)) over the full vocabulary at every
    response position (`chunked_distillation_loss`, divergence reverse_kl, alpha 1).
    num_tokens: response tokens over all micro-batches and ranks (None: this batch's).
    metrics (detached): 'divergence' = mean token reverse KL, 'ce' = mean -log q(y_t)
    (the student's surprise at its samples), 'pg_loss' (already / num_tokens), 'valid_tokens'.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    valid = labels != IGNORE
    _, denom = token_count(labels, num_tokens, ignore_index=IGNORE)
    with torch.no_grad():
        t_hidden = teacher(input_ids, output_fn=lambda h, w: h)  # (B, T, H_t)

    def loss_fn(hidden: Tensor, head_weight: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # Inside the student's forward: FSDP2 has the root's head weight gathered here.
        head = head_weight[:vocab]
        single, metrics = chunked_distillation_loss(
            hidden,
            head,
            t_hidden,
            teacher.head_weight,
            labels,
            LossOptions(divergence="reverse_kl", alpha=1.0, tokenizer_vocab_size=vocab),
            chunk_size=chunk_size,
            num_tokens=denom,
        )
        logprobs = token_logprobs(hidden, head, labels, chunk_size=chunk_size)
        pg = (
            ppo_clipped_sum(
                logprobs,
                batch["old_logprobs"],
                batch["advantages"],
                batch["weights"],
                valid,
                clip=clip,
            )
            / denom
        )
        return pg + single, {**metrics, "pg_loss": pg.detach()}

    return student(input_ids, output_fn=loss_fn)


def minillm_micro_batches(
    student: Transformer,
    teacher: Transformer,
    micro_examples: list[list[Example]],
    config: RolloutConfig,
    *,
    step: int,
    seed: int,
    rank: int,
    teacher_mix_alpha: float = 0.2,
    length_norm: bool = True,
    all_done: Callable[[bool], bool] = this_rank_only,
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
    cache_dtype: torch.dtype | None = None,
) -> tuple[list[dict[str, Tensor]], list[Rollout]]:
    """This rank's micro-batches of one MiniLLM step (`minillm_batch` of a teacher-mixed rollout
    of each micro-batch's prompts), and the rollouts."""
    rollouts = [
        rollout(
            student,
            teacher,
            [e.prompt_ids for e in examples],
            config,
            teacher_mix_alpha=teacher_mix_alpha,
            seed=sample_seed(seed=seed, step=step, micro_batch=m, rank=rank),
            all_done=all_done,
            cache_dtype=cache_dtype,
        )
        for m, examples in enumerate(micro_examples)
    ]
    batches = [
        minillm_batch(
            r, pad_id=config.pad_id, length_norm=length_norm, all_reduce_sum=all_reduce_sum
        )
        for r in rollouts
    ]
    return batches, rollouts


# ----------------------------------------------------------------------------- GKD


def on_policy(*, seed: int, step: int, micro_batch: int, lmbda: float) -> bool:
    """GKD's coin: is this micro-batch student-generated? Probability lmbda, the same on every rank."""
    return bool(np.random.default_rng((_COIN_KEY, seed, step, micro_batch)).random() < lmbda)


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
    own samples (sequence-level KD, Kim & Rush 2016). Each batch is in `collate`'s layout.
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


def step_micro_batches(
    method: str,
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
    teacher_mix_alpha: float,
    length_norm: bool,
    all_done: Callable[[bool], bool] = this_rank_only,
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
    cache_dtype: torch.dtype | None = None,
) -> tuple[list[dict[str, Tensor]], list[float]]:
    """train.py's step of `method` (gkd or minillm): this rank's micro-batches, and the step's
    `rollout_sums`, which train.py adds up over steps and ranks for the log."""
    common = dict(step=step, seed=seed, rank=rank, all_done=all_done, cache_dtype=cache_dtype)
    if method == "gkd":
        batches, rollouts = gkd_micro_batches(
            student, teacher, micro_examples, config, lmbda=lmbda, seq_kd=seq_kd, **common
        )
    else:
        batches, rollouts = minillm_micro_batches(
            student,
            teacher,
            micro_examples,
            config,
            teacher_mix_alpha=teacher_mix_alpha,
            length_norm=length_norm,
            all_reduce_sum=all_reduce_sum,
            **common,
        )
    return batches, rollout_sums(rollouts, micro_batches=len(batches))


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
                f'{where}: no "response", but with lmbda < 1 and seq_kd = false method={method} also '
                "trains on the data's responses; set lmbda = 1, or seq_kd = true, or add responses"
            )
    if needs_responses:
        return load_examples(path, tokenizer, seq_len=seq_len)
    if seq_len - max_new_tokens < 1:
        raise ValueError(
            f"seq_len={seq_len} leaves no room for a prompt beside max_new_tokens={max_new_tokens}; "
            "raise seq_len or lower max_new_tokens"
        )
    prompts, stats = load_prompts(path, tokenizer, max_len=seq_len - max_new_tokens)
    return [Example(p.ids, [IGNORE] * len(p.ids), p.ids, 0) for p in prompts], stats
