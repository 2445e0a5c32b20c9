"""Memory-bounded distillation loss: output head and loss chunked over tokens.

With N tokens and a vocabulary V, the (N x V) fp32 logits of student and teacher are the
memory bottleneck of distillation (N = 8192, V = 128256: 4 GiB per copy, and a naive
forward + backward keeps several copies). `chunked_distillation_loss` takes hidden states and
head weights instead of logits and walks the tokens `chunk_size` rows at a time: per chunk it
computes both heads' logits, the loss (`kd.losses.loss_sums`, the same code as the dense
`distillation_loss`), and, by autograd on that chunk alone, the gradient of the loss with
respect to the chunk's logits G (n x V). Then

    dL/dh_chunk = G W          (n x H)     dL/dW += G^T h_chunk      (V x H)

and the chunk's logits are freed. The loss is a sum over tokens divided by a count known up
front, so the gradients are final when the forward ends (the approach of Liger-Kernel's fused
linear losses, arXiv 2410.10989): backward only scales them by the incoming gradient, and no
second pass over the head is needed. Peak extra memory is one chunk of logits and its
intermediates, instead of all of them.

dtypes: hidden states and weights may be bf16 (FSDP2 mixed precision): the matmuls run in that
dtype, softmax and loss in fp32 (float64 for float64 inputs), the gradients come back in the
input dtypes (dL/dW accumulated in fp32 across chunks).

Tests: `.venv/bin/python -m pytest -q tests/test_chunked_loss.py`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from kd.losses import Teacher, TopK, check_teacher_vocab, loss_sums, metrics_from_sums, token_count

Tensor = torch.Tensor


class _ChunkedHeadLoss(torch.autograd.Function):
    """Loss over token chunks; gradients wrt hidden and head weight computed during forward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,  # (N, H)
        weight: Tensor,  # (V, H)
        labels: Tensor,  # (N,)
        denom: Tensor,  # 0-dim: the global token count
        teacher_chunk: Callable[[int, int], Teacher],
        chunk_size: int,
        options: dict[str, Any],
        grad_hidden: bool,
        grad_weight: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n_tokens = hidden.shape[0]
        d_hidden = torch.empty_like(hidden) if grad_hidden else None
        acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        d_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if grad_weight else None
        sums = torch.zeros(3, dtype=acc_dtype, device=hidden.device)  # (total, divergence, CE) over chunks
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            h = hidden[start:end]  # (n, H)
            logits = h @ weight.T  # (n, V) in the input dtype; forward() runs without autograd
            with torch.enable_grad():
                logits.requires_grad_(grad_hidden or grad_weight)
                total, div_sum, ce_sum = loss_sums(logits, teacher_chunk(start, end), labels[start:end], **options)
                if logits.requires_grad:
                    (g,) = torch.autograd.grad(total / denom, logits)  # (n, V) = dL/dlogits
            if grad_hidden:
                d_hidden[start:end] = g @ weight
            if grad_weight:
                d_weight.addmm_(g.T.to(d_weight.dtype), h.to(d_weight.dtype))
            sums += torch.stack([total.detach(), div_sum.detach(), ce_sum.detach()]).to(sums.dtype)
            del logits  # the chunk's logits and their graph go here: one chunk alive at a time
        # Kept as attributes, not save_for_backward: they are our own results, and backward scales
        # them in place and drops them, instead of allocating another (V x H) copy.
        ctx.d_hidden, ctx.d_weight = d_hidden, None if d_weight is None else d_weight.to(weight.dtype)
        div_sum, ce_sum = sums[1].clone(), sums[2].clone()
        ctx.mark_non_differentiable(div_sum, ce_sum)
        return sums[0] / denom, div_sum, ce_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, _grad_div: Tensor, _grad_ce: Tensor) -> tuple[Tensor | None, ...]:
        d_hidden, d_weight = ctx.d_hidden, ctx.d_weight  # dL/dh and dL/dW, final since the forward
        del ctx.d_hidden, ctx.d_weight
        for d in (d_hidden, d_weight):
            if d is not None:
                d.mul_(grad_loss.to(d.dtype))  # chain rule through the scalar loss
        return d_hidden, d_weight, None, None, None, None, None, None, None


