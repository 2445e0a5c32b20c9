"""Distillation losses: every divergence between teacher and student next-token distributions.

Notation: p = teacher, q = student, both softmax(logits / T) over the vocabulary. Each
per-position function takes `student_logits` and `teacher_logits` of shape (..., V) in any float
dtype, computes in fp32 (float64 when given float64, so `torch.autograd.gradcheck` works) and
returns the divergence per position, shape (...). None of them multiplies by T^2: that factor
(Hinton et al., arXiv 1503.02531: soft-target gradients scale as 1/T^2) lives in
`distillation_loss` only.

    forward_kl       KL(p || q)                                   mode-covering
    reverse_kl       KL(q || p)                                   mode-seeking
    jsd              beta KL(p || m) + (1-beta) KL(q || m),       GKD, arXiv 2306.13649
                     m = beta p + (1-beta) q
    skew_forward_kl  KL(p || a p + (1-a) q)                       DistiLLM, arXiv 2402.03898
    skew_reverse_kl  KL(q || (1-a) p + a q)                       DistiLLM, arXiv 2402.03898
    tvd              1/2 sum |p - q|
    logit_mse        mean_v ((s - mean s) - (t - mean t))^2       on logits, not probabilities

`distillation_loss` mixes a divergence with cross-entropy on the labels and normalizes by a
token count the training loop can make global. The teacher may be one tensor of logits, a
list of them (multi-teacher) or a `TopK` of cached top-k log-probabilities.
`kd/chunked_loss.py` computes the same loss from hidden states without materializing the
(tokens x vocab) logits.

Tests: `.venv/bin/python -m pytest -q tests/test_losses.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class TopK(NamedTuple):
    """A teacher cached offline as its k most likely tokens per position.

    `logprobs` must be the teacher's log_softmax(logits / T) at the distillation temperature,
    restricted to `ids`; the remaining mass 1 - sum(exp(logprobs)) becomes one tail bucket.
    """

    ids: Tensor  # (..., k) integer token ids
    logprobs: Tensor  # (..., k) teacher log-probabilities of those ids at temperature T


Teacher = Tensor | Sequence[Tensor] | TopK


# ----------------------------------------------------------------------------- log-prob helpers


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for every input dtype except float64, which stays float64 (for gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _floor(log_probs: Tensor) -> Tensor:
    # Entries masked to -inf (padded vocab rows) would give 0 * (-inf - x) = NaN in p (log p -
    # log q), and NaN gradients through where(). Flooring log 0 at the most negative finite
    # float keeps p = exp(floor) = 0 exactly, so p * (finite) = 0 and every gradient is finite.
    floor = torch.finfo(log_probs.dtype).min
    # In place where autograd does not need the original (the teacher): one allocation fewer.
    return log_probs.clamp(min=floor) if log_probs.requires_grad else log_probs.clamp_(min=floor)


def _log_probs(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """log softmax(logits / T) in `dtype`, -inf floored (see `_floor`)."""
    logits = logits.to(dtype)
    return _floor(F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1))


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


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} is outside [0, 1]; pass a mixture weight in [0, 1]")


# ---------------------------------------------------- divergences of log-probs (log_p, log_q)


def _forward_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    return _kl(log_p, log_q)


def _reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    return _kl(log_q, log_p)


def _jsd(log_p: Tensor, log_q: Tensor, *, beta: float = 0.5) -> Tensor:
    _check_unit("beta", beta)
    # JSD_beta -> 0 as beta -> 0 or 1 (m collapses onto q or p). Following GKD/TRL, the ends are
    # defined as the KL the mixture leans to instead: a deliberate discontinuity.
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    log_m = _mix(log_p, log_q, beta)  # m = beta p + (1 - beta) q, not the swapped TRL #3043 form
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _skew_forward_kl(log_p: Tensor, log_q: Tensor, *, skew_alpha: float = 0.1) -> Tensor:
    _check_unit("skew_alpha", skew_alpha)
    # The mixture mixes the *other* distribution (q) in with weight 1 - alpha: the swapped
    # KL(p || (1-a) p + a q) is bounded by log(1/(1-a)) and carries almost no gradient.
    return _kl(log_p, _mix(log_p, log_q, skew_alpha))


def _skew_reverse_kl(log_p: Tensor, log_q: Tensor, *, skew_alpha: float = 0.1) -> Tensor:
    _check_unit("skew_alpha", skew_alpha)
    return _kl(log_q, _mix(log_p, log_q, 1.0 - skew_alpha))


def _tvd(log_p: Tensor, log_q: Tensor) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


_PROB_DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "skew_forward_kl": _skew_forward_kl,
    "skew_reverse_kl": _skew_reverse_kl,
    "tvd": _tvd,
}
DIVERGENCES = (*_PROB_DIVERGENCES, "logit_mse")


# ------------------------------------------------------------------ public per-position API


def _pair(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """(log_p, log_q) at temperature T, after checking shapes and T."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} differ; pass logits of the same shape (..., V)"
        )
    _check_temperature(temperature)
    dtype = _compute_dtype(student_logits, teacher_logits)
    return _log_probs(teacher_logits, temperature, dtype), _log_probs(
        student_logits, temperature, dtype
    )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0.0:
        raise ValueError(
            f"temperature={temperature} must be > 0 (1.0 leaves the logits as they are)"
        )


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v): mode-covering, q must cover all of p."""
    return _forward_kl(*_pair(student_logits, teacher_logits, temperature))


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """KL(q || p) = sum_v q_v (log q_v - log p_v): mode-seeking, q may drop modes of p."""
    return _reverse_kl(*_pair(student_logits, teacher_logits, temperature))


def jsd(
    student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5, temperature: float = 1.0
) -> Tensor:
    """Generalized JSD (GKD, arXiv 2306.13649): beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q.

    Bounded by log 2 for beta = 0.5 (symmetric there). beta = 0 returns KL(p||q) and beta = 1
    returns KL(q||p) exactly, although the formula itself tends to 0 at both ends.
    """
    return _jsd(*_pair(student_logits, teacher_logits, temperature), beta=beta)


def skew_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """Skew KL (DistiLLM, arXiv 2402.03898): KL(p || alpha p + (1-alpha) q); alpha = 0 is KL(p||q)."""
    return _skew_forward_kl(*_pair(student_logits, teacher_logits, temperature), skew_alpha=alpha)


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """Skew reverse KL (DistiLLM, arXiv 2402.03898): KL(q || (1-alpha) p + alpha q); alpha = 0 is KL(q||p)."""
    return _skew_reverse_kl(*_pair(student_logits, teacher_logits, temperature), skew_alpha=alpha)


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Total variation distance 1/2 sum_v |p_v - q_v|, in [0, 1]."""
    return _tvd(*_pair(student_logits, teacher_logits, temperature))


