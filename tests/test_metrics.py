"""Tests for kd/metrics.py: token-level metrics and the teacher-forced loop's sums.

Checks
- token_metrics + summarize (forward KL teacher || student, perplexity, top-1 agreement)
  against float64 numpy references written from the formulas, on small random logits with
  padding (ignore_index) and -inf-masked vocabulary entries (no NaN);
- identities: KL(p, p) = 0 with agreement 1; no teacher gives only NLL/ppl;
- sums combine exactly: metrics of one batch == accumulate over batch / time splits ==
  the same batch in small token chunks.
- teacher_forced_metrics on tiny random models: two ranks (a fake all-reduce in one process)
  give one process's numbers, every rank runs every round, max_batches caps the rounds.
tests/test_evaluate.py runs it through kd/evaluate.py on real tokenized examples.

Run: `.venv/bin/python -m pytest -q tests/test_metrics.py` (a few seconds).
"""

import math

import numpy as np
import pytest
import torch

from kd.data import Example
from kd.metrics import accumulate, summarize, teacher_forced_metrics, token_metrics
from kd.model import Transformer
from kd.model_config import ModelConfig

# fp32 log-softmax over V=11 entries vs the float64 reference: per-token errors ~1e-7, summed
# over <= 15 tokens and divided by the count; 1e-5 leaves a wide margin and still catches any
# wrong formula (those are off by > 1e-2).
TOL = 1e-5


def _logits(seed: int, b: int = 3, t: int = 5, v: int = 11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g) * 2
    teacher = torch.randn(b, t, v, generator=g) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = -100  # a "prompt" prefix
    labels[2, 3:] = -100  # right padding
    # -inf-masked vocabulary entries (e.g. padded vocab): teacher gives them p = 0; the student
    # masks them too, so the KL stays finite, and 0 * log 0 must not become NaN.
    teacher[..., -2:] = float("-inf")
    student[..., -1] = float("-inf")
    labels[labels >= v - 2] = 0
    return student, teacher, labels


