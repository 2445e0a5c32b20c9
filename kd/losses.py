"""Distillation losses: every divergence between teacher and student next-token distributions.

Notation: p = teacher, q = student, both softmax(logits / T) over the vocabulary. Each
per-position divergence is a function of the log-probabilities `log_p` and `log_q`, shape
(..., V), as `log_probs` gives them (fp32, float64 for float64 logits so that
`torch.autograd.gradcheck` works), and returns the divergence per position, shape (...). None
of them multiplies by T^2: that factor (Hinton et al., arXiv 1503.02531: soft-target gradients
scale as 1/T^2) lives in the loss only.

    forward_kl       KL(p || q)                                   mode-covering
    reverse_kl       KL(q || p)                                   mode-seeking
    jsd              beta KL(p || m) + (1-beta) KL(q || m),       GKD, arXiv 2306.13649
                     m = beta p + (1-beta) q
    skew_forward_kl  KL(p || a p + (1-a) q)                       DistiLLM, arXiv 2402.03898
    skew_reverse_kl  KL(q || (1-a) p + a q)                       DistiLLM, arXiv 2402.03898
    tvd              1/2 sum |p - q|
    logit_mse        mean_v ((s - mean s) - (t - mean t))^2       on logits, not probabilities
    uld, gold        a teacher of another vocabulary: kd/cross_tokenizer.py

From logits: `forward_kl(log_probs(teacher_logits, T), log_probs(student_logits, T))`.

`distillation_loss` mixes a divergence with cross-entropy on the labels and normalizes by a
token count the training loop can make global; `LossOptions` holds its settings. The teacher
may be one tensor of logits, a list of them (multi-teacher) or a `TopK` of cached top-k
log-probabilities. `kd/chunked_loss.py` computes the same loss from hidden states without
materializing the (tokens x vocab) logits, from the public pieces here (`log_probs`,
`teacher_log_probs`, `topk_buckets`, `loss_sums`, ...).

Tests: `.venv/bin/python -m pytest -q tests/test_losses.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kd.cross_tokenizer import CrossVocab, cross_divergence

Tensor = torch.Tensor


class TopK(NamedTuple):
    """A teacher cached offline as its k most likely tokens per position.

    `logprobs` must be the teacher's log_softmax(logits / T) at the distillation temperature,
    restricted to `ids`; the remaining mass 1 - sum(exp(logprobs)) becomes one tail bucket.
    A position whose logprobs are NaN has no teacher distribution (an API teacher reports none
    for the end-of-turn token): `topk_buckets` gives it the student's own, so it adds no
    divergence and no gradient, and only the CE term trains it.
    """

    ids: Tensor  # (..., k) integer token ids
    logprobs: Tensor  # (..., k) teacher log-probabilities of those ids at temperature T


Teacher = Tensor | Sequence[Tensor] | TopK | CrossVocab

DIVERGENCES = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "logit_mse",
)
# Divergences between a teacher and a student of different vocabularies (kd/cross_tokenizer.py).
CROSS_DIVERGENCES = ("uld", "gold")


# ------------------------------------------------------------------------------- the options


@dataclass(frozen=True)
class LossOptions:
    """How teacher and student distributions are compared; every value is checked once, here.

    `teacher_weights` may be given as any sequence (a list from a config); it is stored as a
    tuple of floats, so that the options stay immutable and hashable.
    """

    divergence: str = "forward_kl"  # one of DIVERGENCES
    temperature: float = 1.0  # T > 0 of both softmaxes in the divergence; CE stays at T = 1
    alpha: float = 0.5  # loss = alpha T^2 D + (1 - alpha) CE; 0 = plain SFT, 1 = pure KD
    beta: float = 0.5  # jsd only: m = beta p + (1 - beta) q; 0.5 is the symmetric JSD
    skew_alpha: float = 0.1  # skew KLs only: a in KL(p || a p + (1-a) q), KL(q || (1-a) p + a q)
    teacher_weights: tuple[float, ...] | None = None  # multi-teacher weights; None = equal
    teacher_mixture: str = "probs"  # "probs": sum_i w_i p_i; "logits": softmax(sum_i w_i z_i)
    tokenizer_vocab_size: int | None = None  # len(tokenizer); see check_teacher_vocab
    ignore_index: int = -100  # label of positions that count nowhere (prompt, padding)
    # uld and gold (kd/cross_tokenizer.py): k largest probabilities compared, 0 = all
    uld_top_k: int = 0
    gold_divergence: str = "forward_kl"  # gold: D on the tokens both vocabularies share
    gold_weights: tuple[float, float] = (1.0, 1.0)  # gold: weights of D_S and of ULD on the rest

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES + CROSS_DIVERGENCES:
            names = ", ".join(DIVERGENCES + CROSS_DIVERGENCES)
            raise ValueError(f"divergence={self.divergence!r} is unknown; pick one of {names}")
        if self.gold_divergence not in DIVERGENCES[:-1]:  # any but logit_mse
            raise ValueError(
                f"gold_divergence={self.gold_divergence!r} must be one of "
                f"{', '.join(DIVERGENCES[:-1])}"
            )
        if self.uld_top_k < 0 or min(self.gold_weights) < 0 or len(self.gold_weights) != 2:
            raise ValueError(
                f"uld_top_k={self.uld_top_k} and gold_weights={list(self.gold_weights)} must be "
                ">= 0 (gold_weights: two numbers, the shared tokens' and the rest's)"
            )
        object.__setattr__(self, "gold_weights", tuple(float(w) for w in self.gold_weights))
        _check_temperature(self.temperature)
        _check_unit("alpha", self.alpha)
        _check_unit("beta", self.beta)
        _check_unit("skew_alpha", self.skew_alpha)
        if self.teacher_mixture not in ("probs", "logits"):
            raise ValueError(
                f"teacher_mixture={self.teacher_mixture!r} must be 'probs' or 'logits'"
            )
        if self.teacher_weights is not None:
            weights = tuple(float(w) for w in self.teacher_weights)
            if len(weights) == 0 or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(
                    f"teacher_weights={list(weights)} must be non-negative numbers with a "
                    "positive sum (one per teacher), or None for equal weights"
                )
            object.__setattr__(self, "teacher_weights", weights)  # frozen: set once, here


def _check_temperature(temperature: float) -> None:
    if not temperature > 0.0:
        raise ValueError(
            f"temperature={temperature} must be > 0 (1.0 leaves the logits as they are)"
        )


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} is outside [0, 1]; pass a mixture weight in [0, 1]")


# -------------------------------------------------------------------------- log-prob helpers


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for every input dtype except float64, which stays float64 (for gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def floor_log_probs(log_probs: Tensor) -> Tensor:
    # Entries masked to -inf (padded vocab rows) would give 0 * (-inf - x) = NaN in
    # p (log p - log q), and NaN gradients through where(). Flooring log 0 at the most
    # negative finite float keeps p = exp(floor) = 0 exactly: p * (finite) = 0, and every
    # gradient stays finite.
    floor = torch.finfo(log_probs.dtype).min
    # In place where autograd does not need the original (the teacher): one allocation fewer.
    return log_probs.clamp(min=floor) if log_probs.requires_grad else log_probs.clamp_(min=floor)


def log_probs(logits: Tensor, temperature: float, dtype: torch.dtype | None = None) -> Tensor:
    """log softmax(logits / T) in `dtype` (default: `compute_dtype(logits)`), shape (..., V).

    log 0 (a logit at -inf: a masked vocab entry) is floored at the most negative finite float,
    so that the divergences stay finite and their gradients are 0 there instead of NaN.
    """
    _check_temperature(temperature)
    logits = logits.to(compute_dtype(logits) if dtype is None else dtype)
    return floor_log_probs(
        F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    )


def _mix(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """log(w a + (1 - w) b), formed in log space so that tiny probabilities do not underflow."""
    if weight == 0.0:
        return log_b
    if weight == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v), per position."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _check_pair(log_p: Tensor, log_q: Tensor) -> None:
    if log_p.shape != log_q.shape:
        raise ValueError(
            f"log_p {tuple(log_p.shape)} and log_q {tuple(log_q.shape)} differ; pass teacher and "
            "student log-probabilities of the same shape (..., V)"
        )


# ------------------------------------------------ per-position divergences of (log_p, log_q)


def forward_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v): mode-covering, q must cover all of p."""
    _check_pair(log_p, log_q)
    return _kl(log_p, log_q)


def reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(q || p) = sum_v q_v (log q_v - log p_v): mode-seeking, q may drop modes of p."""
    _check_pair(log_p, log_q)
    return _kl(log_q, log_p)


def jsd(log_p: Tensor, log_q: Tensor, *, beta: float) -> Tensor:
    """Generalized JSD (GKD, arXiv 2306.13649): beta KL(p || m) + (1-beta) KL(q || m).

    m = beta p + (1-beta) q. Bounded by log 2 for beta = 0.5 (symmetric there). beta = 0
    returns KL(p || q) and beta = 1 returns KL(q || p) exactly, although the formula itself
    tends to 0 at both ends.
    """
    _check_pair(log_p, log_q)
    _check_unit("beta", beta)
    # JSD_beta -> 0 as beta -> 0 or 1 (m collapses onto q or p). Following GKD/TRL, the ends are
    # defined as the KL the mixture leans to instead: a deliberate discontinuity.
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    log_m = _mix(log_p, log_q, beta)  # m = beta p + (1 - beta) q, not the swapped TRL #3043 form
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def skew_forward_kl(log_p: Tensor, log_q: Tensor, *, skew_alpha: float) -> Tensor:
    """Skew KL (DistiLLM, arXiv 2402.03898): KL(p || a p + (1-a) q), a = skew_alpha.

    a = 0 is KL(p || q); the student's q in the mixture keeps the KL finite where q -> 0.
    """
    _check_pair(log_p, log_q)
    _check_unit("skew_alpha", skew_alpha)
    # The mixture mixes the *other* distribution (q) in with weight 1 - a: the swapped
    # KL(p || (1-a) p + a q) is bounded by log(1/(1-a)) and carries almost no gradient.
    return _kl(log_p, _mix(log_p, log_q, skew_alpha))


def skew_reverse_kl(log_p: Tensor, log_q: Tensor, *, skew_alpha: float) -> Tensor:
    """Skew reverse KL (DistiLLM, arXiv 2402.03898): KL(q || (1-a) p + a q), a = skew_alpha.

    a = 0 is KL(q || p).
    """
    _check_pair(log_p, log_q)
    _check_unit("skew_alpha", skew_alpha)
    return _kl(log_q, _mix(log_p, log_q, 1.0 - skew_alpha))


def tvd(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Total variation distance 1/2 sum_v |p_v - q_v|, in [0, 1]."""
    _check_pair(log_p, log_q)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def logit_mse(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """mean_v of ((s - mean s) - (t - mean t))^2 over the entries finite in both models.

    Centring: softmax(z + c) = softmax(z), so logits carry an arbitrary per-position offset;
    matching raw logits would waste capacity on it. (s - s_bar) - (t - t_bar) = d - d_bar with
    d = s - t. `temperature` divides both logits (so T^2 * logit_mse(T) = logit_mse(1)).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} differ; pass logits of the same shape (..., V)"
        )
    _check_temperature(temperature)
    dtype = compute_dtype(student_logits, teacher_logits)
    s = student_logits.to(dtype) / temperature
    t = teacher_logits.to(dtype) / temperature
    valid = torch.isfinite(s) & torch.isfinite(t)  # masked (-inf) vocab entries do not count
    count = valid.sum(-1).clamp(min=1)
    d = torch.where(valid, s, 0.0) - torch.where(valid, t, 0.0)
    centred = torch.where(valid, d - d.sum(-1, keepdim=True) / count.unsqueeze(-1), 0.0)
    return centred.pow(2).sum(-1) / count


def _divergence(log_p: Tensor, log_q: Tensor, options: LossOptions) -> Tensor:
    """The divergence `options.divergence` (any but logit_mse), with its own setting."""
    name = options.divergence
    if name == "jsd":
        return jsd(log_p, log_q, beta=options.beta)
    if name == "skew_forward_kl":
        return skew_forward_kl(log_p, log_q, skew_alpha=options.skew_alpha)
    if name == "skew_reverse_kl":
        return skew_reverse_kl(log_p, log_q, skew_alpha=options.skew_alpha)
    return {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "tvd": tvd}[name](log_p, log_q)


# --------------------------------------------------------------- teachers: mixtures and top-k


def teacher_log_probs(
    teacher: Tensor | Sequence[Tensor], options: LossOptions, dtype: torch.dtype
) -> Tensor:
    """log p at `options.temperature` in `dtype`, floored as `log_probs`, shape (..., V).

    teacher: one tensor of logits, or several combined by `options.teacher_mixture` with
    `options.teacher_weights` (normalized to sum 1; None = equal):
      'probs':  p = sum_i w_i p_i                   the ensemble's predictive distribution
      'logits': p = softmax(sum_i w_i z_i / T)      a product of experts
    """
    temperature = options.temperature
    if isinstance(teacher, Tensor):
        return log_probs(teacher, temperature, dtype)
    weights = _normalized_weights(teacher, options.teacher_weights)
    if options.teacher_mixture == "logits":
        return log_probs(_average_logits(teacher, weights, dtype), temperature, dtype)
    # p = sum_i w_i p_i, i.e. log p = logsumexp_i(log w_i + log p_i): the ensemble's predictive
    # distribution. Every token any teacher finds likely keeps mass (an arithmetic mean).
    parts = [
        math.log(w) + log_probs(t, temperature, dtype) for t, w in zip(teacher, weights) if w > 0
    ]
    return floor_log_probs(torch.stack(parts).logsumexp(0))


def _average_logits(teachers: Sequence[Tensor], weights: list[float], dtype: torch.dtype) -> Tensor:
    # sum_i w_i z_i: softmax of it is the normalized geometric mean prod_i p_i^{w_i} (a product
    # of experts): sharper where teachers agree, and a token any teacher rules out is ruled out.
    return sum(w * t.to(dtype) for t, w in zip(teachers, weights) if w > 0)


def _normalized_weights(
    teachers: Sequence[Tensor], teacher_weights: tuple[float, ...] | None
) -> list[float]:
    """w_i / sum_j w_j, one per teacher (signs and sum are checked by `LossOptions`)."""
    if len(teachers) == 0:
        raise ValueError("teacher_logits is an empty list; pass at least one teacher")
    if teacher_weights is None:
        return [1.0 / len(teachers)] * len(teachers)
    if len(teacher_weights) != len(teachers):
        raise ValueError(
            f"teacher_weights={list(teacher_weights)} has {len(teacher_weights)} values for "
            f"{len(teachers)} teachers; pass one weight per teacher"
        )
    total = sum(teacher_weights)
    return [w / total for w in teacher_weights]


def topk_buckets(teacher: TopK, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """(log_p, log_q) over k + 1 buckets: the teacher's top-k tokens and one tail for the rest.

    log_q: (..., V) the student's floored log-probabilities (`log_probs`); returns two
    (..., k + 1) tensors, the k tokens first, then the tail. A divergence of these coarsened
    distributions is a lower bound of the full one (data processing inequality) and equals it
    when k = V.
    """
    if teacher.ids.shape[:-1] != log_q.shape[:-1]:
        raise ValueError(
            f"TopK ids {tuple(teacher.ids.shape)} must be (..., k), with the student's leading "
            f"dims {tuple(log_q.shape[:-1])}"
        )
    ids = teacher.ids.long()
    # Student mass outside the k tokens: logsumexp over the rest (floored, not -inf, so an empty
    # tail has a finite gradient).
    rest = log_q.scatter(-1, ids, torch.finfo(log_q.dtype).min)
    return topk_buckets_of(teacher, log_q.gather(-1, ids), rest.logsumexp(-1, keepdim=True))


def topk_buckets_of(teacher: TopK, log_q_k: Tensor, log_q_tail: Tensor) -> tuple[Tensor, Tensor]:
    """`topk_buckets` from the student's side of them: log_q_k (..., k) the student's floored
    log-probs of the teacher's k tokens, log_q_tail (..., 1) the log of its mass on the rest
    (at most the floor when it has none)."""
    if teacher.ids.shape != teacher.logprobs.shape or teacher.ids.shape != log_q_k.shape:
        raise ValueError(
            f"TopK ids {tuple(teacher.ids.shape)} and logprobs {tuple(teacher.logprobs.shape)} "
            f"must both be (..., k), as the student's top-k log-probs {tuple(log_q_k.shape)}"
        )
    floor = torch.finfo(log_q_k.dtype).min
    log_p_k = teacher.logprobs.to(log_q_k.dtype)
    p_tail = (1.0 - log_p_k.exp().sum(-1, keepdim=True)).clamp(min=0.0)
    # When the student has no tail (k = V), the teacher's leftover 1 - sum is rounding error.
    log_p_tail = torch.where(log_q_tail <= floor, floor, floor_log_probs(p_tail.log()))
    log_p, log_q_b = (
        floor_log_probs(torch.cat([log_p_k, log_p_tail], -1)),
        torch.cat([log_q_k, log_q_tail], -1),
    )
    # No teacher at a NaN position (see TopK): P = Q there, every divergence is at its minimum
    # 0, where its gradient with respect to Q is 0 too (Q is detached on the P side).
    unknown = log_p_k.isnan().any(-1, keepdim=True)  # (..., 1)
    return torch.where(unknown, log_q_b.detach(), log_p), log_q_b


def check_teacher_vocab(
    student_vocab: int, teacher_vocab: int, tokenizer_vocab_size: int | None
) -> None:
    """Allow a teacher with more vocab rows than the student only when the extra rows are padding.

    E.g. Qwen2.5-7B has 152064 rows and Qwen2.5-0.5B 151936 for the same 151665-token
    tokenizer: rows >= len(tokenizer) are never produced, so the teacher is sliced to the
    student's rows. The caller must say so by passing tokenizer_vocab_size=len(tokenizer).
    """
    if teacher_vocab == student_vocab:
        return
    if (
        teacher_vocab > student_vocab
        and tokenizer_vocab_size is not None
        and tokenizer_vocab_size <= student_vocab
    ):
        return
    raise ValueError(
        f"teacher vocab {teacher_vocab} != student vocab {student_vocab}: if both share a "
        "tokenizer and the extra teacher rows are padding, pass "
        f"tokenizer_vocab_size=len(tokenizer) (<= {student_vocab}); otherwise the vocabularies "
        "differ and token-level distillation does not apply"
    )


def aligned_teacher(
    teacher: Teacher | None, student_logits: Tensor, *, tokenizer_vocab_size: int | None
) -> Teacher | None:
    """Dense teacher logits checked against the student's shape, padded vocab rows sliced off.

    A `TopK` teacher or None passes through (`topk_buckets` checks a TopK's shapes).
    """
    if teacher is None or isinstance(teacher, (TopK, CrossVocab)):
        return teacher
    teachers = [teacher] if isinstance(teacher, Tensor) else list(teacher)
    vocab = student_logits.shape[-1]
    for t in teachers:
        check_teacher_vocab(vocab, t.shape[-1], tokenizer_vocab_size)
        if t.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(
                f"teacher logits {tuple(t.shape)} do not match student_logits "
                f"{tuple(student_logits.shape)} in their leading dims"
            )
    teachers = [t[..., :vocab] for t in teachers]
    return teachers[0] if isinstance(teacher, Tensor) else teachers


# ---------------------------------------------------------------------------------- the loss


def loss_sums(
    student_logits: Tensor,
    teacher: Teacher | None,
    labels: Tensor,
    options: LossOptions = LossOptions(),
) -> tuple[Tensor, Tensor, Tensor]:
    """Sums over valid positions: (alpha T^2 div + (1 - alpha) CE, div, CE), each 0-dim fp32.

    The shared core of `distillation_loss` and `chunked_distillation_loss`: a sum (never a mean)
    so that chunks and micro-batches add up exactly before one global division. Arguments as
    in `distillation_loss`.
    """
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match student_logits "
            f"{tuple(student_logits.shape)} without the vocab dim (logits[:, t] predicts "
            "labels[:, t]; shift before calling)"
        )
    teacher = aligned_teacher(
        teacher, student_logits, tokenizer_vocab_size=options.tokenizer_vocab_size
    )
    temperature, alpha = options.temperature, options.alpha
    if teacher is None and alpha != 0.0:
        raise ValueError(
            f"no teacher given with alpha={alpha}; pass a teacher, or alpha=0 for plain SFT"
        )
    dtype = compute_dtype(student_logits)
    valid = labels != options.ignore_index  # from the labels, never from input_ids

    log_q = log_probs(student_logits, temperature, dtype)
    div = _per_position_divergence(student_logits, log_q, teacher, labels, options)

    # CE of the student at T = 1 on the labels: -log q(y); reuses log_q when T = 1, otherwise
    # F.cross_entropy (one fused log-softmax + gather) on the raw logits.
    safe_labels = labels.masked_fill(~valid, 0).long()
    if temperature == 1.0:
        ce = -log_q.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    else:
        logits = student_logits.to(dtype)
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), safe_labels.reshape(-1), reduction="none"
        ).view(labels.shape)

    # where(), not multiply: a padded position with an infinite divergence must add 0, not NaN.
    div_sum = torch.where(valid, div, 0.0).sum()
    ce_sum = torch.where(valid, ce, 0.0).sum()
    return alpha * temperature**2 * div_sum + (1.0 - alpha) * ce_sum, div_sum, ce_sum


def _per_position_divergence(
    student_logits: Tensor,
    log_q: Tensor,
    teacher: Teacher | None,
    labels: Tensor,
    options: LossOptions,
) -> Tensor:
    """D at every position, shape labels.shape, for an aligned teacher (0 without a teacher)."""
    dtype = log_q.dtype
    if teacher is None:  # plain SFT: no teacher forward at all
        return torch.zeros(labels.shape, dtype=dtype, device=labels.device)
    if options.divergence == "logit_mse":
        if isinstance(teacher, TopK) or (
            not isinstance(teacher, Tensor) and options.teacher_mixture != "logits"
        ):
            raise ValueError(
                "divergence='logit_mse' needs dense teacher logits (multi-teacher: "
                "teacher_mixture='logits')"
            )
        if not isinstance(teacher, Tensor):
            weights = _normalized_weights(teacher, options.teacher_weights)
            teacher = _average_logits(teacher, weights, dtype)
        return logit_mse(student_logits, teacher.to(dtype), temperature=options.temperature)
    if isinstance(teacher, CrossVocab) or options.divergence in CROSS_DIVERGENCES:
        exact = replace(options, divergence=options.gold_divergence)  # gold's D on shared tokens
        return cross_divergence(log_q, teacher, options, lambda a, b: _divergence(a, b, exact))
    if isinstance(teacher, TopK):
        return _divergence(*topk_buckets(teacher, log_q), options)
    return _divergence(teacher_log_probs(teacher, options, dtype), log_q, options)


def token_count(
    labels: Tensor, num_tokens: int | Tensor | None, *, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """(valid tokens here, the divisor): num_tokens, or the local valid count when None.

    The divisor is clamped to >= 1 so that a batch with no valid token gives 0, not 0/0.
    No host sync: everything stays a tensor.
    """
    valid_count = (labels != ignore_index).sum()
    if num_tokens is None:
        return valid_count, valid_count.clamp(min=1)
    if isinstance(num_tokens, Tensor):
        return valid_count, num_tokens.clamp(min=1)
    if num_tokens <= 0:
        raise ValueError(
            f"num_tokens={num_tokens} must be > 0 (the valid-token count over all micro-batches "
            "and ranks)"
        )
    return valid_count, torch.tensor(float(num_tokens), device=labels.device)


def metrics_from_sums(div_sum: Tensor, ce_sum: Tensor, valid_count: Tensor) -> dict[str, Tensor]:
    """Detached per-token means for logging; the caller's `.item()` on them is a host sync."""
    n = valid_count.clamp(min=1)
    return {
        "divergence": (div_sum / n).detach(),
        "ce": (ce_sum / n).detach(),
        "valid_tokens": valid_count.detach(),
    }


def distillation_loss(
    student_logits: Tensor,
    teacher: Teacher | None,
    labels: Tensor,
    options: LossOptions = LossOptions(),
    *,
    num_tokens: int | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """loss = (alpha T^2 sum_valid div + (1 - alpha) sum_valid CE) / num_tokens, and metrics.

    student_logits: (..., V); logits[..., t, :] predicts labels[..., t] (callers shift).
    teacher: (..., V') logits; a list of them (multi-teacher, combined as `teacher_log_probs`
        says by options.teacher_mixture and options.teacher_weights); or a `TopK` of cached
        top-k log-probs at temperature T. V' > V only with options.tokenizer_vocab_size
        (padding rows, see `check_teacher_vocab`). None only with options.alpha = 0 (plain
        SFT; the divergence metric is then 0).
    labels: (...) token ids; positions equal to options.ignore_index count nowhere.
    options: the divergence, T, alpha and the rest (`LossOptions`).
    num_tokens: the divisor; default the valid count here, but under gradient accumulation
        and data parallelism pass the count over all micro-batches and ranks, so every token
        weighs the same (TRL #6006 normalizes per micro-batch instead).

    The CE uses the student at T = 1. metrics: detached tensors 'divergence' and 'ce'
    (unscaled means over valid tokens here) and 'valid_tokens'.
    """
    valid_count, denom = token_count(labels, num_tokens, ignore_index=options.ignore_index)
    total, div_sum, ce_sum = loss_sums(student_logits, teacher, labels, options)
    return total / denom, metrics_from_sums(div_sum, ce_sum, valid_count)
