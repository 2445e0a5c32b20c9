"""Tests of kd/losses.py against float64 numpy references written from the formulas.

Checks every divergence (values on several shapes and temperatures, masked vocab entries,
float64 gradcheck, identities: D(p, p) = 0, D >= 0, TVD <= 1, JSD symmetric and <= log 2 at
beta = 0.5, JSD ends, skew alpha = 0), `distillation_loss` (alpha, T^2, ignore_index,
num_tokens, zero valid tokens, micro-batch invariance), multi-teacher mixtures, top-k teachers
(k = V equals dense), padded teacher vocab, bf16 inputs and input errors.

Run: .venv/bin/python -m pytest -q tests/test_losses.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd import losses
from kd.losses import LossOptions, TopK, distillation_loss

# (name, the divergence's own setting): a keyword of the per-position function and a field of
# LossOptions alike (`skew_alpha`, not `alpha`, which is the KD / CE mix).
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1}),  # asymmetric beta pins the mixture direction (TRL #3043)
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skew_forward_kl", {"skew_alpha": 0.1}),
    ("skew_reverse_kl", {"skew_alpha": 0.3}),
    ("tvd", {}),
    ("logit_mse", {}),
]
IDS = [f"{name}-{kw}" for name, kw in CASES]


# ---------------------------------------------------------------- numpy float64 references


def np_softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def np_kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0).sum(-1)


def np_divergence(
    name: str, s: np.ndarray, t: np.ndarray, temperature: float, **kw: float
) -> np.ndarray:
    """The formulas of the module docstring of kd/losses.py, applied literally in float64."""
    p, q = np_softmax(t / temperature), np_softmax(s / temperature)
    if name == "forward_kl":
        return np_kl(p, q)
    if name == "reverse_kl":
        return np_kl(q, p)
    if name == "jsd":
        beta = kw["beta"]
        if beta == 0.0:
            return np_kl(p, q)
        if beta == 1.0:
            return np_kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
    if name == "skew_forward_kl":
        return np_kl(p, kw["skew_alpha"] * p + (1 - kw["skew_alpha"]) * q)
    if name == "skew_reverse_kl":
        return np_kl(q, (1 - kw["skew_alpha"]) * p + kw["skew_alpha"] * q)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "logit_mse":
        out = np.empty(s.shape[:-1])
        for idx in np.ndindex(*s.shape[:-1]):
            keep = np.isfinite(s[idx]) & np.isfinite(t[idx])
            d = s[idx][keep] / temperature - t[idx][keep] / temperature
            out[idx] = ((d - d.mean()) ** 2).mean()
        return out
    raise KeyError(name)


def np_loss(s, t, labels, *, name, temperature, alpha, num_tokens=None, kw=None) -> float:
    """(alpha T^2 sum_valid D + (1 - alpha) sum_valid CE) / num_tokens, from the formula."""
    valid = labels != -100
    div = np_divergence(name, s, t, temperature, **(kw or {}))
    log_q1 = np.log(np_softmax(s))
    ce = -np.take_along_axis(log_q1, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    n = valid.sum() if num_tokens is None else num_tokens
    return (alpha * temperature**2 * div[valid].sum() + (1 - alpha) * ce[valid].sum()) / n


def rand_logits(
    *shape: int, seed: int = 0, scale: float = 3.0, dtype=torch.float64
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def pair(
    s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_p, log_q): teacher and student log-probabilities at T, the divergences' arguments."""
    dtype = losses.compute_dtype(s, t)
    return losses.log_probs(t, temperature, dtype), losses.log_probs(s, temperature, dtype)


def call(
    name: str, s: torch.Tensor, t: torch.Tensor, *, temperature: float = 1.0, **kw: float
) -> torch.Tensor:
    """Divergence `name` of student logits s and teacher logits t at T (logit_mse: of logits)."""
    if name == "logit_mse":
        return losses.logit_mse(s, t, temperature=temperature, **kw)
    return getattr(losses, name)(*pair(s, t, temperature), **kw)


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ------------------------------------------------------------------------ per-position values


