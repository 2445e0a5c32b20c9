"""Memory-bounded distillation loss: output head and loss chunked over tokens.

With N tokens and a vocabulary V, the (N x V) fp32 logits of student and teacher are the
memory bottleneck of distillation (N = 8192, V = 128256: 4 GiB per copy, and a naive
forward + backward keeps several copies). `chunked_distillation_loss` takes hidden states and
head weights instead of logits and walks the tokens `chunk_size` rows at a time: per chunk it
computes both heads' logits, the loss and the gradient of the loss with respect to the chunk's
logits G (n x V). Then

    dL/dh_chunk = G W          (n x H)     dL/dW += G^T h_chunk      (V x H)

and the chunk's logits are freed. The loss is a sum over tokens divided by a count known up
front, so the gradients are final when the forward ends (the approach of Liger-Kernel's fused
linear losses, arXiv 2410.10989): backward only scales them by the incoming gradient, and no
second pass over the head is needed. Peak extra memory is one chunk of logits and its
intermediates, instead of all of them. Those are `Scratch` buffers, written chunk after chunk
(and on a CPU, through kd.offpolicy.KDLoss, micro-batch after micro-batch) rather than
allocated anew: on a CPU a fresh tensor of that size is faulted in page by page.

G comes one of two ways, chosen in `_loss_and_logit_grad` (the one dispatch point):
- analytic (kd/logit_grads.py), for forward KL and reverse KL against dense teacher logits
  (one teacher or several), for forward KL against a `TopK` teacher (cached top-k log-probs and
  a tail bucket), and for plain SFT (alpha = 0, no teacher); the formulas are derived there.
  It skips autograd's saved intermediates and backward kernels and works in place: ~2x less
  CPU time per chunk than autograd (256 x 49152, measured); top-k forward KL with k = 32 on
  bf16 logits, 2 Xeon cores: 13 vs 318 ms at T = 1, 39 vs 460 ms at T = 2. Its log-probs and
  top-k buckets come from kd.losses' functions; the tests check its sums and G against the
  autograd path.
- autograd on the chunk's `kd.losses.loss_sums` (the code of the dense `distillation_loss`),
  for every other divergence, dense or top-k.

dtypes: hidden states and weights may be bf16 (FSDP2 mixed precision): the matmuls run in that
dtype, softmax and loss in fp32 (float64 for float64 inputs), the gradients come back in the
input dtypes (dL/dW: each chunk's G^T h in the weights' dtype, summed in fp32 across chunks).

Use (the settings are those of `kd.losses.distillation_loss`, in a `kd.losses.LossOptions`):

    options = LossOptions(divergence="forward_kl", temperature=2.0, alpha=0.5)
    loss, metrics = chunked_distillation_loss(h, head_w, teacher_h, teacher_head_w, labels, options)

Tests: `.venv/bin/python -m pytest -q tests/test_chunked_loss.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from kd.cross_tokenizer import CrossVocab, SharedVocab
from kd.logit_grads import ANALYTIC_DIVERGENCES, Scratch, analytic_loss_and_grad
from kd.losses import (
    LossOptions,
    Teacher,
    TopK,
    check_teacher_vocab,
    compute_dtype,
    loss_sums,
    metrics_from_sums,
    token_count,
)
from kd.model import Head


class _ChunkedHeadLoss(torch.autograd.Function):
    """Loss over token chunks; gradients wrt hidden and head weight computed during forward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,  # (N, H)
        weight: Tensor,  # (V, H)
        softcap: float | None,  # the head's logit cap c, or None
        labels: Tensor,  # (N,)
        denom: Tensor,  # 0-dim: the global token count
        teacher_chunk: Callable[[int, int], Teacher],
        chunk_size: int,
        options: LossOptions,
        grad_hidden: bool,
        grad_weight: bool,
        scratch: Scratch,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n_tokens = hidden.shape[0]
        d_hidden = torch.empty_like(hidden) if grad_hidden else None
        acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        d_weight = None  # dL/dW, accumulated over chunks in fp32 (float64 for float64 inputs)
        if grad_weight:
            d_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        # (total, divergence, CE) summed over chunks
        sums = torch.zeros(3, dtype=acc_dtype, device=hidden.device)
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            h = hidden[start:end]  # (n, H)
            # (n, V) in the input dtype; forward() runs without autograd
            out = scratch("logits", (end - start, weight.shape[0]), h.dtype, h.device)
            logits = torch.mm(h, weight.T, out=out)
            if softcap is not None:  # z = c tanh(u / c), and dz/du = 1 - tanh(u / c)^2 below
                tanh = torch.tanh(logits.to(compute_dtype(logits)) / softcap)  # (n, V) fp32
                logits = (softcap * tanh).to(logits.dtype)
            # g: (n, V) = dL/dlogits in the compute dtype (fp32; float64 for float64), or None
            total, div_sum, ce_sum, g = _loss_and_logit_grad(
                logits,
                teacher_chunk(start, end),
                labels[start:end],
                denom,
                options,
                need_grad=grad_hidden or grad_weight,
                scratch=scratch,
            )
            if softcap is not None:
                if g is not None:
                    g.mul_(tanh.square_().neg_().add_(1.0))  # dL/du = dL/dz (1 - tanh^2)
                del tanh
            g_w = g  # G in the weight's dtype (bf16 under mixed precision), or None
            if g is not None and g.dtype != weight.dtype:
                g_w = scratch("g", g.shape, weight.dtype, g.device).copy_(g)
            if grad_hidden:
                d_hidden[start:end] = g_w @ weight  # G W
            if grad_weight:
                _add_weight_grad(d_weight, g_w if g_w.dtype == torch.bfloat16 else g, h, scratch)
            sums += torch.stack([total, div_sum, ce_sum]).to(sums.dtype)
            del logits, g  # the chunk's logits and gradient go here: one chunk alive at a time
        # Kept as attributes, not save_for_backward: they are our own results, and backward scales
        # them in place and drops them, instead of allocating another (V x H) copy.
        ctx.d_hidden = d_hidden
        ctx.d_weight = None if d_weight is None else d_weight.to(weight.dtype)
        div_sum, ce_sum = sums[1].clone(), sums[2].clone()
        ctx.mark_non_differentiable(div_sum, ce_sum)
        return sums[0] / denom, div_sum, ce_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad_loss: Tensor, _grad_div: Tensor, _grad_ce: Tensor
    ) -> tuple[Tensor | None, ...]:
        d_hidden, d_weight = ctx.d_hidden, ctx.d_weight  # dL/dh and dL/dW, final since the forward
        del ctx.d_hidden, ctx.d_weight
        for d in (d_hidden, d_weight):
            if d is not None:
                d.mul_(grad_loss.to(d.dtype))  # chain rule through the scalar loss
        return d_hidden, d_weight, None, None, None, None, None, None, None, None, None