def logit_mse(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """mean_v of ((s - mean s) - (t - mean t))^2 over the entries finite in both models.

    Centring: softmax(z + c) = softmax(z), so logits carry an arbitrary per-position offset;
    matching raw logits would waste capacity on it. (s - s_bar) - (t - t_bar) = d - d_bar with
    d = s - t. `temperature` divides both logits (so T^2 * logit_mse(T) = logit_mse(1)).
    """
    _pair(student_logits, teacher_logits, temperature)  # shape and temperature checks
    dtype = _compute_dtype(student_logits, teacher_logits)
    s = student_logits.to(dtype) / temperature
    t = teacher_logits.to(dtype) / temperature
    valid = torch.isfinite(s) & torch.isfinite(t)  # masked (-inf) vocab entries do not count
    count = valid.sum(-1).clamp(min=1)
    d = torch.where(valid, s, 0.0) - torch.where(valid, t, 0.0)
    centred = torch.where(valid, d - d.sum(-1, keepdim=True) / count.unsqueeze(-1), 0.0)
    return centred.pow(2).sum(-1) / count


# --------------------------------------------------------------- teachers: mixtures and top-k


def _teacher_log_probs(
    teacher: Tensor | Sequence[Tensor],
    temperature: float,
    dtype: torch.dtype,
    *,
    teacher_weights: Sequence[float] | None,
    teacher_mixture: str,
) -> Tensor:
    """log p of one teacher, or of several combined (see `combine_teachers`)."""
    if isinstance(teacher, Tensor):
        return _log_probs(teacher, temperature, dtype)
    weights = _normalized_weights(teacher, teacher_weights)
    if teacher_mixture == "logits":
        return _log_probs(_average_logits(teacher, weights, dtype), temperature, dtype)
    # p = sum_i w_i p_i, i.e. log p = logsumexp_i(log w_i + log p_i): the ensemble's predictive
    # distribution. Every token any teacher finds likely keeps mass (an arithmetic mean).
    parts = [
        math.log(w) + _log_probs(t, temperature, dtype) for t, w in zip(teacher, weights) if w > 0
    ]
    return _floor(torch.stack(parts).logsumexp(0))


def _average_logits(teachers: Sequence[Tensor], weights: list[float], dtype: torch.dtype) -> Tensor:
    # sum_i w_i z_i: softmax of it is the normalized geometric mean prod_i p_i^{w_i} (a product
    # of experts): sharper where teachers agree, and a token any teacher rules out is ruled out.
    return sum(w * t.to(dtype) for t, w in zip(teachers, weights) if w > 0)


def _normalized_weights(
    teachers: Sequence[Tensor], teacher_weights: Sequence[float] | None
) -> list[float]:
    if len(teachers) == 0:
        raise ValueError("teacher_logits is an empty list; pass at least one teacher")
    if teacher_weights is None:
        return [1.0 / len(teachers)] * len(teachers)
    if (
        len(teacher_weights) != len(teachers)
        or min(teacher_weights) < 0
        or sum(teacher_weights) <= 0
    ):
        raise ValueError(
            f"teacher_weights={list(teacher_weights)} must be {len(teachers)} non-negative numbers "
            "with a positive sum (one per teacher)"
        )
    total = float(sum(teacher_weights))
    return [float(w) / total for w in teacher_weights]


def _topk_buckets(
    teacher: TopK, log_q: Tensor, *, overwrite: bool = False
) -> tuple[Tensor, Tensor]:
    """(log_p, log_q) over k + 1 buckets: the teacher's top-k tokens and one tail for the rest.

    A divergence of these coarsened distributions is a lower bound of the full one (data
    processing inequality) and equals it when k = V. overwrite: floor log_q's top-k entries in
    place (the input of the tail's logsumexp) instead of in a copy; `kd.chunked_loss` reuses it.
    """
    if teacher.ids.shape != teacher.logprobs.shape or teacher.ids.shape[:-1] != log_q.shape[:-1]:
        raise ValueError(
            f"TopK ids {tuple(teacher.ids.shape)} and logprobs {tuple(teacher.logprobs.shape)} must both "
            f"be (..., k) with leading dims {tuple(log_q.shape[:-1])} of the student logits"
        )
    floor = torch.finfo(log_q.dtype).min
    ids = teacher.ids.long()
    log_p_k = teacher.logprobs.to(log_q.dtype)
    log_q_k = log_q.gather(-1, ids)
    # Student mass outside the k tokens: logsumexp over the rest (floored, not -inf, so an empty
    # tail has a finite gradient).
    rest = (
        log_q.scatter_(-1, ids, floor) if overwrite else log_q.scatter(-1, ids, floor)
    )  # (..., V)
    log_q_tail = rest.logsumexp(-1, keepdim=True)
    p_tail = (1.0 - log_p_k.exp().sum(-1, keepdim=True)).clamp(min=0.0)
    # When the student has no tail (k = V), the teacher's leftover 1 - sum is rounding error.
    log_p_tail = torch.where(log_q_tail <= floor, floor, _floor(p_tail.log()))
    return _floor(torch.cat([log_p_k, log_p_tail], -1)), torch.cat([log_q_k, log_q_tail], -1)


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
        f"teacher vocab {teacher_vocab} != student vocab {student_vocab}: if both share a tokenizer and "
        f"the extra teacher rows are padding, pass tokenizer_vocab_size=len(tokenizer) (<= {student_vocab}); "
        "otherwise the vocabularies differ and token-level distillation does not apply"
    )


