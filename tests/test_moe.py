"""kd/moe.py: the sparse MoE block and the router's load-balancing loss.

Checks: `SparseMoE` equals its formula written token by token in float64 (softmax, top-k,
renormalized or not, weighted experts); `load_balancing_loss` equals a float64 numpy reference
written from the Switch formula and transformers' `load_balancing_loss_func` on the same router
logits (value and gradient, with and without a padding mask); on tiny Mixtral and Qwen3-MoE
checkpoints the model's router logits in training mode and the aux loss equal transformers'
(`output_router_logits=True`), and `offpolicy.router_aux` adds coef * aux for one micro-batch.
Parity of whole MoE models (load, save, cache, generation) is in test_model.py and
test_families.py; training on 2 ranks and resume in test_train.py.

Run: `.venv/bin/python -m pytest -q tests/test_moe.py`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from kd.hf import load_model
from kd.moe import MixtralExpert, SparseMoE, load_balancing_loss
from kd.offpolicy import router_aux
from tests.tiny_models import make_tiny_checkpoint

E, K, H = 6, 2, 8


@pytest.mark.parametrize("renormalize", [True, False])
def test_sparse_moe_equals_its_formula(renormalize):
    """y(x) = sum_{e in top-k(p)} w_e expert_e(x), p = softmax(gate x), token by token."""
    torch.manual_seed(0)
    moe = SparseMoE(
        H, E, K, renormalize=renormalize, make_expert=lambda: MixtralExpert(H, 16)
    ).double()
    x = torch.randn(3, 5, H, dtype=torch.float64)
    got = moe(x)
    want = torch.zeros_like(x)
    for b in range(3):
        for t in range(5):
            # the router's weights are fp32 (as transformers'), whatever the input dtype
            p = torch.softmax((moe.gate.weight @ x[b, t]).float(), -1)
            top = p.topk(K)
            w = top.values / top.values.sum() if renormalize else top.values
            for weight, e in zip(w.double(), top.indices.tolist()):
                want[b, t] += weight * moe.experts[e](x[b, t])
    # float64, the same sums in another order
    assert (got - want).abs().max().item() < 1e-12
    moe.eval()
    moe(x)
    assert moe.router_logits is None, "eval mode keeps no router logits"


def numpy_aux(logits: list[np.ndarray], k: int, mask: np.ndarray) -> float:
    """Switch loss over all layers together: E sum_e f_e P_e, f = routed share (sums to k)."""
    num_experts = logits[0].shape[-1]
    f, p, rows = np.zeros(num_experts), np.zeros(num_experts), 0.0
    for z in logits:
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        for n in np.flatnonzero(mask):
            for e in np.argsort(-probs[n])[:k]:
                f[e] += 1.0
            p += probs[n]
            rows += 1.0
    return float(num_experts * ((f / rows) * (p / rows)).sum())


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_equals_numpy_and_transformers(masked):
    g = torch.Generator().manual_seed(1)
    B, T, layers = 2, 7, 3
    logits = [torch.randn(B * T, E, generator=g, dtype=torch.float64) for _ in range(layers)]
    mask = torch.ones(B, T, dtype=torch.bool)
    if masked:
        mask[0, 5:] = False  # padding at the end of row 0
    leaves = [z.clone().requires_grad_() for z in logits]
    aux, load = load_balancing_loss(leaves, K, mask.reshape(-1) if masked else None)
    want = numpy_aux([z.numpy() for z in logits], K, mask.reshape(-1).numpy())
    # fp32 inside (as transformers): relative rounding ~1e-7 on a value ~K
    assert abs(aux.item() - want) < 1e-5
    assert abs(load.sum().item() - 1.0) < 1e-6
    theirs_leaves = [z.clone().float().requires_grad_() for z in logits]
    theirs = load_balancing_loss_func(
        tuple(theirs_leaves), E, K, attention_mask=mask.long() if masked else None
    )
    assert abs(aux.item() - theirs.item()) < 1e-6
    ours_grad = torch.autograd.grad(aux, leaves)
    theirs_grad = torch.autograd.grad(theirs, theirs_leaves)
    diff = max((a - b).abs().max().item() for a, b in zip(ours_grad, theirs_grad))
    assert diff < 1e-7, f"d aux / d router logits differs from transformers' by {diff:.2e}"


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_router_logits_and_aux_match_transformers(arch, tmp_path):
    path = make_tiny_checkpoint(tmp_path / arch, arch)
    ours = load_model(path).train()
    theirs = AutoModelForCausalLM.from_pretrained(path).train()
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    out = theirs(ids, output_router_logits=True)
    ours(ids)
    got = ours.router_logits()
    assert len(got) == len(out.router_logits) == 2  # qwen3_moe: layer 1 is dense
    diff = max((a - b).abs().max().item() for a, b in zip(got, out.router_logits))
    assert diff < 1e-5, f"{arch}: router logits differ from transformers' by {diff:.2e}"
    top_k = ours.config.num_experts_per_tok
    aux, _ = load_balancing_loss(got, top_k)
    assert abs(aux.item() - out.aux_loss.item()) < 1e-6
    labels = torch.zeros(2, 12, dtype=torch.long)  # every position labelled: no mask
    term, sums = router_aux(ours, labels, torch.tensor(24), coef=0.02)
    assert abs(term.item() - 0.02 * out.aux_loss.item()) < 1e-7
    assert abs(sums["router_aux"].item() / 24 - out.aux_loss.item()) < 1e-6