def chunked_distillation_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor | Sequence[Tensor] | None,
    teacher_head_weight: Tensor | Sequence[Tensor] | None,
    labels: Tensor,
    *,
    chunk_size: int = 256,
    teacher_logits: Teacher | None = None,
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
    """`distillation_loss` of (student_hidden @ W_s^T, teacher_hidden @ W_t^T), one chunk at a time.

    student_hidden: (..., H) final hidden states (after the last norm); student_head_weight
        (V, H). Leading dims are flattened; labels (...) align with them.
    teacher_hidden, teacher_head_weight: (..., H_t) and (V_t, H_t), or lists of them for several
        teachers (combined as in `distillation_loss`, with `teacher_weights`). The teacher part
        runs without gradients. V_t > V only with `tokenizer_vocab_size` (rows are sliced).
    teacher_logits: instead of teacher hidden states (pass None, None for those): precomputed
        logits (..., V_t), a list of them, or a `TopK` of cached top-k log-probs. No teacher at
        all (None, None and no teacher_logits) is plain SFT and needs alpha = 0.
    chunk_size: tokens per chunk; peak extra memory is a few (chunk_size x V) fp32 buffers
        (measured ~0.4 GiB at 256 for V = 49152 and 128256) plus dL/dW in fp32, whatever the
        token count. 256 is Liger-Kernel's choice for V / H ~ 64; larger chunks run the
        matmuls a little more efficiently.

    Value and gradients equal `distillation_loss` on the full logits. All other options are
    those of `distillation_loss`. Returns (loss, metrics) with detached metric tensors.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (tokens per chunk, e.g. 1024)")
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, H)
    flat_labels = labels.reshape(-1)  # (N,)
    if flat_labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match student_hidden {tuple(student_hidden.shape)}")
    teacher_chunk = _teacher_chunks(
        teacher_hidden,
        teacher_head_weight,
        teacher_logits,
        n_tokens=hidden.shape[0],
        student_vocab=student_head_weight.shape[0],
        tokenizer_vocab_size=tokenizer_vocab_size,
    )
    valid_count, denom = token_count(flat_labels, num_tokens, ignore_index=ignore_index)
    options = dict(
        divergence=divergence,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
        teacher_weights=teacher_weights,
        teacher_mixture=teacher_mixture,
        tokenizer_vocab_size=tokenizer_vocab_size,
        **divergence_kwargs,
    )
    grad_on = torch.is_grad_enabled()
    loss, div_sum, ce_sum = _ChunkedHeadLoss.apply(
        hidden,
        student_head_weight,
        flat_labels,
        denom,
        teacher_chunk,
        chunk_size,
        options,
        grad_on and hidden.requires_grad,
        grad_on and student_head_weight.requires_grad,
    )
    return loss, metrics_from_sums(div_sum, ce_sum, valid_count)


def _teacher_chunks(
    teacher_hidden: Tensor | Sequence[Tensor] | None,
    teacher_head_weight: Tensor | Sequence[Tensor] | None,
    teacher_logits: Teacher | None,
    *,
    n_tokens: int,
    student_vocab: int,
    tokenizer_vocab_size: int | None,
) -> Callable[[int, int], Teacher]:
    """A function (start, end) -> the teacher for those token rows, in the form `loss_sums` takes."""
    if teacher_logits is None and teacher_hidden is None and teacher_head_weight is None:
        return lambda s, e: None  # no teacher: plain SFT, allowed with alpha = 0 only
    if (teacher_logits is None) == (teacher_hidden is None or teacher_head_weight is None):
        raise ValueError(
            "pass either teacher_hidden and teacher_head_weight, or teacher_logits= (with None, None "
            "for the teacher hidden states and head weight), not both and not neither"
        )
    if teacher_logits is not None:
        if isinstance(teacher_logits, TopK):
            ids = teacher_logits.ids.reshape(n_tokens, -1)  # (N, k)
            logprobs = teacher_logits.logprobs.reshape(n_tokens, -1)  # (N, k)
            return lambda s, e: TopK(ids[s:e], logprobs[s:e])
        single = isinstance(teacher_logits, Tensor)
        flat = [t.reshape(n_tokens, t.shape[-1]) for t in ([teacher_logits] if single else teacher_logits)]  # (N, V_t)
        return lambda s, e: flat[0][s:e] if single else [t[s:e] for t in flat]

    single = isinstance(teacher_hidden, Tensor)
    hiddens = [teacher_hidden] if single else list(teacher_hidden)
    weights = [teacher_head_weight] if isinstance(teacher_head_weight, Tensor) else list(teacher_head_weight)
    if len(hiddens) != len(weights):
        raise ValueError(f"{len(hiddens)} teacher_hidden but {len(weights)} teacher_head_weight; pass one per teacher")
    for w in weights:
        check_teacher_vocab(student_vocab, w.shape[0], tokenizer_vocab_size)
    hiddens = [h.reshape(n_tokens, h.shape[-1]) for h in hiddens]  # (N, H_t)
    weights = [w[:student_vocab] for w in weights]  # padding rows beyond the student's vocab dropped

    def chunk(start: int, end: int) -> Teacher:
        with torch.no_grad():
            logits = [h[start:end] @ w.T for h, w in zip(hiddens, weights)]  # (n, V) each
        return logits[0] if single else logits

    return chunk