@pytest.mark.parametrize("shape", [(5, 11), (2, 3, 97), (4, 3000)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_divergence_matches_numpy(name, kw, temperature, shape):
    s, t = rand_logits(*shape, seed=1), rand_logits(*shape, seed=2)
    got = call(name, s, t, temperature=temperature, **kw)
    want = np_divergence(name, s.numpy(), t.numpy(), temperature, **kw)
    assert got.shape == shape[:-1] and got.dtype == torch.float64
    # float64 on both sides; only the order of summation differs.
    assert max_diff(got, want) < 1e-10, max_diff(got, want)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_fp32_inputs_compute_in_fp32(name, kw):
    s = rand_logits(4, 3000, seed=3, dtype=torch.float32)
    t = rand_logits(4, 3000, seed=4, dtype=torch.float32)
    got = call(name, s, t, temperature=2.0, **kw)
    want = np_divergence(name, s.double().numpy(), t.double().numpy(), 2.0, **kw)
    assert got.dtype == torch.float32
    # fp32 log-softmax is accurate to ~1e-6 relative; values are O(1), sums over 3000 entries.
    assert max_diff(got, want) < 1e-4 * max(1.0, float(np.abs(want).max())), max_diff(got, want)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_masked_vocab_entries(name, kw):
    """Padded vocab rows at -inf in both models: same value as without those rows, finite grads."""
    s, t = rand_logits(3, 40, seed=5), rand_logits(3, 40, seed=6)
    s_masked, t_masked = s.clone(), t.clone()
    s_masked[:, -7:] = -math.inf
    t_masked[:, -7:] = -math.inf
    s_masked.requires_grad_()
    got = call(name, s_masked, t_masked, temperature=2.0, **kw)
    want = np_divergence(name, s[:, :-7].numpy(), t[:, :-7].numpy(), 2.0, **kw)
    assert max_diff(got.detach(), want) < 1e-10, max_diff(got.detach(), want)  # float64 both sides
    got.sum().backward()
    assert torch.isfinite(s_masked.grad).all() and (s_masked.grad[:, -7:] == 0).all()


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_one_sided_mask_gives_no_nan(name, kw):
    """-inf in only one model: never NaN.

    A KL whose support is violated is huge (or inf), as it should be.
    """
    s, t = rand_logits(3, 40, seed=7), rand_logits(3, 40, seed=8)
    t_masked, s_masked = t.clone(), s.clone()
    t_masked[:, :5] = -math.inf
    s_masked[:, 5:9] = -math.inf
    for a, b in ((s, t_masked), (s_masked, t)):
        a = a.clone().requires_grad_()
        out = call(name, a, b, temperature=1.0, **kw)
        out.sum().backward()
        assert not torch.isnan(out).any() and not torch.isnan(a.grad).any()


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_gradcheck(name, kw):
    s, t = rand_logits(3, 6, seed=9, scale=1.0), rand_logits(3, 6, seed=10, scale=1.0)
    s.requires_grad_()
    t.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: call(name, a, b, temperature=2.0, **kw), (s, t))


# ------------------------------------------------------------------------------- identities


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_zero_on_equal_and_nonnegative(name, kw):
    s, t = rand_logits(6, 200, seed=11), rand_logits(6, 200, seed=12)
    same = call(name, s, s + 1.5, **kw)  # a constant shift leaves the distribution unchanged
    assert same.abs().max() < 1e-12, same.abs().max()  # float64 rounding of a zero
    assert (call(name, s, t, **kw) >= 0).all()


def test_tvd_and_jsd_bounds_and_symmetry():
    # near one-hot
    s, t = rand_logits(8, 50, seed=13, scale=40.0), rand_logits(8, 50, seed=14, scale=40.0)
    assert losses.tvd(*pair(s, t)).max() <= 1.0
    j = losses.jsd(*pair(s, t), beta=0.5)
    assert j.max() <= math.log(2) + 1e-12  # float64 rounding
    diff = (j - losses.jsd(*pair(t, s), beta=0.5)).abs().max()
    assert diff < 1e-12, diff  # symmetric at beta = 0.5, up to float64 rounding


def test_jsd_ends_and_skew_zero_are_exact_kls():
    s, t = rand_logits(4, 30, seed=15), rand_logits(4, 30, seed=16)
    log_p, log_q = pair(s, t)
    assert torch.equal(losses.jsd(log_p, log_q, beta=0.0), losses.forward_kl(log_p, log_q))
    assert torch.equal(losses.jsd(log_p, log_q, beta=1.0), losses.reverse_kl(log_p, log_q))
    skew_fkl = losses.skew_forward_kl(log_p, log_q, skew_alpha=0.0)
    assert torch.equal(skew_fkl, losses.forward_kl(log_p, log_q))
    skew_rkl = losses.skew_reverse_kl(log_p, log_q, skew_alpha=0.0)
    assert torch.equal(skew_rkl, losses.reverse_kl(log_p, log_q))
    # Just inside the ends the formula is near 0, not near the KL: the documented discontinuity.
    near_end = losses.jsd(log_p, log_q, beta=1e-6)
    assert near_end.max() < 1e-3 * losses.forward_kl(log_p, log_q).min()


# ---------------------------------------------------------------------- distillation_loss


def labels_for(shape: tuple[int, ...], vocab: int, *, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[..., -3:] = -100  # right padding
    labels[0, 0] = -100  # and a masked prompt token
    return labels


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_distillation_loss_matches_numpy(name, kw, temperature):
    s, t = rand_logits(2, 9, 50, seed=17), rand_logits(2, 9, 50, seed=18)
    labels = labels_for((2, 9), 50, seed=19)
    options = LossOptions(divergence=name, temperature=temperature, alpha=0.3, **kw)
    loss, metrics = distillation_loss(s, t, labels, options)
    want = np_loss(
        s.numpy(), t.numpy(), labels.numpy(), name=name, temperature=temperature, alpha=0.3, kw=kw
    )
    assert abs(float(loss) - want) < 1e-10, abs(float(loss) - want)  # float64 both sides
    valid = (labels != -100).numpy()
    want_div = np_divergence(name, s.numpy(), t.numpy(), temperature, **kw)[valid].mean()
    assert abs(float(metrics["divergence"]) - want_div) < 1e-10  # unscaled: no T^2, no alpha
    assert int(metrics["valid_tokens"]) == valid.sum()
    loss_n, _ = distillation_loss(s, t, labels, options, num_tokens=100)
    want_n = np_loss(
        s.numpy(),
        t.numpy(),
        labels.numpy(),
        name=name,
        temperature=temperature,
        alpha=0.3,
        num_tokens=100,
        kw=kw,
    )
    assert abs(float(loss_n) - want_n) < 1e-10, abs(float(loss_n) - want_n)


def test_alpha_zero_is_sft_and_ignores_padding():
    s, t = rand_logits(2, 9, 50, seed=20), rand_logits(2, 9, 50, seed=21)
    labels = labels_for((2, 9), 50, seed=22)
    sft = LossOptions(alpha=0.0, temperature=2.0)
    loss, metrics = distillation_loss(s, t, labels, sft)
    ce = F.cross_entropy(s.reshape(-1, 50), labels.reshape(-1), ignore_index=-100)
    # float64 rounding
    assert abs(float(loss - ce)) < 1e-12 and abs(float(metrics["ce"] - ce)) < 1e-12
    no_teacher, _ = distillation_loss(s, None, labels, sft)
    assert abs(float(no_teacher - ce)) < 1e-12, abs(float(no_teacher - ce))  # float64 rounding
    with pytest.raises(ValueError, match="alpha=0"):
        distillation_loss(s, None, labels, LossOptions(alpha=0.5))


def test_no_valid_token_gives_connected_zero():
    s = rand_logits(2, 4, 10, seed=23).requires_grad_()
    loss, metrics = distillation_loss(s, rand_logits(2, 4, 10, seed=24), torch.full((2, 4), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and loss.requires_grad and (s.grad == 0).all()
    assert not torch.isnan(metrics["divergence"])


def test_micro_batches_with_global_count_give_the_full_gradient():
    s = rand_logits(4, 7, 30, seed=25).requires_grad_()
    t = rand_logits(4, 7, 30, seed=26)
    labels = labels_for((4, 7), 30, seed=27)
    # micro-batches with different valid counts: the per-micro-batch-mean bug shows
    labels[3, :5] = -100
    options = LossOptions(temperature=2.0)
    distillation_loss(s, t, labels, options)[0].backward()
    full = s.grad.clone()
    s.grad = None
    n = int((labels != -100).sum())
    for rows in (slice(0, 1), slice(1, 4)):
        loss, _ = distillation_loss(s[rows], t[rows], labels[rows], options, num_tokens=n)
        loss.backward()
    assert (s.grad - full).abs().max() < 1e-14, (s.grad - full).abs().max()  # float64 rounding


def test_loss_gradcheck_with_topk_and_teacher_mixture():
    s = rand_logits(2, 3, 8, seed=28, scale=1.0).requires_grad_()
    t1, t2 = rand_logits(2, 3, 8, seed=29), rand_logits(2, 3, 8, seed=30)
    labels = torch.tensor([[1, 2, -100], [3, -100, 7]])
    topk = torch.log_softmax(t1 / 2.0, -1).topk(3, dim=-1)
    options = LossOptions(divergence="jsd", beta=0.3, temperature=2.0)
    for teacher in ([t1, t2], TopK(topk.indices, topk.values)):

        def fn(a: torch.Tensor) -> torch.Tensor:
            return distillation_loss(a, teacher, labels, options)[0]

        assert torch.autograd.gradcheck(fn, (s,))


# --------------------------------------------------------------------- teachers and vocab


def test_multi_teacher_mixtures_match_numpy():
    s, t1, t2 = (rand_logits(2, 5, 20, seed=i) for i in (31, 32, 33))
    labels = labels_for((2, 5), 20, seed=34)
    w = [0.25, 0.75]
    options = LossOptions(alpha=1.0, temperature=2.0, teacher_weights=w)
    loss, _ = distillation_loss(s, [t1, t2], labels, options)
    p = w[0] * np_softmax(t1.numpy() / 2) + w[1] * np_softmax(t2.numpy() / 2)  # probability mixture
    valid = (labels != -100).numpy()
    want = 4.0 * np_kl(p, np_softmax(s.numpy() / 2))[valid].sum() / valid.sum()
    assert abs(float(loss) - want) < 1e-10, abs(float(loss) - want)  # float64 both sides
    options = LossOptions(
        alpha=1.0, temperature=2.0, teacher_weights=[1, 3], teacher_mixture="logits"
    )
    loss, _ = distillation_loss(s, [t1, t2], labels, options)
    avg = 0.25 * t1.numpy() + 0.75 * t2.numpy()  # weights normalized, logits averaged
    want = np_loss(s.numpy(), avg, labels.numpy(), name="forward_kl", temperature=2.0, alpha=1.0)
    assert abs(float(loss) - want) < 1e-10, abs(float(loss) - want)
    single, _ = distillation_loss(s, [t1], labels)
    assert abs(float(single - distillation_loss(s, t1, labels)[0])) < 1e-12  # logsumexp of one term


@pytest.mark.parametrize("name,kw", [c for c in CASES if c[0] != "logit_mse"], ids=IDS[:-1])
def test_topk_with_k_equal_vocab_is_dense(name, kw):
    s, t = rand_logits(2, 6, 40, seed=35), rand_logits(2, 6, 40, seed=36)
    labels = labels_for((2, 6), 40, seed=37)
    top = torch.log_softmax(t / 2.0, -1).topk(40, dim=-1)
    options = LossOptions(divergence=name, temperature=2.0, **kw)
    sparse, _ = distillation_loss(s, TopK(top.indices, top.values), labels, options)
    dense, _ = distillation_loss(s, t, labels, options)
    assert abs(float(sparse - dense)) < 1e-10, abs(float(sparse - dense))  # float64, reordered sums


def test_topk_tail_bucket_matches_numpy():
    s, t = rand_logits(3, 50, seed=38), rand_logits(3, 50, seed=39)
    p, q = np_softmax(t.numpy()), np_softmax(s.numpy())
    top = torch.log_softmax(t, -1).topk(5, dim=-1)
    ids = top.indices.numpy()
    p_k, q_k = np.take_along_axis(p, ids, -1), np.take_along_axis(q, ids, -1)
    p_b = np.concatenate([p_k, 1 - p_k.sum(-1, keepdims=True)], -1)  # k tokens + tail bucket
    q_b = np.concatenate([q_k, 1 - q_k.sum(-1, keepdims=True)], -1)
    labels = torch.zeros(3, dtype=torch.long)
    got, _ = distillation_loss(s, TopK(top.indices, top.values), labels, LossOptions(alpha=1.0))
    want = np_kl(p_b, q_b).mean()
    assert abs(float(got) - want) < 1e-10, abs(float(got) - want)  # float64 both sides
    assert want < np_kl(p, q).mean()  # the bucketed KL is a lower bound of the full one


@pytest.mark.parametrize("name,kw", [c for c in CASES if c[0] != "logit_mse"], ids=IDS[:-1])
def test_nan_topk_rows_have_no_divergence_and_no_gradient(name, kw):
    """A TopK row of NaN (no teacher there: an API teacher's end-of-turn token) adds 0 to the
    divergence and 0 to the gradient; the rest is the loss of the known rows, divided by the
    count of all labelled rows. Reference: the known rows alone, the NaN rows' labels masked."""
    s = rand_logits(2, 5, 30, seed=40).requires_grad_()
    t = rand_logits(2, 5, 30, seed=41)
    labels = labels_for((2, 5), 30, seed=42)
    top = torch.log_softmax(t / 2.0, -1).topk(4, dim=-1)
    logprobs = top.values.clone()
    logprobs[0, 3] = math.nan
    logprobs[1, 0] = math.nan
    unknown = logprobs.isnan().any(-1)
    options = LossOptions(divergence=name, alpha=1.0, temperature=2.0, **kw)
    loss, _ = distillation_loss(s, TopK(top.indices, logprobs), labels, options)
    (grad,) = torch.autograd.grad(loss, s)
    count = int((labels != -100).sum())
    known_only = labels.masked_fill(unknown, -100)
    want, _ = distillation_loss(
        s, TopK(top.indices, top.values), known_only, options, num_tokens=count
    )
    (want_grad,) = torch.autograd.grad(want, s)
    assert torch.isfinite(loss) and abs(float(loss - want)) < 1e-12, float(loss - want)
    assert max_diff(grad, want_grad) < 1e-12  # float64 both sides
    # 0 in exact arithmetic (P = Q); float64 leaves the rounding of the buckets' sums, ~1e-17.
    assert float(grad[unknown].abs().max()) < 1e-15


def test_padded_teacher_vocab_is_sliced_only_when_declared():
    s, t = rand_logits(2, 4, 30, seed=40), rand_logits(2, 4, 38, seed=41)
    labels = labels_for((2, 4), 30, seed=42)
    got, _ = distillation_loss(s, t, labels, LossOptions(tokenizer_vocab_size=28))
    want, _ = distillation_loss(s, t[..., :30], labels)
    assert float(got) == float(want)
    with pytest.raises(ValueError, match="tokenizer_vocab_size"):
        distillation_loss(s, t, labels)
    with pytest.raises(ValueError, match="tokenizer_vocab_size"):
        # real tokens beyond the student
        distillation_loss(s, t, labels, LossOptions(tokenizer_vocab_size=35))
    with pytest.raises(ValueError, match="vocab"):
        distillation_loss(t, s, labels.clamp(max=29))  # smaller teacher


# ------------------------------------------------------------------------- dtypes, errors


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_bf16_inputs_give_fp32_results(name, kw):
    s = rand_logits(2, 8, 500, seed=43, dtype=torch.float32)
    t = rand_logits(2, 8, 500, seed=44, dtype=torch.float32)
    labels = labels_for((2, 8), 500, seed=45)
    options = LossOptions(divergence=name, temperature=2.0, **kw)
    got, _ = distillation_loss(s.bfloat16(), t.bfloat16(), labels, options)
    upcast, _ = distillation_loss(s.bfloat16().float(), t.bfloat16().float(), labels, options)
    full, _ = distillation_loss(s, t, labels, options)
    assert got.dtype == torch.float32
    assert float(got) == float(upcast)  # the math runs in fp32 on the bf16 values, nothing in bf16
    # bf16 keeps 8 mantissa bits: logits ~3 are off by up to ~0.01, so the loss by ~1%.
    assert abs(float(got - full)) < 2e-2 * max(1.0, abs(float(full))), abs(float(got - full))


def test_input_errors_are_value_errors():
    s, t, labels = rand_logits(2, 10), rand_logits(2, 10), torch.tensor([1, 2])
    bad = [
        lambda: losses.forward_kl(*pair(s, t, temperature=0.0)),
        lambda: losses.jsd(*pair(s, t), beta=1.5),
        lambda: losses.skew_forward_kl(*pair(s, t), skew_alpha=-0.1),
        lambda: losses.forward_kl(*pair(s, t[:, :9])),
        lambda: distillation_loss(s, t, labels, LossOptions(divergence="kl")),
        lambda: distillation_loss(s, t, labels, LossOptions(alpha=2.0)),
        lambda: distillation_loss(s, t, labels[:1]),
        lambda: distillation_loss(s, t, labels, num_tokens=0),
        lambda: distillation_loss(s, [t, t], labels, LossOptions(teacher_weights=[1.0])),
        lambda: distillation_loss(s, [t], labels, LossOptions(teacher_mixture="geometric")),
        lambda: distillation_loss(
            s, TopK(labels[:, None], t[:, :1]), labels, LossOptions(divergence="logit_mse")
        ),
    ]
    for fn in bad:
        with pytest.raises(ValueError):
            fn()