# ------------------------------------------------------------------------------ the loss


def loss_sums(
    student_logits: Tensor,
    teacher: Teacher | None,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    teacher_weights: Sequence[float] | None = None,
    teacher_mixture: str = "probs",
    tokenizer_vocab_size: int | None = None,
    **divergence_kwargs: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sums over valid positions: (alpha T^2 div + (1 - alpha) CE, div, CE), each a 0-dim fp32 tensor.

    The shared core of `distillation_loss` and `chunked_distillation_loss`: a sum (never a mean)
    so that chunks and micro-batches add up exactly before one global division.
    """
    _check_options(divergence, temperature, alpha, teacher_mixture)
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match student_logits {tuple(student_logits.shape)} "
            "without the vocab dim (logits[:, t] predicts labels[:, t]; shift before calling)"
        )
    teacher = _aligned_teacher(teacher, student_logits, tokenizer_vocab_size)
    dtype = _compute_dtype(student_logits)
    valid = labels != ignore_index  # from the labels, never from input_ids (always != -100)

    log_q = _log_probs(student_logits, temperature, dtype)
    if teacher is None:  # plain SFT: no teacher forward at all
        if alpha != 0.0:
            raise ValueError(
                f"no teacher given with alpha={alpha}; pass a teacher, or alpha=0 for plain SFT"
            )
        div = torch.zeros(labels.shape, dtype=dtype, device=labels.device)
    elif divergence == "logit_mse":
        if isinstance(teacher, TopK) or (
            not isinstance(teacher, Tensor) and teacher_mixture != "logits"
        ):
            raise ValueError(
                "divergence='logit_mse' needs dense teacher logits (multi-teacher: teacher_mixture='logits')"
            )
        if not isinstance(teacher, Tensor):
            teacher = _average_logits(teacher, _normalized_weights(teacher, teacher_weights), dtype)
        div = logit_mse(student_logits, teacher.to(dtype), temperature=temperature)
    elif isinstance(teacher, TopK):
        div = _PROB_DIVERGENCES[divergence](*_topk_buckets(teacher, log_q), **divergence_kwargs)
    else:
        log_p = _teacher_log_probs(
            teacher,
            temperature,
            dtype,
            teacher_weights=teacher_weights,
            teacher_mixture=teacher_mixture,
        )
        div = _PROB_DIVERGENCES[divergence](log_p, log_q, **divergence_kwargs)

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


def _aligned_teacher(
    teacher: Teacher | None, student_logits: Tensor, tokenizer_vocab_size: int | None
) -> Teacher | None:
    """Dense teacher logits checked against the student's shape, padded vocab rows sliced off."""
    if teacher is None or isinstance(teacher, TopK):
        return teacher  # shapes are checked in _topk_buckets
    teachers = [teacher] if isinstance(teacher, Tensor) else list(teacher)
    vocab = student_logits.shape[-1]
    for t in teachers:
        check_teacher_vocab(vocab, t.shape[-1], tokenizer_vocab_size)
        if t.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(
                f"teacher logits {tuple(t.shape)} do not match student_logits {tuple(student_logits.shape)}"
            )
    teachers = [t[..., :vocab] for t in teachers]
    return teachers[0] if isinstance(teacher, Tensor) else teachers


def _check_options(divergence: str, temperature: float, alpha: float, teacher_mixture: str) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"divergence={divergence!r} is unknown; pick one of {', '.join(DIVERGENCES)}"
        )
    _check_temperature(temperature)
    _check_unit("alpha", alpha)
    if teacher_mixture not in ("probs", "logits"):
        raise ValueError(f"teacher_mixture={teacher_mixture!r} must be 'probs' or 'logits'")


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
            f"num_tokens={num_tokens} must be > 0 (the valid-token count over all micro-batches and ranks)"
        )
    return valid_count, torch.tensor(float(num_tokens), device=labels.device)


