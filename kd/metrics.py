"""Token-level distillation metrics, teacher-forced, as pure functions plus one loop.

Both models read the same text (prompt + a fixed response, e.g. the teacher's own answer), and
at every response token t we compare their next-token distributions p_t (teacher) and q_t
(student); the KL is the quantity logit distillation (Hinton et al., arXiv 1503.02531)
minimizes:

    KL   = mean_t sum_v p_t(v) (log p_t(v) - log q_t(v))   forward KL(teacher || student), nats
    PPL  = exp(mean_t -log q_t(y_t))                        student perplexity of the text
    top1 = mean_t [argmax_v q_t(v) == argmax_v p_t(v)]      top-1 agreement

`token_metrics` returns *sums* over the valid tokens of one batch, so batches add exactly and
ranks combine with one all-reduce(SUM); `summarize` turns the totals into means:

    sums = None
    for batch in loader:
        sums = accumulate(sums, token_metrics(s_logits, t_logits, labels))
    print(summarize(sums))      # {"kl": ..., "nll": ..., "ppl": ..., "top1_agreement": ...}

`teacher_forced_metrics` is that loop over a list of examples, in one process or split over
ranks; train.py's held-out evaluation and kd/evaluate.py (the demo's table) both call it.

Run the tests: `.venv/bin/python -m pytest -q tests/test_metrics.py`.
"""

import math
from collections.abc import Callable

import torch

from kd.data import IGNORE, Example, collate
from kd.model import Transformer


@torch.no_grad()
def token_metrics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_tokens: int = 1024,
) -> dict[str, torch.Tensor]:
    """Sums of per-token metrics over the valid tokens of one batch.

    student_logits, teacher_logits: (B, T, V); logits[:, t] predicts labels[:, t] (shift
    before calling). labels: (B, T) token ids, `ignore_index` where a position does not count
    (prompt, padding). teacher_logits may be None: then only the NLL and the count are returned.
    chunk_tokens: how many tokens' full-vocabulary softmaxes exist at once; 1024 tokens x 49152
    vocab is 200 MB per fp32 temporary, so a large eval batch does not multiply peak memory.

    Returns 0-d float64 tensors on the logits' device:
      "nll":    sum_t -log q(y_t)                                     (student NLL)
      "tokens": number of valid tokens
      "kl":     sum_t sum_v p_t(v) (log p_t(v) - log q_t(v))   (forward KL, teacher || student)
      "top1":   sum_t [argmax_v q_t(v) == argmax_v p_t(v)]            (top-1 agreement count)
    Softmaxes are taken in fp32; the sums are accumulated in float64 so that summing many
    batches is exact to well below the metrics' resolution.
    """
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError(
            f"token_metrics: expected logits (B, T, V) and labels (B, T), got "
            f"{tuple(student_logits.shape)} and {tuple(labels.shape)}"
        )
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"token_metrics: teacher logits {tuple(teacher_logits.shape)} differ from student "
            f"logits {tuple(student_logits.shape)}; both models must share one vocabulary"
        )
    # Flat indices of the valid tokens; labels, not input_ids, carry the mask. nonzero() is a
    # host sync (its size is data-dependent): once per eval batch, outside the training step.
    rows = (labels != ignore_index).flatten().nonzero().squeeze(-1)  # (N,)
    flat_labels = labels.flatten()  # (B*T,)
    s_flat = student_logits.flatten(0, 1)  # (B*T, V), a view
    t_flat = None if teacher_logits is None else teacher_logits.flatten(0, 1)
    zero = torch.zeros((), dtype=torch.float64, device=student_logits.device)
    sums = {"nll": zero, "tokens": zero + rows.numel()}
    if t_flat is not None:
        sums |= {"kl": zero, "top1": zero}
    for idx in rows.split(chunk_tokens):
        log_q = torch.log_softmax(s_flat[idx].float(), dim=-1)  # (n, V)
        nll = -log_q.gather(-1, flat_labels[idx].unsqueeze(-1)).squeeze(-1)  # (n,)
        sums["nll"] = sums["nll"] + nll.double().sum()
        if t_flat is None:
            continue
        log_p = torch.log_softmax(t_flat[idx].float(), dim=-1)  # (n, V)
        p = log_p.exp()
        # KL(p || q) = sum_v p (log p - log q). Where p = 0 (a -inf-masked teacher logit) the
        # term is 0 by convention; without the `where`, 0 * (-inf - x) would be NaN.
        kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)  # (n,)
        agree = log_q.argmax(-1) == log_p.argmax(-1)  # (n,)
        sums["kl"] = sums["kl"] + kl.double().sum()
        sums["top1"] = sums["top1"] + agree.sum().double()
    return sums


