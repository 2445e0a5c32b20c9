"""dL/dlogits in closed form, one chunk of the distillation loss at a time.

`analytic_loss_and_grad` gives what autograd through `kd.losses.loss_sums` gives on a chunk of
logits (the sums of the loss and its G = dL/dlogits), for forward and reverse KL against dense
teacher logits, forward KL against a top-k teacher, and SFT, with the formulas written out and
computed in place: ~2x less CPU time per chunk than autograd. kd/chunked_loss.py calls it for
those divergences and autograd for the rest; tests/test_chunked_loss.py checks the two agree.

Its (n x V) intermediates live in `Scratch` buffers, reused chunk after chunk.

    .venv/bin/python -m pytest -q tests/test_chunked_loss.py
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from kd.losses import (
    LossOptions,
    Teacher,
    TopK,
    aligned_teacher,
    compute_dtype,
    floor_log_probs,
    forward_kl,
    teacher_log_probs,
    topk_buckets_of,
)

# Divergences whose gradient wrt the student logits `analytic_loss_and_grad` writes out.
ANALYTIC_DIVERGENCES = ("forward_kl", "reverse_kl")


class Scratch:
    """The (n x V) buffers of one loss call, one per role, reused chunk after chunk.

    Why: on a CPU, glibc serves a tensor above its mmap threshold (at most 32 MiB; a 256 x 49152
    fp32 chunk is 48 MiB) with fresh pages, faulted in one by one on first write and unmapped
    again when freed. Measured on 2 cores of an Intel Xeon (AMX), 256 x 49152 fp32: exp into a
    new tensor 22 ms, into a reused one 4 ms; log-softmax 41 vs 13 ms. On a GPU the caching
    allocator reuses memory anyway. The shorter last chunk gets the first rows of each buffer.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}

    def __call__(
        self, role: str, shape: torch.Size | tuple[int, int], dtype: torch.dtype, device: Any
    ) -> Tensor:
        """An (n, V) buffer for `role`, holding whatever the last chunk left there."""
        n, v = shape
        buffer = self.buffers.get(role)
        if buffer is None or buffer.dtype != dtype or buffer.shape[0] < n or buffer.shape[1] != v:
            buffer = self.buffers[role] = torch.empty(n, v, dtype=dtype, device=device)
        return buffer[:n]


def _log_probs_into(z: Tensor, temperature: float, out: Tensor) -> Tensor:
    """`kd.losses.log_probs(z, T)` written into `out`: z (in the compute dtype, a buffer of
    its own) is divided by T in place."""
    if temperature != 1.0:
        z.div_(temperature)
    return floor_log_probs(torch.log_softmax(z, dim=-1, out=out))


