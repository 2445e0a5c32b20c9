"""Tests of kd/chunked_loss.py: the chunked loss equals `distillation_loss` on full logits.

Checks values and gradients (student hidden states and head weight) against the dense path
for every divergence and several chunk sizes (including ones that do not divide the token
count), every teacher form (hidden states, precomputed logits, top-k, several teachers),
padded teacher vocab, (B, T, H) inputs, bf16 inputs (bf16 gradients, fp32 loss; dL/dW summed
in fp32 over chunks), micro-batch invariance with a global `num_tokens`, a batch with no valid
token, no-grad use, SFT without a teacher, and that no saved tensor is larger than one chunk of
logits. The analytic logit gradient (forward/reverse KL, top-k forward KL, SFT) against the
autograd one on the same chunk, over temperatures, loss mixes, -inf masked vocab entries,
ignored tokens, k < V and k = V (no tail) and a student tail that underflows; the top-k one also
against a float64 numpy reference of its formula, and end to end (dL/dh, dL/dW, float64 and
bf16) against autograd on the full logits; and which path each divergence and teacher form
takes. Softcapped heads (Gemma 2): values and gradients against a float64 numpy reference and
against the dense loss of the capped logits for every divergence.

Run: .venv/bin/python -m pytest -q tests/test_chunked_loss.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kd.chunked_loss
from kd.chunked_loss import _autograd_loss_and_grad, chunked_distillation_loss
from kd.logit_grads import analytic_loss_and_grad
from kd.losses import LossOptions, TopK, distillation_loss
from kd.model import Head

N, H, HT, V = 37, 8, 12, 50  # 37 tokens: a prime, so most chunk sizes leave a ragged last chunk

DIVERGENCES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("skew_forward_kl", {"skew_alpha": 0.1}),
    ("skew_reverse_kl", {"skew_alpha": 0.1}),
    ("tvd", {}),
    ("logit_mse", {}),
]


def tensors(seed: int = 0, dtype: torch.dtype = torch.float64, n: int = N, vocab: int = V):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    th = torch.randn(n, HT, generator=g, dtype=torch.float64).to(dtype)
    tw = torch.randn(vocab, HT, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::4] = -100
    return h, w, th, tw, labels


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> None:
    for a, b in zip(got, want):
        diff = float((a.detach().double() - b.detach().double()).abs().max())
        assert diff < tol, diff


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 100])
@pytest.mark.parametrize("name,kw", DIVERGENCES, ids=[d[0] for d in DIVERGENCES])
def test_chunked_equals_dense(name, kw, chunk_size):
    h, w, th, tw, labels = tensors()
    options = LossOptions(divergence=name, temperature=2.0, alpha=0.7, **kw)
    dense, dense_metrics = distillation_loss(h @ w.T, th @ tw.T, labels, options)
    chunked, metrics = chunked_distillation_loss(
        h, w, th, tw, labels, options, chunk_size=chunk_size
    )
    # float64 throughout; only the order of summation over chunks differs.
    assert_close(
        [chunked, metrics["divergence"], metrics["ce"]],
        [dense, dense_metrics["divergence"], dense_metrics["ce"]],
        1e-12,
    )
    assert_close(grads(chunked, h, w), grads(dense, h, w), 1e-12)


def test_teacher_forms():
    """Precomputed logits, top-k, two teachers (both mixtures), padded teacher vocab, (B, T, H)."""
    h, w, th, tw, labels = tensors(seed=1)
    th2, tw2 = th.flip(0), tw.flip(0)
    top = torch.log_softmax(th @ tw.T / 2.0, -1).topk(6, dim=-1)
    padded = torch.cat([tw, torch.randn(6, HT, dtype=torch.float64)])  # 6 padding rows
    topk = TopK(top.indices, top.values)
    cases = [  # (chunked arguments, dense teacher, extra options)
        ((None, None), {"teacher_logits": th @ tw.T}, th @ tw.T, {}),
        ((None, None), {"teacher_logits": topk}, topk, {}),
        (([th, th2], [tw, tw2]), {}, [th @ tw.T, th2 @ tw2.T], {"teacher_weights": (0.3, 0.7)}),
        (([th, th2], [tw, tw2]), {}, [th @ tw.T, th2 @ tw2.T], {"teacher_mixture": "logits"}),
        ((th, padded), {}, th @ padded.T, {"tokenizer_vocab_size": V - 2}),
    ]
    for (t_hidden, t_weight), teacher_kw, dense_teacher, opts in cases:
        options = LossOptions(temperature=2.0, **opts)
        dense, _ = distillation_loss(h @ w.T, dense_teacher, labels, options)
        chunked, _ = chunked_distillation_loss(
            h, w, t_hidden, t_weight, labels, options, chunk_size=8, **teacher_kw
        )
        # float64
        assert_close([chunked] + grads(chunked, h, w), [dense] + grads(dense, h, w), 1e-12)
    # (B, T, H) hidden states and (B, T) labels are flattened inside; grads keep the shape.
    dense, _ = distillation_loss(h @ w.T, th @ tw.T, labels)
    chunked, _ = chunked_distillation_loss(
        h.reshape(1, N, H), w, th.reshape(1, N, HT), tw, labels.reshape(1, N), chunk_size=8
    )
    assert_close([chunked] + grads(chunked, h, w), [dense] + grads(dense, h, w), 1e-12)


def test_bf16_inputs_give_bf16_grads_and_fp32_loss():
    h, w, th, tw, labels = tensors(seed=2, dtype=torch.float32)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    options = LossOptions(temperature=2.0)
    loss, _ = chunked_distillation_loss(
        hb, wb, th.bfloat16(), tw.bfloat16(), labels, options, chunk_size=8
    )
    gh, gw = grads(loss, hb, wb)
    assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    ref, _ = distillation_loss(h @ w.T, th @ tw.T, labels, options)
    rh, rw = grads(ref, h, w)
    # bf16 keeps 8 mantissa bits (relative error 2^-9 per rounding) on inputs, logits and grads;
    # a few roundings in a row on O(1) quantities: 3% of the largest magnitude.
    for got, want in ((loss, ref), (gh, rh), (gw, rw)):
        diff = float((got.detach().float() - want.detach()).abs().max())
        assert diff < 3e-2 * float(want.detach().abs().max()), diff


def test_bf16_weight_grad_is_summed_in_fp32_across_chunks():
    """With bf16 weights each chunk's G^T h is a bf16 product, summed over chunks in fp32: dL/dW
    stays as close to float64 with one token per chunk as with one chunk for all."""
    g = torch.Generator().manual_seed(11)
    n, vocab = 512, 1000
    h, th = (torch.randn(n, H, generator=g, dtype=torch.float64).bfloat16() for _ in range(2))
    w, tw = (0.2 * torch.randn(vocab, H, generator=g, dtype=torch.float64) for _ in range(2))
    w, tw = w.bfloat16(), tw.bfloat16()
    labels = torch.randint(0, vocab, (n,), generator=g)
    options = LossOptions(alpha=0.5)
    w64 = w.double().requires_grad_()  # the reference: float64 math on the same bf16 inputs
    want = grads(
        distillation_loss(h.double() @ w64.T, th.double() @ tw.double().T, labels, options)[0], w64
    )[0]
    scale = float(want.abs().max())
    for chunk_size in (n, 1):
        wb = w.clone().requires_grad_()
        loss, _ = chunked_distillation_loss(h, wb, th, tw, labels, options, chunk_size=chunk_size)
        got = grads(loss, wb)[0]
        # bf16 G and the bf16 result: a few roundings of 2^-9 each. Measured 0.36% (one chunk) and
        # 0.41% (512 chunks) of the largest entry; summing the 512 chunks in bf16 fails (> 0.78%).
        diff = float((got.double() - want).abs().max())
        assert diff < 2**-7 * scale, (chunk_size, diff / scale)


def test_micro_batches_with_global_count_give_the_full_gradient():
    h, w, th, tw, labels = tensors(seed=3)
    labels[:20:2] = -100  # uneven valid counts across micro-batches
    full = grads(chunked_distillation_loss(h, w, th, tw, labels, chunk_size=8)[0], h, w)
    n = int((labels != -100).sum())
    parts = [
        grads(
            chunked_distillation_loss(h[r], w, th[r], tw, labels[r], chunk_size=8, num_tokens=n)[0],
            h,
            w,
        )
        for r in (slice(0, 10), slice(10, N))
    ]
    summed = [parts[0][i] + parts[1][i] for i in range(2)]
    assert_close(summed, full, 1e-14)  # float64 rounding


def test_no_valid_token_and_no_grad():
    h, w, th, tw, labels = tensors(seed=4)
    loss, metrics = chunked_distillation_loss(
        h, w, th, tw, torch.full_like(labels, -100), chunk_size=8
    )
    gh, gw = grads(loss, h, w)
    assert float(loss.detach()) == 0.0 and (gh == 0).all() and (gw == 0).all()
    assert int(metrics["valid_tokens"]) == 0
    with torch.no_grad():
        loss, _ = chunked_distillation_loss(h, w, th, tw, labels, chunk_size=8)
    assert not loss.requires_grad
    sft_options = LossOptions(alpha=0.0)
    sft, metrics = chunked_distillation_loss(h, w, None, None, labels, sft_options, chunk_size=8)
    dense_sft, _ = distillation_loss(h @ w.T, None, labels, sft_options)
    assert_close([sft] + grads(sft, h, w), [dense_sft] + grads(dense_sft, h, w), 1e-12)  # float64
    assert float(metrics["divergence"]) == 0.0
    frozen_head = w.detach()  # a frozen head: only the hidden states get a gradient
    loss, _ = chunked_distillation_loss(h, frozen_head, th, tw, labels, chunk_size=8)
    dense, _ = distillation_loss(h @ frozen_head.T, th @ tw.T, labels)
    assert_close(grads(loss, h), grads(dense, h), 1e-12)  # float64


def test_saved_tensors_stay_within_one_chunk_of_logits():
    """Nothing of (tokens x vocab) size is kept for backward: at most chunk x vocab elements."""
    h, w, th, tw, labels = tensors(seed=5, n=64)
    largest = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        largest.append(t.numel())
        return t

    jsd = LossOptions(divergence="jsd")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_distillation_loss(h, w, th, tw, labels, jsd, chunk_size=8)
    loss.backward()
    # a chunk of logits, or the grads
    assert max(largest) <= max(8 * V, 64 * H, V * H), max(largest)


def test_input_errors_are_value_errors():
    h, w, th, tw, labels = tensors(seed=6)
    bad = [
        lambda: chunked_distillation_loss(h, w, th, tw, labels, chunk_size=0),
        lambda: chunked_distillation_loss(h, w, th, tw, labels, teacher_logits=th @ tw.T),
        # no teacher needs alpha = 0
        lambda: chunked_distillation_loss(h, w, None, None, labels),
        lambda: chunked_distillation_loss(h, w, th, None, labels),
        lambda: chunked_distillation_loss(h, w, th, tw, labels[:-1]),
        lambda: chunked_distillation_loss(h, w, [th, th], [tw], labels),
        lambda: chunked_distillation_loss(h, w, th, torch.cat([tw, tw]), labels),
    ]
    for fn in bad:
        with pytest.raises(ValueError):
            fn()


ANALYTIC_CASES = [  # topk: a TopK teacher with k = 3; topk_all: with k = V (no tail)
    (name, temperature, alpha)
    for name in ("forward_kl", "reverse_kl", "topk", "topk_all", "sft")
    for temperature in (0.5, 1.0, 2.0)
    for alpha in ((0.0,) if name == "sft" else (0.0, 0.5, 1.0))
]


@pytest.mark.parametrize("name,temperature,alpha", ANALYTIC_CASES)
def test_analytic_gradient_equals_autograd(name, temperature, alpha):
    """The written-out G and sums equal autograd through `loss_sums` on the same chunk of logits."""
    g = torch.Generator().manual_seed(7)
    n = 13
    student = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    student[:, -4:] = teacher[:, -4:] = float("-inf")  # padded vocab rows, masked in both models
    # entries only the teacher rules out: p = 0 where q > 0 (finite KL)
    if name in ("forward_kl", "topk", "topk_all"):
        teacher[torch.rand(n, V, generator=g) < 0.2] = float("-inf")
    # the teacher cached as its top-k log-probs at T (k = V: -inf ones too)
    if name in ("topk", "topk_all"):
        top = torch.log_softmax(teacher / temperature, -1).topk(3 if name == "topk" else V, dim=-1)
        teacher = TopK(top.indices, top.values)
    # row 1 (a valid token): the student's tail mass, ~exp(-2000 / T), underflows to 0
    if name == "topk":
        student[1, top.indices[1]] += 2000.0
    labels = torch.randint(0, V - 4, (n,), generator=g)
    labels[::3] = -100
    denom = torch.tensor(20)  # a global count larger than the chunk's 8 valid tokens
    divergence = name if name in ("forward_kl", "reverse_kl") else "forward_kl"
    options = LossOptions(divergence=divergence, temperature=temperature, alpha=alpha)
    teacher_arg = None if name == "sft" else teacher
    *sums, grad = analytic_loss_and_grad(
        student, teacher_arg, labels, denom, options, need_grad=True
    )
    *want_sums, want_grad = _autograd_loss_and_grad(
        student, teacher_arg, labels, denom, options, need_grad=True
    )
    assert torch.isfinite(grad).all()
    assert (grad[labels == -100] == 0).all() and (grad[:, -4:] == 0).all()
    # float64; the same per-position functions give the sums, the closed form differs from
    # autograd's chain of backward kernels only in rounding (O(1) values, ~1e-16 each).
    assert_close(sums + [grad], want_sums + [want_grad], 1e-13)


@pytest.mark.parametrize("temperature", [1.0, 2.0])  # at T = 1, s = q: G's CE term is fused
def test_topk_gradient_equals_numpy_reference(temperature):
    """Top-k forward KL + CE: sums and G against float64 numpy written from the formulas.

    Per valid token, with q = softmax(z / T), s = softmax(z), the teacher's top-k set S with
    probs p_i and tail p_tail = 1 - sum_S p_i, and q_tail = 1 - sum_S q_i:
        D = sum_S p_i log(p_i / q_i) + p_tail log(p_tail / q_tail),
        l = alpha T^2 D + (1 - alpha) CE,
        dD/du_j = q_j - p_j (j in S),  q_j (1 - p_tail / q_tail) (j not in S),  u = z / T,
        G = [alpha T dD/du + (1 - alpha)(s - onehot(y))] / denom,  0 on ignored tokens.
    """
    rng = np.random.default_rng(9)
    n, k, alpha, denom = 7, 5, 0.5, 11.0
    z = rng.normal(size=(n, V)) * 3
    zt = rng.normal(size=(n, V)) * 3
    labels = rng.integers(0, V, size=n)
    labels[::3] = -100

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q, s = softmax(zt / temperature), softmax(z / temperature), softmax(z)
    ids = np.argsort(-p, axis=-1)[:, :k]
    want_grad, want_div, want_ce = np.zeros((n, V)), 0.0, 0.0
    for r in np.flatnonzero(labels != -100):
        S, y = ids[r], labels[r]
        p_k, q_k = p[r, S], q[r, S]
        p_tail, q_tail = 1.0 - p_k.sum(), 1.0 - q_k.sum()
        want_div += (p_k * np.log(p_k / q_k)).sum() + p_tail * np.log(p_tail / q_tail)
        want_ce -= np.log(s[r, y])
        d = q[r] * (1.0 - p_tail / q_tail)  # j not in S
        d[S] = q_k - p_k
        ce = s[r].copy()
        ce[y] -= 1.0
        want_grad[r] = (alpha * temperature * d + (1.0 - alpha) * ce) / denom
    want_total = alpha * temperature**2 * want_div + (1.0 - alpha) * want_ce

    top_ids = torch.from_numpy(ids)
    teacher = TopK(
        top_ids, torch.log_softmax(torch.from_numpy(zt) / temperature, -1).gather(-1, top_ids)
    )
    options = LossOptions(divergence="forward_kl", temperature=temperature, alpha=alpha)
    total, div, ce, grad = analytic_loss_and_grad(
        torch.from_numpy(z),
        teacher,
        torch.from_numpy(labels),
        torch.tensor(denom),
        options,
        need_grad=True,
    )
    # float64; the reference forms q_tail as 1 - sum (exact enough with 45 of 50 tokens in the
    # tail), kd as a logsumexp: O(1) values, rounding ~1e-15.
    assert_close(
        [total, div, ce, grad],
        [torch.tensor(x) for x in (want_total, want_div, want_ce, want_grad)],
        1e-12,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bf16"])
@pytest.mark.parametrize("k", [3, V], ids=["k3", "kV"])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_topk_chunked_equals_dense(alpha, k, dtype):
    """Top-k forward KL through the analytic chunked path equals autograd on the full logits.

    Loss, metrics, dL/dh and dL/dW against `distillation_loss` (T = 2, ignored tokens, k < V and
    k = V).
    """
    h, w, th, tw, labels = tensors(seed=9, dtype=dtype)
    top = torch.log_softmax((th @ tw.T).double() / 2.0, -1).topk(k, dim=-1)
    teacher = TopK(top.indices, top.values.to(dtype))  # a bf16 cache for bf16 inputs
    options = LossOptions(divergence="forward_kl", temperature=2.0, alpha=alpha)
    dense, dense_metrics = distillation_loss(h @ w.T, teacher, labels, options)
    chunked, metrics = chunked_distillation_loss(
        h, w, None, None, labels, options, chunk_size=8, teacher_logits=teacher
    )
    got = [chunked, metrics["divergence"], metrics["ce"], *grads(chunked, h, w)]
    want = [dense, dense_metrics["divergence"], dense_metrics["ce"], *grads(dense, h, w)]
    if dtype == torch.float64:
        assert_close(got, want, 1e-12)  # float64: only rounding and the order of sums differ
        return
    # bf16: the same bf16 logits, the loss in fp32 in both; G and the gradients are rounded to bf16
    # at different points (dense: G^T h in one bf16 matmul; chunked: per chunk, summed in fp32).
    # Measured: 1 bf16 ulp; allowed: 3 ulps (2^-7 relative each) of the largest magnitude.
    for a, b in zip(got, want):
        diff = float((a.detach().double() - b.detach().double()).abs().max())
        assert diff < 3 * 2**-7 * float(b.detach().double().abs().max()), diff


def test_topk_nan_rows_through_the_analytic_path():
    """NaN TopK rows (no teacher there) give the same loss and gradients on the analytic
    chunked path as autograd on the full logits, and no gradient from the divergence."""
    h, w, th, tw, labels = tensors(seed=10)
    top = torch.log_softmax(th @ tw.T, -1).topk(5, dim=-1)
    logprobs = top.values.clone()
    logprobs[::3] = math.nan  # every third row unknown
    teacher = TopK(top.indices, logprobs)
    options = LossOptions(divergence="forward_kl", alpha=1.0)
    dense, _ = distillation_loss(h @ w.T, teacher, labels, options)
    chunked, _ = chunked_distillation_loss(
        h, w, None, None, labels, options, chunk_size=8, teacher_logits=teacher
    )
    got, want = [chunked, *grads(chunked, h, w)], [dense, *grads(dense, h, w)]
    assert torch.isfinite(chunked)
    assert_close(got, want, 1e-12)  # float64: only rounding and the order of sums differ
    (g_h,) = torch.autograd.grad(
        chunked_distillation_loss(
            h, w, None, None, labels, options, chunk_size=8, teacher_logits=teacher
        )[0],
        h,
    )
    assert float(g_h[::3].abs().max()) < 1e-15  # 0 but for float64 rounding (P = Q there)


def test_dispatch_takes_the_analytic_path_where_written_out(monkeypatch):
    h, w, th, tw, labels = tensors(seed=8)
    top = torch.log_softmax(th @ tw.T, -1).topk(6, dim=-1)
    used = []
    real = kd.chunked_loss._autograd_loss_and_grad

    def spy(*args, **kwargs):
        used.append("autograd")
        return real(*args, **kwargs)

    monkeypatch.setattr(kd.chunked_loss, "_autograd_loss_and_grad", spy)
    cases = [  # (teacher arguments, options, path)
        ((th, tw), {"divergence": "forward_kl"}, "analytic"),
        ((th, tw), {"divergence": "reverse_kl"}, "analytic"),
        (([th, th], [tw, tw]), {"divergence": "forward_kl"}, "analytic"),
        ((None, None), {"alpha": 0.0}, "analytic"),
        ((None, None, th @ tw.T), {"divergence": "reverse_kl"}, "analytic"),
        ((None, None, TopK(top.indices, top.values)), {"divergence": "forward_kl"}, "analytic"),
        ((None, None, TopK(top.indices, top.values)), {"divergence": "reverse_kl"}, "autograd"),
        ((None, None, TopK(top.indices, top.values)), {"divergence": "jsd"}, "autograd"),
        ((th, tw), {"divergence": "jsd"}, "autograd"),
        ((th, tw), {"divergence": "logit_mse"}, "autograd"),
    ]
    for teacher, opts, path in cases:
        used.clear()
        t_hidden, t_weight, *t_logits = teacher
        extra = {"teacher_logits": t_logits[0]} if t_logits else {}
        options = LossOptions(**opts)
        chunked_distillation_loss(h, w, t_hidden, t_weight, labels, options, chunk_size=16, **extra)
        assert ("autograd" if used else "analytic") == path, (opts, path)


def test_softcapped_heads_equal_numpy_reference():
    """Gemma 2's capped heads: z = c tanh(u / c) with u = h W^T, for student (c = 3) and teacher
    (c = 2), against float64 numpy written from the formulas. Forward KL at T with CE:
        l = [alpha T^2 sum_tokens KL(p || q) + (1 - alpha) sum_tokens CE] / denom,
        dl/dz = [alpha T (q - p) + (1 - alpha)(s - onehot(y))] / denom   (q, p at T; s at 1),
        dl/du = dl/dz (1 - tanh(u / c)^2),  dl/dh = (dl/du) W,  dl/dW = (dl/du)^T h.
    """
    rng = np.random.default_rng(4)
    c_s, c_t, temperature, alpha = 3.0, 2.0, 2.0, 0.6
    h, w = rng.normal(size=(N, H)), rng.normal(size=(V, H))
    th, tw = rng.normal(size=(N, HT)), rng.normal(size=(V, HT))
    labels = rng.integers(0, V, size=N)
    labels[::4] = -100
    valid = labels != -100

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    tanh = np.tanh(h @ w.T / c_s)
    z, zt = c_s * tanh, c_t * np.tanh(th @ tw.T / c_t)
    log_q, log_p, log_s = (
        log_softmax(z / temperature),
        log_softmax(zt / temperature),
        log_softmax(z),
    )
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    ce = -log_s[np.arange(N), np.where(valid, labels, 0)]
    denom = valid.sum()
    want_loss = (alpha * temperature**2 * kl[valid].sum() + (1 - alpha) * ce[valid].sum()) / denom
    onehot = np.eye(V)[np.where(valid, labels, 0)]
    g_z = alpha * temperature * (np.exp(log_q) - np.exp(log_p))
    g_z = (g_z + (1 - alpha) * (np.exp(log_s) - onehot)) * valid[:, None] / denom
    g_u = g_z * (1 - tanh**2)

    ht, wt = torch.from_numpy(h).requires_grad_(), torch.from_numpy(w).requires_grad_()
    options = LossOptions(divergence="forward_kl", temperature=temperature, alpha=alpha)
    loss, _ = chunked_distillation_loss(
        ht,
        Head(wt, c_s),
        torch.from_numpy(th),
        Head(torch.from_numpy(tw), c_t),
        torch.from_numpy(labels),
        options,
        chunk_size=5,
    )
    # float64 throughout: rounding ~1e-15 on O(1) values.
    assert_close(
        [loss, *grads(loss, ht, wt)],
        [torch.tensor(want_loss), torch.from_numpy(g_u @ w), torch.from_numpy(g_u.T @ h)],
        1e-12,
    )


@pytest.mark.parametrize("name,kw", DIVERGENCES, ids=[d[0] for d in DIVERGENCES])
def test_softcapped_chunked_equals_dense(name, kw):
    """Every divergence (analytic and autograd paths) on capped heads equals the dense loss of
    the capped logits, values and gradients."""
    h, w, th, tw, labels = tensors(seed=3)
    options = LossOptions(divergence=name, temperature=2.0, alpha=0.7, **kw)
    student, teacher = Head(w, 1.5), Head(tw, 2.5)
    dense, _ = distillation_loss(student(h), teacher(th), labels, options)
    chunked, _ = chunked_distillation_loss(h, student, th, teacher, labels, options, chunk_size=8)
    assert_close([chunked], [dense], 1e-12)  # float64; summation order differs
    assert_close(grads(chunked, h, w), grads(dense, h, w), 1e-12)