def metrics_from_sums(div_sum: Tensor, ce_sum: Tensor, valid_count: Tensor) -> dict[str, Tensor]:
    """Detached per-token means for logging; the caller does `.item()` (a host sync) on log steps."""
    n = valid_count.clamp(min=1)
    return {
        "divergence": (div_sum / n).detach(),
        "ce": (ce_sum / n).detach(),
        "valid_tokens": valid_count.detach(),
    }


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Teacher | None,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    num_tokens: int | Tensor | None = None,
    teacher_weights: Sequence[float] | None = None,
    teacher_mixture: str = "probs",
    tokenizer_vocab_size: int | None = None,
    **divergence_kwargs: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """loss = (alpha T^2 sum_valid div + (1 - alpha) sum_valid CE) / num_tokens, and metrics.

    student_logits: (..., V); logits[..., t, :] predicts labels[..., t] (callers shift).
    teacher_logits: (..., V') tensor; a list of them (multi-teacher: `teacher_weights`, default
        uniform, combined by `teacher_mixture` 'probs' = sum_i w_i p_i, or 'logits' =
        softmax(sum_i w_i z_i)); or a `TopK` of cached top-k log-probs at temperature T.
        V' > V only with `tokenizer_vocab_size` (padding rows, see `check_teacher_vocab`).
        None only with alpha = 0 (plain SFT; the divergence metric is then 0).
    labels: (...) token ids; positions equal to `ignore_index` count nowhere.
    num_tokens: the divisor; default the valid count here, but under gradient accumulation
        and data parallelism pass the count over all micro-batches and ranks, so every token
        weighs the same (TRL #6006 normalizes per micro-batch instead).
    divergence_kwargs: `beta` for jsd; `skew_alpha` for the skew KLs (`alpha` is the loss mix).

    alpha = 0 is plain SFT. The CE uses the student at T = 1. metrics: detached tensors
    'divergence' and 'ce' (unscaled means over valid tokens here) and 'valid_tokens'.
    """
    valid_count, denom = token_count(labels, num_tokens, ignore_index=ignore_index)
    total, div_sum, ce_sum = loss_sums(
        student_logits,
        teacher_logits,
        labels,
        divergence=divergence,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
        teacher_weights=teacher_weights,
        teacher_mixture=teacher_mixture,
        tokenizer_vocab_size=tokenizer_vocab_size,
        **divergence_kwargs,
    )
    return total / denom, metrics_from_sums(div_sum, ce_sum, valid_count)