def _log_softmax_np(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _reference(student, teacher, labels):
    """float64 numpy: mean KL(p||q) = mean_t sum_v p (log p - log q) over p > 0,
    ppl = exp(mean_t -log q(y_t)), agreement = mean_t [argmax q == argmax p]."""
    s, t, y = student.double().numpy(), teacher.double().numpy(), labels.numpy()
    kl, nll, agree, n = 0.0, 0.0, 0, 0
    for bi in range(y.shape[0]):
        for ti in range(y.shape[1]):
            if y[bi, ti] == -100:
                continue
            log_q, log_p = _log_softmax_np(s[bi, ti]), _log_softmax_np(t[bi, ti])
            p = np.exp(log_p)
            kl += sum(p[v] * (log_p[v] - log_q[v]) for v in range(len(p)) if p[v] > 0)
            nll += -log_q[y[bi, ti]]
            agree += int(np.argmax(log_q) == np.argmax(log_p))
            n += 1
    return {"kl": kl / n, "ppl": math.exp(nll / n), "top1_agreement": agree / n, "tokens": n}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_metrics_match_numpy(seed):
    student, teacher, labels = _logits(seed)
    got = summarize(token_metrics(student, teacher, labels))
    ref = _reference(student, teacher, labels)
    assert got["tokens"] == ref["tokens"]
    for key in ("kl", "ppl", "top1_agreement"):
        assert math.isfinite(got[key]), f"{key} is {got[key]}"
        diff = abs(got[key] - ref[key])
        assert diff < TOL, f"{key}: {got[key]} vs numpy {ref[key]}, |diff| {diff:.2e}"


def test_identities_and_no_teacher():
    student, _, labels = _logits(3)
    same = summarize(token_metrics(student, student.clone(), labels))
    # KL(p, p) is exactly 0 term by term (log p - log p = 0); agreement is 1.
    assert abs(same["kl"]) < 1e-12, f"KL(p, p) = {same['kl']}"
    assert same["top1_agreement"] == 1.0
    alone = summarize(token_metrics(student, None, labels))
    assert set(alone) == {"nll", "ppl", "tokens"}
    diff = abs(alone["ppl"] - same["ppl"])
    assert diff == 0.0, f"ppl without teacher differs by {diff}"


def test_sums_combine_exactly():
    student, teacher, labels = _logits(4, b=4, t=6)
    whole = summarize(token_metrics(student, teacher, labels))
    by_batch = None
    for rows in (slice(0, 1), slice(1, 4)):
        by_batch = accumulate(by_batch, token_metrics(student[rows], teacher[rows], labels[rows]))
    by_time = None
    for cols in (slice(0, 2), slice(2, 6)):
        sums = token_metrics(student[:, cols], teacher[:, cols], labels[:, cols])
        by_time = accumulate(by_time, sums)
    chunked = token_metrics(student, teacher, labels, chunk_tokens=2)
    for parts in (summarize(by_batch), summarize(by_time), summarize(chunked)):
        assert parts["tokens"] == whole["tokens"]
        for key in ("kl", "ppl", "top1_agreement"):
            # The same fp32 per-token values summed in float64 in another order: ~1e-16.
            diff = abs(parts[key] - whole[key])
            assert diff < 1e-12, f"{key}: split {parts[key]} vs whole {whole[key]}, diff {diff:.2e}"


def test_token_metrics_errors():
    student, teacher, labels = _logits(5)
    with pytest.raises(ValueError, match="labels"):
        token_metrics(student, teacher, labels[:, :-1])
    with pytest.raises(ValueError, match="vocabulary"):
        token_metrics(student, teacher[..., :-1], labels)
    with pytest.raises(ValueError, match="no valid tokens"):
        summarize(token_metrics(student, teacher, torch.full_like(labels, -100)))
    with pytest.raises(ValueError, match="teacher logits"):
        accumulate(token_metrics(student, teacher, labels), token_metrics(student, None, labels))


def _tiny_model(vocab_size: int, seed: int) -> Transformer:
    config = ModelConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Transformer(config)
    model.init_weights(std=0.2, seed=seed)  # std 0.2: peaked distributions, KL well above 0
    return model.eval()


def _examples(n: int, seed: int) -> list[Example]:
    """n examples of 3..9 tokens; the first two positions are an unlabelled 'prompt'."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 64, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g)
        labels = [-100, -100, *ids[2:].tolist()]
        out.append(Example(ids.tolist(), labels, ids[:2].tolist(), len(labels) - 2, i))
    return out


def test_teacher_forced_metrics_split_over_ranks():
    # Teacher vocabulary padded to 72 rows: the default compares the shared prefix of 64.
    student, teacher = _tiny_model(64, seed=0), _tiny_model(72, seed=1)
    examples = _examples(5, seed=0)
    kwargs = dict(teacher=teacher, pad_id=0)
    one = teacher_forced_metrics(student, examples, batch_size=2, **kwargs)
    assert one["tokens"] == sum(e.num_targets for e in examples) and one["kl"] > 0.01

    # Two ranks of batch 1 in one process: round 3 leaves rank 1 nothing, which must still run
    # a forward (FSDP all-gathers) and count no token. The fake all-reduce first records each
    # rank's stacked sums, then returns their total, as dist.all_reduce(SUM) would.
    def on_rank(rank: int, all_reduce_sum) -> dict[str, float]:
        return teacher_forced_metrics(
            student,
            examples,
            batch_size=1,
            rank=rank,
            world_size=2,
            all_reduce_sum=all_reduce_sum,
            **kwargs,
        )

    stacked: list[torch.Tensor] = []
    forwards: list[int] = []
    for rank in (0, 1):
        hook = student.register_forward_hook(lambda *_, r=rank: forwards.append(r))
        on_rank(rank, lambda t: stacked.append(t.clone()) or t)
        hook.remove()
    assert forwards == [0] * 3 + [1] * 3, f"forwards by rank {forwards}; each must run 3 rounds"
    total = stacked[0] + stacked[1]
    for rank in (0, 1):
        two = on_rank(rank, lambda t: total.clone())
        assert two["tokens"] == one["tokens"]
        for key in ("kl", "nll", "top1_agreement"):
            # Batches of 1 vs 2 change only the fp32 rounding of the padded matmuls (~1e-7).
            assert math.isclose(two[key], one[key], rel_tol=1e-5), (key, two[key], one[key])
    capped = teacher_forced_metrics(student, examples, batch_size=2, max_batches=1, **kwargs)
    first = teacher_forced_metrics(student, examples[:2], batch_size=2, **kwargs)
    assert capped == first
    with pytest.raises(ValueError, match="no examples"):
        teacher_forced_metrics(student, [], **kwargs)