def analytic_loss_and_grad(
    logits: Tensor,
    teacher: Teacher | None,
    labels: Tensor,
    denom: Tensor,
    options: LossOptions,
    *,
    need_grad: bool,
    scratch: Scratch | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """What kd.chunked_loss's autograd path gives, with G written out (KL, top-k forward KL, SFT).

    Forward and reverse KL against dense teachers, forward KL against a top-k teacher, and SFT.

    Per valid token, with z the student logits, u = z / T, q = softmax(u), p = the teacher's
    softmax(z_t / T), s = softmax(z) and y the label, the loss is
        l = alpha T^2 D + (1 - alpha) CE,   CE = -log s_y,
    and G = dl/dz / denom (0 on ignored tokens). Using dq_v/du_j = q_v (delta_vj - q_j):
      CE:          dCE/dz = s - onehot(y)
      forward KL:  D = sum_v p_v (log p_v - log q_v);  dD/du = q - p
      reverse KL:  D = sum_v q_v (log q_v - log p_v);
                   dD/du_j = sum_v (log q_v - log p_v + 1) q_v (delta_vj - q_j)
                           = q_j (log q_j - log p_j - D)
                   (the +1 terms cancel: sum_v q_v (delta_vj - q_j) = 0)
    and du/dz = 1/T, so alpha T^2 dD/dz = alpha T dD/du. Hence
      G = [alpha T (q - p) + (1 - alpha)(s - onehot(y))] / denom                 forward KL
      G = [alpha T q (log q - log p - D) + (1 - alpha)(s - onehot(y))] / denom   reverse KL
      G = [alpha T dD/du + (1 - alpha)(s - onehot(y))] / denom                   top-k forward KL
    with dD/du of the (k + 1)-bucket KL derived in `_topk_forward_kl_and_grad`.
    (Liger-Kernel's fused linear losses use the same closed forms, arXiv 2410.10989.)
    The log-probs come from kd.losses' own functions (T, -inf floor, teacher mixtures); D is
    `kd.losses.forward_kl` / `reverse_kl` written out in place, since (n x V) temporaries cost
    page faults on CPU. -inf logits (masked vocab entries): log q and log p are floored at the
    most negative finite float (`kd.losses.log_probs`), so q = p = 0 there exactly,
    log q - log p stays finite and G = 0 at entries masked in both models, as in autograd
    (whose gradient through the floor is 0).
    """
    temperature, alpha = options.temperature, options.alpha
    dtype = compute_dtype(logits)
    scratch = Scratch() if scratch is None else scratch

    def buffer(role: str) -> Tensor:  # an (n, V) buffer in the compute dtype (`Scratch`)
        return scratch(role, logits.shape, dtype, logits.device)

    valid = labels != options.ignore_index  # (n,)
    safe_labels = labels.masked_fill(~valid, 0).long().unsqueeze(-1)  # (n, 1)
    # Row weights: 1 / denom on valid tokens, 0 on ignored ones (`loss_sums` drops them by where()).
    row = (valid.to(dtype) / denom).unsqueeze(-1)  # (n, 1)

    # (n, 1): alpha T / denom, the factor of dD/du in G; None when G has no divergence term
    scale = row * (alpha * temperature) if need_grad and alpha != 0.0 else None
    # (n, 1): (1 - alpha) / denom, the factor of the CE's dCE/dz = s - onehot(y) in G, or None
    ce_row = row * (1.0 - alpha) if need_grad and alpha != 1.0 else None
    if isinstance(teacher, TopK):  # forward KL: the only top-k divergence dispatched here
        parts = _topk_forward_kl_and_grad(
            logits, teacher, safe_labels, scale, ce_row, temperature, buffer
        )
    else:
        parts = _dense_loss_and_grad(logits, teacher, safe_labels, scale, ce_row, options, buffer)
    div, ce, g = parts  # (n,), (n,), (n, V) or None
    div_sum = torch.where(valid, div, 0.0).sum()
    ce_sum = torch.where(valid, ce, 0.0).sum()
    total = alpha * temperature**2 * div_sum + (1.0 - alpha) * ce_sum
    return total, div_sum, ce_sum, g


def _dense_loss_and_grad(
    logits: Tensor,
    teacher: Teacher | None,
    labels: Tensor,
    scale: Tensor | None,
    ce_row: Tensor | None,
    options: LossOptions,
    buffer: Callable[[str], Tensor],
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(per-row D, per-row CE, G or None) against dense teacher logits, or SFT (teacher None:
    D = 0). labels: (n, 1), ignored tokens at 0; scale, ce_row as in `analytic_loss_and_grad`
    (None: no such term in G)."""
    log_s, log_q = _student_log_probs(logits, options.temperature, teacher is not None, buffer)
    ce = -log_s.gather(-1, labels).squeeze(-1)  # (n,) -log s_y
    # At T = 1, s = q: the divergence's gradient takes the CE's (1 - alpha) s / denom into the
    # same passes over (n, V) (`fused`), and only the one-hot part is left for below.
    fused = log_s is log_q and teacher is not None and scale is not None and ce_row is not None
    g = None  # (n, V): G
    if teacher is None:  # plain SFT (alpha = 0)
        div = torch.zeros_like(ce)
    else:  # log_q becomes G in place, or a copy of it does when log_q is also the log s read below
        keep_log_s = log_s is log_q and ce_row is not None and not fused
        g = buffer("q").copy_(log_q) if keep_log_s else log_q
        ce_in = ce_row if fused else None
        div, g = _divergence_and_grad(logits, teacher, g, scale, ce_in, options, buffer)
    if ce_row is not None:
        if not fused:  # + (1 - alpha) s / denom
            s = log_s.exp_()  # softmax(z); log s is not read after this
            g = s.mul_(ce_row) if g is None else g.addcmul_(s, ce_row)
        g.scatter_add_(-1, labels, -ce_row)  # - (1 - alpha) onehot(y) / denom
    return div, ce, g


def _student_log_probs(
    logits: Tensor, temperature: float, need_log_q: bool, buffer: Callable[[str], Tensor]
) -> tuple[Tensor, Tensor | None]:
    """(log softmax(z) for the CE, log softmax(z / T) for the divergence, None unless
    need_log_q) in (n, V) buffers; at T = 1 both are the same tensor."""
    z = buffer("z").copy_(logits)  # (n, V); fp32 for bf16 logits
    if temperature == 1.0:
        log_q = _log_probs_into(z, temperature, buffer("log_q"))
        return log_q, log_q
    log_s = torch.log_softmax(z, dim=-1, out=buffer("log_s"))
    return log_s, _log_probs_into(z, temperature, buffer("log_q")) if need_log_q else None


def _divergence_and_grad(
    logits: Tensor,
    teacher: Teacher,
    log_q: Tensor,
    scale: Tensor | None,
    ce_row: Tensor | None,
    options: LossOptions,
    buffer: Callable[[str], Tensor],
) -> tuple[Tensor, Tensor | None]:
    """Per-row D and scale * dD/du (+ ce_row * q, at T = 1 where q = s) against a dense teacher
    (forward or reverse KL); log_q is overwritten (it becomes G), buffer(role) gives (n, V)
    buffers."""
    teacher = aligned_teacher(teacher, logits, tokenizer_vocab_size=options.tokenizer_vocab_size)
    if isinstance(teacher, Tensor):  # (n, V) log p, floored; the student's z is free again
        log_p = _log_probs_into(buffer("z").copy_(teacher), options.temperature, buffer("log_p"))
    else:  # several teachers, mixed as kd.losses mixes them
        log_p = teacher_log_probs(teacher, options, log_q.dtype)
    reverse = options.divergence == "reverse_kl"
    return _dense_kl_and_grad(log_p, log_q, scale, ce_row, reverse=reverse, p=buffer("p"))


def _dense_kl_and_grad(
    log_p: Tensor,
    log_q: Tensor,
    scale: Tensor | None,
    ce_row: Tensor | None,
    *,
    reverse: bool,
    p: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """Per-row forward KL (reverse KL if `reverse`) and scale * dD/du + ce_row * q (None when
    scale is None; ce_row None adds nothing).

    log_p, log_q: (n, V) floored log-probs of teacher and student at T, both overwritten (log_q
    becomes G); p: an (n, V) buffer for a third tensor. scale: (n, 1), alpha T / denom; ce_row:
    (n, 1), (1 - alpha) / denom, given at T = 1 only (where q is the CE's softmax s). The
    formulas are derived in `analytic_loss_and_grad`.
    """
    if not reverse:
        p = torch.exp(log_p, out=p)
        div = log_p.sub_(log_q).mul_(p).sum(-1)  # D = sum_v p (log p - log q)
        if scale is None:
            return div, None
        q_factor = scale if ce_row is None else scale + ce_row  # (n, 1)
        return div, log_q.exp_().mul_(q_factor).addcmul_(p, scale, value=-1.0)  # scale (q - p)
    log_ratio = log_p.sub_(log_q).neg_()  # log q - log p
    q = log_q.exp_()
    div = torch.mul(q, log_ratio, out=p).sum(-1)  # D = sum_v q (log q - log p)
    if scale is None:
        return div, None
    factor = log_ratio.sub_(div.unsqueeze(-1)).mul_(scale)  # scale (log q - log p - D)
    return div, q.mul_(factor if ce_row is None else factor.add_(ce_row))  # scale q (...)


def _topk_forward_kl_and_grad(
    logits: Tensor,
    teacher: TopK,
    labels: Tensor,
    scale: Tensor | None,
    ce_row: Tensor | None,
    temperature: float,
    buffer: Callable[[str], Tensor],
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(per-row forward KL over `kd.losses.topk_buckets`, per-row CE, G or None) from the
    chunk's logits z, with G = scale * dD/du + ce_row * (s - onehot(y)) (labels (n, 1), ignored
    tokens at 0; scale and ce_row as in `analytic_loss_and_grad`, None: no such term).

    The buckets are the teacher's k tokens S and one tail: P_i = p_i, Q_i = q_i for i in S,
    P_tail = 1 - sum_S p_i (clamped at 0) and Q_tail = sum_{v not in S} q_v, with
    `topk_buckets`' floors, so
        D = sum_{i in S} P_i (log P_i - log Q_i) + P_tail (log P_tail - log Q_tail).
    With d log q_i/du_j = delta_ij - q_j and dQ_tail/du_j = q_j [j not in S] - Q_tail q_j, and
    P_sum = sum_S P_i + P_tail (1 up to the cache's rounding; the clamp can leave it above 1),
        dD/du_j = P_sum q_j - P_j                                    j in S
        dD/du_j = P_sum q_j - P_tail q_j / Q_tail
                = w_j (P_sum Q_tail - P_tail),  w_j = q_j / Q_tail    j not in S.
    (At T = 1 and P_sum = 1: q - p on S and q (1 - P_tail / Q_tail) elsewhere.) w_j, student j's
    share of the student's tail, is exp(u_j - m) / sum_{v not in S} exp(u_v - m) with m the
    largest u off S: never 0 / 0, even where Q_tail underflows (the student puts all its mass
    on S). At T = 1, q is the CE's softmax s, and its c s (c = ce_row) joins both: c q_j on S,
    w_j c Q_tail off S.

    Only the tail needs (n, V) passes, and they also give the log-probs: u = z / T is copied to
    a buffer with S's entries at -inf, then e = exp(u - m), its row sums, and one multiply that
    turns e into G off S. logsumexp over the tail is m + log sum e, over all V it is that
    logaddexp'd with the k values of S, and log Q_tail, log q on S and log s_y follow per row.
    (A log-softmax over V first, as for dense teachers, took 1.6-2.7x the CPU time.) At
    T != 1 the CE's s = softmax(z) is another distribution and takes passes of its own.
    Without a tail (k = V) or where every tail entry is -inf (masked vocab rows), sum e = 0:
    log Q_tail is floored as `topk_buckets` floors it, and G = 0 off S. An entry off S masked
    to -inf has e = 0 and G = 0, as in autograd (whose gradient through the floor is 0).
    """
    ids = teacher.ids.long()  # (n, k)
    u = buffer("z").copy_(logits)  # (n, V) in the compute dtype
    z_y = u.gather(-1, labels)  # (n, 1) the label's logit
    if temperature != 1.0:
        u.div_(temperature)
    floor = torch.finfo(u.dtype).min
    u_k = u.gather(-1, ids)  # (n, k)
    # m: the tail's max, the floor where it has no finite entry (no -inf - -inf below)
    m = u.scatter_(-1, ids, float("-inf")).amax(-1, keepdim=True).clamp_(min=floor)  # (n, 1)
    e = u.sub_(m).exp_()  # (n, V): exp(u_j - m) off S, 0 on S
    e_sum = e.sum(-1, keepdim=True)  # (n, 1): >= 1 (the max gives exp(0)), or 0 with no tail
    lse_tail = e_sum.log().add_(m)  # (n, 1) logsumexp of u off S; -inf with no tail
    lse = torch.logaddexp(u_k.logsumexp(-1, keepdim=True), lse_tail)  # (n, 1) over all V
    log_q_k, log_q_tail = floor_log_probs(u_k - lse), floor_log_probs(lse_tail - lse)
    log_p_b, log_q_b = topk_buckets_of(teacher, log_q_k, log_q_tail)  # (n, k + 1) each
    div = forward_kl(log_p_b, log_q_b)  # (n,) as in `loss_sums`
    unit = temperature == 1.0  # q is the CE's softmax s
    if unit:
        log_s_y = floor_log_probs(z_y - lse)  # (n, 1)
    else:  # s = softmax(z) = exp_z / s_sum
        exp_z = buffer("s").copy_(logits)  # (n, V)
        top = exp_z.amax(-1, keepdim=True)  # (n, 1)
        s_sum = exp_z.sub_(top).exp_().sum(-1, keepdim=True)  # (n, 1)
        log_s_y = floor_log_probs(z_y - top - s_sum.log())
    ce = -log_s_y.squeeze(-1)  # (n,)
    if scale is None and ce_row is None:
        return div, ce, None
    sc = 0.0 if scale is None else scale  # (n, 1)
    c = ce_row if ce_row is not None and unit else 0.0  # (n, 1): the CE's c q, at T = 1
    p_b = log_p_b.exp()  # (n, k + 1)
    p_sum = p_b.sum(-1, keepdim=True)  # (n, 1)
    q_tail, q_k = log_q_tail.exp(), log_q_k.exp()  # (n, 1), (n, k)
    # off S: w (sc (P_sum Q_tail - P_tail) + c Q_tail), with w = e / sum e
    g = e.mul_((sc * (p_sum * q_tail - p_b[:, -1:]) + c * q_tail) / e_sum.clamp(min=1.0))
    g.scatter_(-1, ids, sc * (p_sum * q_k - p_b[:, :-1]) + c * q_k)  # on S: P_sum q - P + c q
    if ce_row is not None:
        if not unit:
            g.addcmul_(exp_z.div_(s_sum), ce_row)  # + c s
        g.scatter_add_(-1, labels, -ce_row)  # - c onehot(y)
    return div, ce, g
