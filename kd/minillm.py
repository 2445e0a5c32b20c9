"""MiniLLM: distillation by policy gradient on the sequence-level reverse KL (arXiv 2306.08543).

The student q samples answers (kd/onpolicy.py's rollout) and is trained to lower
KL(q || p) = E_{y~q} sum_t log q(y_t|y<t) - log p(y_t|y<t), the mode-seeking direction, by
policy gradient (Gu et al.). Per-token reward r_t = log p(y_t) - log q(y_t), return
R_t = sum_{t'>=t} r_t', and the paper's three stabilizers:
  1. single-step decomposition: the exact full-vocabulary token-level KL(q_t || p_t) is its
     own loss term (kd/losses.py reverse_kl, chunked), beside the sampled long-term term;
  2. teacher-mixed sampling: y_t ~ alpha p + (1 - alpha) q (alpha 0.2), corrected by the
     per-token importance weight w_t = q(y_t) / (alpha p(y_t) + (1 - alpha) q(y_t));
  3. length normalization: R_t divided by the number of tokens from t to the end.
The long-term term is PPO's clipped surrogate (clip 0.2) with ratio w_t q_theta / q_old, on
whitened returns. An optional language-modelling loss on pretraining text (`lm_data`,
MiniLLM's "pt loss", with its optional KD part) is kd/offpolicy.py's loss on a second stream.

Where we follow the reference code (LMOps/minillm) rather than the paper's equations: the
policy-gradient return keeps r_t (the paper's long-term term starts at R_{t+1}); advantages
are whitened (mean 0, variance 1 over the batch's response tokens on all ranks; the reference
also counts padding, we do not); w_t is detached and enters the PPO ratio, so the clip bounds
w_t * ratio; the single-step term is unweighted (the authors found w_t there unstable, LMOps
issue #255). The reference makes 4 PPO passes over each set of rollouts; here each rollout
feeds one gradient step, so rho = w_t q_theta / q_old = w_t there and the clip acts on w_t.
One difference on purpose: the EOS token is a response token (trained and rewarded): with
pad = eos the reference masks it and the student cannot learn when to stop.

How to run: `method = "minillm"` in a train.py config (configs/minillm_cpu.toml,
docs/onpolicy.md). Tests: `.venv/bin/python -m pytest -q tests/test_onpolicy.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kd import parallel
from kd.chunked_loss import chunked_distillation_loss
from kd.data import IGNORE, Batches, Example
from kd.losses import LossOptions, token_count
from kd.model import Head, Transformer
from kd.offpolicy import OffPolicy, router_aux
from kd.onpolicy import Rollout, RolloutLog, Sampler, align, rollout_batch, with_global_count


def importance_weights(student_logprobs: Tensor, behaviour_logprobs: Tensor) -> Tensor:
    """w_t = q(y_t) / mix(y_t): reweights tokens drawn from the mixture to the student's own law.
    Per token, as MiniLLM does: a sequence's exact weight, the product over t, grows in variance
    with the length."""
    return (student_logprobs - behaviour_logprobs).exp()


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


def token_logprobs(hidden: Tensor, head: Head, labels: Tensor, *, chunk_size: int) -> Tensor:
    """log q(labels) = log_softmax(head(hidden))[labels] in fp32, (B, T), 0 where IGNORE.

    Chunks of tokens under activation checkpointing: only one (chunk x V) block of logits
    exists at a time, forward and backward (it is recomputed in backward).
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    flat_y = labels.reshape(-1)
    valid = flat_y != IGNORE
    targets = flat_y.masked_fill(~valid, 0)

    def chunk(h: Tensor, w: Tensor, y: Tensor) -> Tensor:
        logits = Head(w, head.softcap)(h).float()  # (n, V)
        return logits.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)  # (n,)

    parts = [
        checkpoint(
            chunk,
            flat_h[s : s + chunk_size],
            head.weight,
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
            "minillm_batch needs a rollout scored by both models: pass student and teacher "
            "to rollout"
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
    options = LossOptions(divergence="reverse_kl", alpha=1.0, tokenizer_vocab_size=vocab)
    with torch.no_grad():
        t_hidden = teacher(input_ids, output_fn=lambda h, head: h)  # (B, T, H_t)

    def loss_fn(hidden: Tensor, head: Head) -> tuple[Tensor, dict[str, Tensor]]:
        # Inside the student's forward: FSDP2 has the root's head weight gathered here.
        head = head.rows(vocab)
        single, metrics = chunked_distillation_loss(
            hidden,
            head,
            t_hidden,
            teacher.head,
            labels,
            options,
            chunk_size=chunk_size,
            num_tokens=denom,
        )
        logprobs = token_logprobs(hidden, head, labels, chunk_size=chunk_size)
        old, advantages, weights = batch["old_logprobs"], batch["advantages"], batch["weights"]
        pg = ppo_clipped_sum(logprobs, old, advantages, weights, valid, clip=clip) / denom
        return pg + single, {**metrics, "pg_loss": pg.detach()}

    return student(input_ids, output_fn=loss_fn)


def minillm_micro_batches(
    sampler: Sampler,
    micro_examples: list[list[Example]],
    *,
    step: int,
    teacher_mix_alpha: float = 0.2,
    length_norm: bool = True,
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> tuple[list[dict[str, Tensor]], list[Rollout]]:
    """This rank's micro-batches of one MiniLLM step (`minillm_batch` of a teacher-mixed rollout
    of each micro-batch's prompts), and the rollouts."""
    rollouts = [
        sampler.sample(
            [e.prompt_ids for e in examples],
            step=step,
            micro_batch=m,
            teacher_mix_alpha=teacher_mix_alpha,
        )
        for m, examples in enumerate(micro_examples)
    ]
    pad_id = sampler.config.pad_id
    batches = [
        minillm_batch(r, pad_id=pad_id, length_norm=length_norm, all_reduce_sum=all_reduce_sum)
        for r in rollouts
    ]
    return batches, rollouts


class MiniLLM:
    """The method train.py runs for `method = "minillm"` (the members kd/offpolicy.py
    describes): the step's rollouts (`minillm_micro_batches`) scored by `minillm_loss`, then
    the step's lm_data batches, if any, scored by `lm` (off-policy KD)."""

    def __init__(
        self,
        data: Batches,
        sampler: Sampler,
        *,
        teacher_mix_alpha: float,
        length_norm: bool,
        clip: float,
        vocab: int,
        chunk_size: int,
        lm: OffPolicy | None = None,
        lm_loss_weight: float = 1.0,
        router_aux_loss_coef: float = 0.0,
    ) -> None:
        self.data, self.sampler, self.teachers = data, sampler, [sampler.teacher]
        self.teacher_mix_alpha, self.length_norm, self.clip = teacher_mix_alpha, length_norm, clip
        self.vocab, self.chunk_size = vocab, chunk_size
        self.lm, self.lm_loss_weight = lm, lm_loss_weight
        self.router_aux_loss_coef = router_aux_loss_coef  # an MoE student's (`router_aux`)
        self.log = RolloutLog()

    def micro_batches(self, step: int) -> list[dict[str, Tensor]]:
        """The step's rollouts (every rank decodes until all ranks' rows are done), then the
        step's lm_data batches."""
        with self.sampler.gathered():
            batches, rollouts = minillm_micro_batches(
                self.sampler,
                self.data.examples(step),
                step=step,
                teacher_mix_alpha=self.teacher_mix_alpha,
                length_norm=self.length_norm,
                all_reduce_sum=parallel.all_reduce_sum,
            )
        self.log.add(rollouts, micro_batches=len(batches))
        lm = self.lm.micro_batches(step) if self.lm is not None else []
        return with_global_count(batches) + lm

    def loss(self, student: Transformer, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """A rollout's loss (`minillm_loss`); a batch of lm_data (no advantages) gets
        lm_loss_weight times the off-policy loss and stays out of the logged divergence and
        CE, which describe the rollouts."""
        if "advantages" not in batch:
            loss, _ = self.lm.loss(student, batch)
            return self.lm_loss_weight * loss, {}
        loss, metrics = minillm_loss(
            student,
            self.sampler.teacher,
            batch,
            num_tokens=batch["num_tokens"],
            vocab=self.vocab,
            clip=self.clip,
            chunk_size=self.chunk_size,
        )
        n = metrics["valid_tokens"].float()
        sums = {"tokens": n, "ce": metrics["ce"] * n, "divergence": metrics["divergence"] * n}
        aux, aux_sums = router_aux(
            student, batch["labels"], batch["num_tokens"], self.router_aux_loss_coef
        )
        return loss + aux, sums | aux_sums

    def log_fields(self) -> dict[str, float]:
        return self.log.fields()