def _add_weight_grad(d_weight: Tensor, g: Tensor, h: Tensor, scratch: Scratch) -> None:
    """d_weight += G^T h: one chunk's (V, H) share of dL/dW, summed over chunks in fp32.

    G in bf16 (mixed precision): the product runs in bf16, as autograd's backward of a bf16
    linear does (fp32 accumulation inside the matmul, the (V, H) result rounded to bf16 once per
    chunk), and the chunks are summed in fp32. Why not one fp32 product: without TF32 an H100
    multiplies in fp32 at ~1/15 of its bf16 rate (67 vs 989 TFLOP/s), and on 2 Xeon cores with
    AMX one 256 x 49152 x 576 chunk took 60-80 ms in fp32, 18-33 ms in bf16. On a CPU the
    bf16 -> fp32 add goes a block of rows at a time through a reused buffer: PyTorch's CPU add of
    a bf16 tensor into an fp32 one is unvectorized (60 ms for 49152 x 576), and a whole fp32
    copy of the (V, H) product would be another full-size buffer; a GPU adds it in one kernel.
    Other dtypes: one product in the accumulator's dtype (fp16 keeps it: G / denom underflows
    in fp16).
    """
    if g.dtype != torch.bfloat16:
        d_weight.addmm_(g.T, h.to(d_weight.dtype))
        return
    product = scratch("dw", d_weight.shape, g.dtype, g.device)  # (V, H) bf16
    torch.mm(g.T, h.to(g.dtype), out=product)
    if g.device.type != "cpu":
        d_weight.add_(product)
        return
    rows = max(1, 2**21 // d_weight.shape[1])  # 8 MiB of fp32 per block
    block = scratch("dw_block", (rows, d_weight.shape[1]), d_weight.dtype, g.device)
    for start in range(0, d_weight.shape[0], rows):
        end = min(start + rows, d_weight.shape[0])
        d_weight[start:end].add_(block[: end - start].copy_(product[start:end]))


def _loss_and_logit_grad(
    logits: Tensor,
    teacher: Teacher | None,
    labels: Tensor,
    denom: Tensor,
    options: LossOptions,
    *,
    need_grad: bool,
    scratch: Scratch,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(total, div, CE) sums over the chunk's valid tokens, and G = d(total / denom)/dlogits in
    the compute dtype (`kd.losses.compute_dtype`).

    G is None without `need_grad`. The dispatch point: the analytic gradient where it is written
    out (forward/reverse KL against dense teacher logits, forward KL against a top-k teacher,
    or SFT: no teacher, alpha = 0), autograd through `loss_sums` otherwise. Both give the same
    values and, up to rounding, the same G (tests/test_chunked_loss.py).
    """
    if teacher is None:
        analytic = options.alpha == 0.0
    elif isinstance(teacher, TopK):
        analytic = options.divergence == "forward_kl"
    else:
        analytic = options.divergence in ANALYTIC_DIVERGENCES
    if analytic:
        return analytic_loss_and_grad(
            logits, teacher, labels, denom, options, need_grad=need_grad, scratch=scratch
        )
    return _autograd_loss_and_grad(logits, teacher, labels, denom, options, need_grad=need_grad)


def _autograd_loss_and_grad(
    logits: Tensor,
    teacher: Teacher | None,
    labels: Tensor,
    denom: Tensor,
    options: LossOptions,
    *,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """`loss_sums` on the chunk, and G by autograd on that chunk alone (any divergence, teacher)."""
    with torch.enable_grad():
        logits = logits.detach().requires_grad_(need_grad)
        total, div_sum, ce_sum = loss_sums(logits, teacher, labels, options)
        g = torch.autograd.grad(total / denom, logits)[0] if need_grad else None  # (n, V)
    if g is not None:
        g = g.to(compute_dtype(logits))
    return total.detach(), div_sum.detach(), ce_sum.detach(), g


def chunked_distillation_loss(
    student_hidden: Tensor,
    student_head: Head | Tensor,
    teacher_hidden: Tensor | Sequence[Tensor] | None,
    teacher_head: Head | Tensor | Sequence[Head | Tensor] | None,
    labels: Tensor,
    options: LossOptions = LossOptions(),
    *,
    chunk_size: int = 256,
    teacher_logits: Teacher | None = None,
    num_tokens: int | Tensor | None = None,
    cross: tuple[Tensor, SharedVocab | None] | None = None,
    scratch: Scratch | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`distillation_loss` of (student_head(student_hidden), teacher_head(teacher_hidden)), chunk
    by chunk.

    student_hidden: (..., H) final hidden states (after the last norm); student_head: the
        model's `kd.model.Head` (weight (V, H) and the logit softcap, if any), or a bare (V, H)
        weight. Leading dims are flattened; labels (...) align with them.
    teacher_hidden, teacher_head: (..., H_t) and a Head or (V_t, H_t) weight, or lists of them
        for several teachers (combined as in `distillation_loss`, by options.teacher_mixture
        and options.teacher_weights). The teacher part runs without gradients. V_t > V only
        with options.tokenizer_vocab_size (the padding rows are sliced off).
    options: the divergence, T, alpha and the rest, as in `distillation_loss` (`LossOptions`).
    chunk_size: tokens per chunk; peak extra memory is a few (chunk_size x V) fp32 buffers
        (measured ~0.4 GiB at 256 for V = 49152 and 128256) plus dL/dW in fp32 (and, for bf16
        weights, one chunk's share of it in bf16), whatever the token count. 256 is
        Liger-Kernel's choice for V / H ~ 64; larger chunks run the matmuls a little more
        efficiently.
    teacher_logits: instead of teacher hidden states (pass None, None for those): precomputed
        logits (..., V_t), a list of them, or a `TopK` of cached top-k log-probs. No teacher at
        all (None, None and no teacher_logits) is plain SFT and needs options.alpha = 0.
    num_tokens: the divisor, as in `distillation_loss`.
    cross: a teacher of another vocabulary (options.divergence "uld" or "gold"): (known (...),
        which positions have an aligned teacher position, and the shared vocabulary for gold);
        teacher_hidden then holds, per student position, the aligned teacher position's state.
    scratch: the buffers the chunks reuse (`Scratch`); pass the same one on every call (as
        kd.offpolicy.KDLoss does on a CPU) to reuse them across calls too; default: new ones.

    Value and gradients equal `distillation_loss` on the full logits. Returns (loss, metrics)
    with detached metric tensors.
    """
    hidden, flat_labels = _flat_inputs(student_hidden, labels, chunk_size)  # (N, H), (N,)
    valid_count, denom = token_count(flat_labels, num_tokens, ignore_index=options.ignore_index)
    # Rows without a label (prompt, padding) add nothing to the loss or its gradients, so they
    # skip the heads: the chunks walk the labelled rows only. In chat data 30-50% of positions
    # are prompt or padding, and the four head matmuls (student logits, dL/dh, dL/dW, teacher
    # logits) are about a third of a KD step's FLOPs. (On a GPU, nonzero() is a host sync.)
    rows = (flat_labels != options.ignore_index).nonzero().squeeze(-1)  # (N_valid,)
    student_head = as_head(student_head)
    teacher_chunk = _teacher_chunks(
        teacher_hidden,
        teacher_head,
        teacher_logits,
        rows=rows,
        n_tokens=hidden.shape[0],
        student_vocab=student_head.weight.shape[0],
        tokenizer_vocab_size=options.tokenizer_vocab_size,
        cross=cross,
    )
    # (N_valid, H) and (N_valid,); autograd scatters dL/dh back to the N rows
    hidden, flat_labels = hidden[rows], flat_labels[rows]
    grad_on = torch.is_grad_enabled()
    loss, div_sum, ce_sum = _ChunkedHeadLoss.apply(
        hidden,
        student_head.weight,
        student_head.softcap,
        flat_labels,
        denom,
        teacher_chunk,
        chunk_size,
        options,
        grad_on and hidden.requires_grad,
        grad_on and student_head.weight.requires_grad,
        Scratch() if scratch is None else scratch,
    )
    return loss, metrics_from_sums(div_sum, ce_sum, valid_count)


def _flat_inputs(student_hidden: Tensor, labels: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Hidden states (N, H) and labels (N,) with their leading dims flattened, checked."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (tokens per chunk, e.g. 1024)")
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, H)
    flat_labels = labels.reshape(-1)  # (N,)
    if flat_labels.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match student_hidden "
            f"{tuple(student_hidden.shape)} in their leading dims"
        )
    return hidden, flat_labels


