"""Off-policy distillation: the student learns on the data's text, the teacher grades each token.

Word-level KD (Hinton et al., arXiv 1503.02531, per token as Kim & Rush, arXiv 1606.07947):
at every trained position of a batch from the data, the loss compares the teacher's
next-token distribution p with the student's q,

    loss = sum_valid [alpha T^2 D(p || q) + (1 - alpha) CE(y)] / N,

N the valid (labelled) tokens of the whole optimizer step, over all micro-batches and ranks
(kd/losses.py has each D). The teacher is one of
  * live models, one or several (multi-teacher): their forward runs on each micro-batch, under
    no_grad, and gives final hidden states; the chunked loss applies their heads chunk by chunk;
  * a teacher cache (kd/teacher_cache.py): the teacher's top-k log-probs, read per micro-batch;
  * none: plain SFT (alpha = 0). On data the teacher wrote (generate.py), that is response
    distillation, sequence-level KD (Kim & Rush, arXiv 1606.07947).

A method, as train.py's loop drives it: `micro_batches(step)` is this rank's micro-batches of
optimizer step `step`, each carrying `num_tokens`, the global count N its loss divides by;
`loss(student, batch)` is that micro-batch's share of the step's loss and its log sums;
`log_fields()` adds the method's own numbers to a log record; `teachers` are the models whose
forward runs on every micro-batch (for the FLOP count). The on-policy methods, kd/gkd.py and
kd/minillm.py, provide the same four.

Tests: `.venv/bin/python -m pytest -q tests/test_train.py tests/test_teacher_cache.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kd.chunked_loss import chunked_distillation_loss
from kd.cross_tokenizer import Aligner, SharedVocab
from kd.data import IGNORE, Batches, Example
from kd.logit_grads import Scratch
from kd.losses import LossOptions, TopK
from kd.model import Head, Transformer
from kd.moe import load_balancing_loss
from kd.teacher_cache import TeacherCache


@dataclass(frozen=True)
class KDLoss:
    """The loss of one micro-batch: the teacher(s) it compares with, and how.

    Called on a batch, it returns the micro-batch's share of the step's loss (its valid-token
    sum / batch["num_tokens"]) and its log sums {"tokens", "ce", "divergence"} (no divergence
    without a teacher). The teacher: top-k log-probs in the batch ("teacher_ids",
    "teacher_logprobs", from a cache), else the forward of `teachers`, else none (SFT). The
    student's forward computes the chunked loss inside it (output_fn), so the (tokens x vocab)
    logits never exist whole.
    """

    teachers: list[Transformer]  # whose forward runs on every micro-batch; [] for SFT, a cache
    options: LossOptions  # divergence, temperature, alpha, ...
    vocab: int  # the vocabulary rows the loss compares (padding rows past it dropped)
    chunk_size: int  # tokens per chunk of the loss
    router_aux_loss_coef: float = 0.0  # an MoE student's load-balancing loss weight (`router_aux`)
    shared: SharedVocab | None = None  # gold: the ids both vocabularies share
    # The loss's (chunk x vocab) buffers, kept from one micro-batch to the next on a CPU, where a
    # fresh one costs page faults (kd/chunked_loss.py). On a GPU the caching allocator reuses
    # freed memory anyway, and buffers held between losses (~3 GB at chunk 1024 and 128k
    # tokens) would be out of reach of the backward's activations.
    scratch: Scratch = field(default_factory=Scratch)

    def __call__(self, student: Transformer, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        input_ids, labels = batch["input_ids"], batch["labels"]  # (B, T) each
        t_hidden = t_head = cached = cross = None
        if "teacher_ids" in batch:  # cached: the teacher's top-k at T, aligned with the labels
            cached = TopK(ids=batch["teacher_ids"], logprobs=batch["teacher_logprobs"])
        elif "teacher_input_ids" in batch:  # another tokenizer: its own ids of the same text
            t_hidden, t_head, cross = self._cross_teacher(batch)
        elif self.teachers:
            with torch.no_grad():  # (B, T, H_t) each
                t_hidden = [t(input_ids, output_fn=lambda h, head: h) for t in self.teachers]
            t_head = [t.head for t in self.teachers]  # replicated (V_t, H_t) weights: parallel.py
            if len(self.teachers) == 1:
                t_hidden, t_head = t_hidden[0], t_head[0]

        def loss_fn(hidden: Tensor, head: Head) -> tuple[Tensor, dict[str, Tensor]]:
            # Runs inside the student's root forward: FSDP2 has gathered the (compute-dtype)
            # head weight, and the gradient of the loss reaches it and `hidden` by autograd.
            return chunked_distillation_loss(
                hidden,
                head.rows(self.vocab),
                t_hidden,
                t_head,
                labels,
                self.options,
                chunk_size=self.chunk_size,
                teacher_logits=cached,
                num_tokens=batch["num_tokens"],
                cross=cross,
                scratch=self.scratch if hidden.device.type == "cpu" else None,
            )

        loss, metrics = student(input_ids, output_fn=loss_fn)
        n = metrics["valid_tokens"].float()
        sums = {"tokens": n, "ce": metrics["ce"] * n}
        if t_hidden is not None or cached is not None:
            sums["divergence"] = metrics["divergence"] * n
        aux, aux_sums = router_aux(student, labels, batch["num_tokens"], self.router_aux_loss_coef)
        return loss + aux, sums | aux_sums

    def _cross_teacher(self, batch: dict[str, Tensor]) -> tuple[Tensor, Head, tuple]:
        """The teacher's hidden state at the position aligned with each student position (B, T,
        H_t) (position 0's where none: masked), its head, and (known (B, T), shared vocab)."""
        teacher = self.teachers[0]
        positions = batch["teacher_positions"]  # (B, T)
        with torch.no_grad():
            hidden = teacher(batch["teacher_input_ids"], output_fn=lambda h, head: h)  # (B, T_t, H)
            index = positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            hidden = hidden.gather(1, index)  # (B, T, H_t)
        return hidden, teacher.head, (positions >= 0, self.shared)


def router_aux(
    student: Transformer, labels: Tensor, num_tokens: Tensor, coef: float
) -> tuple[Tensor | float, dict[str, Tensor]]:
    """An MoE student's load-balancing term for this micro-batch, and its log sums.

    The Switch/Mixtral loss of the forward just run (`kd.moe.load_balancing_loss`, over the
    labelled positions), times coef, weighted by the micro-batch's share n / N of the step's
    labelled tokens, as the KD sum is: the step's term is the token-weighted mean of the
    micro-batches' (one micro-batch: exactly transformers' coef * aux). Logged per token:
    "router_aux" and "expert_load/e", the share of routing slots expert e took (1/E each when
    balanced; a collapsed router shows as one expert near 1). A dense student: 0 and {}.
    """
    logits = student.router_logits()
    if not logits:
        return 0.0, {}
    valid = (labels != IGNORE).reshape(-1)
    aux, load = load_balancing_loss(logits, student.config.num_experts_per_tok, valid)
    n = valid.sum().float()
    sums = {"router_aux": aux.detach() * n}
    sums |= {f"expert_load/{e}": share * n for e, share in enumerate(load)}
    return coef * aux * n / num_tokens, sums


class OffPolicy:
    """KD (or SFT) on the data: micro-batches from `data`, each scored by `kd`. `cross`: a
    teacher of another tokenizer, (its Aligner, the shared vocabulary for gold); each
    micro-batch then carries the teacher's ids of the same text (a chat: in the teacher's own
    template) and the aligned positions."""

    def __init__(
        self,
        data: Batches,
        kd: KDLoss,
        *,
        cache: TeacherCache | None = None,
        cross: tuple[Aligner, SharedVocab | None] | None = None,
    ) -> None:
        self.data, self.kd, self.cache, self.cross = data, kd, cache, cross
        self.teachers = kd.teachers

    def micro_batches(self, step: int) -> list[dict[str, Tensor]]:
        """This rank's micro-batches of `step`. N, the trained tokens of the global batch, is
        known on every rank without an all-reduce: every rank holds the whole data set."""
        num_tokens = torch.tensor(float(self.data.global_targets(step)))
        batches = []
        examples = self.data.examples(step) if self.cross is not None else None
        for m, batch in enumerate(self.data.micro_batches(step)):
            index = batch.pop("index")  # (B,) the examples' rows in the data file
            if examples is not None:  # the teacher's ids of the example, and the alignment
                batch |= teacher_view(self.cross[0], examples[m], batch["input_ids"].shape[1])
            if self.cache is not None:  # read on the CPU; train_step moves it with the batch
                batch["teacher_ids"], batch["teacher_logprobs"] = self.cache.topk_for(
                    index, batch["labels"], temperature=self.kd.options.temperature
                )
            batches.append({**batch, "num_tokens": num_tokens})
        return batches

    def loss(self, student: Transformer, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        return self.kd(student, batch)

    def log_fields(self) -> dict[str, float]:
        """Cross-tokenizer: the share of trained positions aligned so far (the rest train on
        CE alone); the loop logs loss, divergence and CE."""
        if self.cross is None:
            return {}
        aligner = self.cross[0]
        return {"aligned": aligner.aligned / max(1, aligner.aligned + sum(aligner.masked.values()))}


def teacher_view(aligner: Aligner, examples: list[Example], width: int) -> dict[str, Tensor]:
    """The teacher's ids of each example (its text, or its chat in the teacher's template),
    right-padded with 0 ("teacher_input_ids", (B, T_t)), and the aligned teacher position of
    each student position ("teacher_positions", (B, width), -1 where none)."""
    views = [aligner.align(e.input_ids, e.labels, e.messages) for e in examples]
    ids = torch.zeros(len(views), max(len(v[0]) for v in views), dtype=torch.long)
    positions = torch.full((len(views), width), -1, dtype=torch.long)
    for row, (t_ids, aligned) in enumerate(views):
        ids[row, : len(t_ids)] = torch.tensor(t_ids)
        positions[row, : len(aligned)] = torch.tensor(aligned)
    return {"teacher_input_ids": ids, "teacher_positions": positions}