def accumulate(
    total: dict[str, torch.Tensor] | None, sums: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Add one batch's `token_metrics` sums to a running total (None starts a new total)."""
    if total is None:
        return dict(sums)
    if total.keys() != sums.keys():
        raise ValueError(
            f"accumulate: metric keys differ ({sorted(total)} vs {sorted(sums)}); pass "
            f"teacher logits for every batch or for none"
        )
    return {k: total[k] + sums[k] for k in total}


def summarize(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means from (possibly all-reduced) sums: nll, ppl = exp(mean NLL), and with a teacher
    kl (mean per-token forward KL, nats) and top1_agreement (fraction in [0, 1])."""
    n = float(sums["tokens"])  # host sync: once per evaluation, not in a hot loop
    if n == 0:
        raise ValueError("summarize: no valid tokens (every label is ignore_index)")
    nll = float(sums["nll"]) / n
    out = {"nll": nll, "ppl": math.exp(nll), "tokens": n}
    if "kl" in sums:
        out["kl"] = float(sums["kl"]) / n
        out["top1_agreement"] = float(sums["top1"]) / n
    return out


@torch.no_grad()
def teacher_forced_metrics(
    model: Transformer,
    examples: list[Example],
    *,
    teacher: Transformer | None = None,
    pad_id: int,
    batch_size: int = 8,
    vocab: int | None = None,
    max_batches: int = 0,
    rank: int = 0,
    world_size: int = 1,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """nll, ppl, tokens (and with a teacher: kl, top1_agreement) over the labelled tokens of
    `examples`, batched by kd.data.collate (right padding, which carries no labels).

    teacher: None, another model, or `model` itself (its own row in a table): its logits are
      then reused, which gives KL 0 and agreement 1 exactly, without a second forward.
    vocab: logit rows compared; default the shared prefix min(V_model, V_teacher), since
      padded vocabularies (e.g. rounded up to a multiple of 64) differ only past the
      tokenizer, in rows that are never real tokens.
    max_batches: cap on the rounds of batches (0: all examples).
    rank, world_size, all_reduce_sum: split over ranks. Rank r takes examples [r B, (r + 1) B)
      of each group of world_size * B. Every rank runs the same number of forwards (FSDP
      all-gathers need all of them): a rank with nothing left runs a batch with every label
      ignored. all_reduce_sum (kd.parallel.all_reduce_sum) sums the stacked totals over ranks
      once at the end; None in one process, so this file needs no torch.distributed.
    device: where the batches go; default the device of the model's output weight.
    """
    if not examples:
        raise ValueError("teacher_forced_metrics: no examples to evaluate")
    if vocab is None:
        vocab = min(m.config.vocab_size for m in (model, teacher) if m is not None)
    device = model.head_weight.device if device is None else device
    per_round = batch_size * world_size
    rounds = math.ceil(len(examples) / per_round)
    if max_batches:
        rounds = min(rounds, max_batches)
    sums = None
    for r in range(rounds):
        start = r * per_round + rank * batch_size
        mine = examples[start : start + batch_size]
        batch = collate(mine or examples[:1], pad_id=pad_id)
        if not mine:
            batch["labels"].fill_(IGNORE)
        input_ids, labels = (batch[k].to(device) for k in ("input_ids", "labels"))  # (B, T) each
        s_logits = model(input_ids)[..., :vocab]  # (B, T, V)
        t_logits = None
        if teacher is model:  # the same logits: KL exactly 0, agreement exactly 1
            t_logits = s_logits
        elif teacher is not None:
            t_logits = teacher(input_ids)[..., :vocab]  # (B, T, V)
        sums = accumulate(sums, token_metrics(s_logits, t_logits, labels, ignore_index=IGNORE))
    if all_reduce_sum is not None:
        keys = sorted(sums)
        totals = all_reduce_sum(torch.stack([sums[k] for k in keys]))  # (len(keys),) float64
        sums = dict(zip(keys, totals))
    return summarize(sums)