def as_head(head: Head | Tensor) -> Head:
    """A bare (V, H) weight as the uncapped Head it is."""
    return head if isinstance(head, Head) else Head(head)


def _teacher_chunks(
    teacher_hidden: Tensor | Sequence[Tensor] | None,
    teacher_head: Head | Tensor | Sequence[Head | Tensor] | None,
    teacher_logits: Teacher | None,
    *,
    rows: Tensor,
    n_tokens: int,
    student_vocab: int,
    tokenizer_vocab_size: int | None,
    cross: tuple[Tensor, SharedVocab | None] | None = None,
) -> Callable[[int, int], Teacher]:
    """A function (start, end) -> the teacher of token rows rows[start:end] of N = n_tokens.

    The teacher comes in the form `loss_sums` takes; rows are gathered per chunk, so no
    (N_valid x V) copy is made.
    """
    if teacher_logits is None and teacher_hidden is None and teacher_head is None:
        return lambda s, e: None  # no teacher: plain SFT, allowed with alpha = 0 only
    if (teacher_logits is None) == (teacher_hidden is None or teacher_head is None):
        raise ValueError(
            "pass either teacher_hidden and teacher_head, or teacher_logits= (with None, None "
            "for the teacher hidden states and head), not both and not neither"
        )
    if teacher_logits is not None:
        if isinstance(teacher_logits, TopK):
            ids = teacher_logits.ids.reshape(n_tokens, -1)  # (N, k)
            logprobs = teacher_logits.logprobs.reshape(n_tokens, -1)  # (N, k)
            return lambda s, e: TopK(ids[rows[s:e]], logprobs[rows[s:e]])
        single = isinstance(teacher_logits, Tensor)
        teachers = [teacher_logits] if single else teacher_logits
        flat = [t.reshape(n_tokens, t.shape[-1]) for t in teachers]  # (N, V_t) each
        return lambda s, e: flat[0][rows[s:e]] if single else [t[rows[s:e]] for t in flat]

    if cross is not None:  # another vocabulary: all its rows, and which positions are aligned
        known, shared = cross[0].reshape(n_tokens), cross[1]
        hidden, head = teacher_hidden.reshape(n_tokens, -1), as_head(teacher_head)

        def cross_chunk(start: int, end: int) -> CrossVocab:
            with torch.no_grad():
                logits = head(hidden[rows[start:end]])  # (n, V_t)
            return CrossVocab(logits, known[rows[start:end]], shared)

        return cross_chunk
    single = isinstance(teacher_hidden, Tensor)
    hiddens = [teacher_hidden] if single else list(teacher_hidden)
    one_head = isinstance(teacher_head, (Head, Tensor))
    heads = [as_head(h) for h in ([teacher_head] if one_head else teacher_head)]
    if len(hiddens) != len(heads):
        raise ValueError(
            f"{len(hiddens)} teacher_hidden but {len(heads)} teacher_head; pass one per teacher"
        )
    for head in heads:
        check_teacher_vocab(student_vocab, head.weight.shape[0], tokenizer_vocab_size)
    hiddens = [h.reshape(n_tokens, h.shape[-1]) for h in hiddens]  # (N, H_t)
    heads = [head.rows(student_vocab) for head in heads]  # padding rows past the student's vocab

    def chunk(start: int, end: int) -> Teacher:
        with torch.no_grad():
            logits = [head(h[rows[start:end]]) for h, head in zip(hiddens, heads)]  # (n, V) each
        return logits[0] if single else logits

    return chunk
