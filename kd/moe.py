"""Sparse mixture-of-experts feed-forward (Mixtral, Qwen3-MoE) and its load-balancing loss.

A router (`gate`, a linear map H -> E) scores each token against the E experts; the token goes
to its k best, and the block's output is the experts' outputs weighted by the router's
probabilities (Shazeer et al., arXiv 1701.06538; Mixtral, arXiv 2401.04088):

    p = softmax(gate(x)),  S = top-k(p),  y = sum_{e in S} w_e expert_e(x),
    w_e = p_e / sum_{j in S} p_j   (Mixtral always; Qwen3-MoE with norm_topk_prob)
    w_e = p_e                      (Qwen3-MoE without norm_topk_prob)

Each expert is a SwiGLU MLP with its checkpoint's names: Mixtral's `w1` (gate), `w3` (up), `w2`
(down) in `block_sparse_moe.experts.{e}`; Qwen3-MoE's `gate_proj`, `up_proj`, `down_proj` in
`mlp.experts.{e}`. Tokens are sorted by expert, each expert runs once on its rows, and the
weighted results are added back in place: a readable loop over experts, with one host sync per
layer (the per-expert counts that split the sorted rows). Every expert runs, on zero rows if
none chose it, so that every rank has a gradient (zero) for every expert. There is no capacity
limit: no token is ever dropped.

`load_balancing_loss` is the Switch Transformer auxiliary loss (arXiv 2101.03961, eq. 4-6) in
transformers' form: over all MoE layers' router logits together,

    aux = E * sum_e f_e P_e,  f_e = (tokens routed to e) / rows,  P_e = mean router prob of e,

rows counting every (layer, token) pair (f sums to k over e). It is smallest (k) when routing is
uniform; only P carries a gradient.

Tests: `.venv/bin/python -m pytest -q tests/test_moe.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.linear import Linear


class MixtralExpert(nn.Module):
    """Mixtral's SwiGLU expert: w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.w1 = Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Top-k routed experts; `router_logits` keeps the last training forward's (N, E) logits
    for the load-balancing loss (None in eval: a teacher keeps nothing)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        renormalize: bool,
        make_expert: Callable[[], nn.Module],
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"config key num_experts_per_tok={top_k} must be in 1..{num_experts} (the experts)"
            )
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(make_expert() for _ in range(num_experts))
        self.router_logits: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        logits = self.gate(x)  # (N, E)
        probs = logits.float().softmax(-1)  # fp32, as transformers
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k) each, best first
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype).reshape(-1)  # (N k,): slot s is token s // k
        # Slots sorted by expert: expert e owns the next counts[e] of them.
        order = chosen.reshape(-1).argsort(stable=True)  # (N k,)
        counts = torch.bincount(chosen.reshape(-1), minlength=len(self.experts))
        out = torch.zeros_like(x)
        for expert, slots in zip(self.experts, order.split(counts.tolist())):  # host sync
            tokens = slots // self.top_k
            out.index_add_(0, tokens, expert(x[tokens]) * weights[slots, None])
        self.router_logits = logits if self.training else None
        return out.reshape(shape)


def load_balancing_loss(
    router_logits: Sequence[Tensor], top_k: int, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(aux, expert load) over the router logits of every MoE layer, each (N, E).

    mask (N,) bool: the tokens that count (padding excluded); None counts all. aux is the
    Switch loss above, fp32, differentiable through P. load (E,) is the share of routing slots
    each expert took, summed over layers and divided by the number of (layer, token, slot)
    triples: 1/E each when balanced, detached.
    """
    num_experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    weight = torch.ones(router_logits[0].shape[0], device=device) if mask is None else mask.float()
    routed = torch.zeros(num_experts, device=device)  # sum over layers of tokens sent to e
    prob_sum = torch.zeros(num_experts, device=device)  # sum over layers of router probs of e
    for logits in router_logits:
        probs = logits.float().softmax(-1)  # (N, E)
        chosen = probs.topk(top_k, dim=-1).indices  # (N, k)
        routed = routed.scatter_add(0, chosen.reshape(-1), weight.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * weight[:, None]).sum(0)
    rows = (weight.sum() * len(router_logits)).clamp(min=1.0)  # no token: aux 0, not NaN
    f, p = routed / rows, prob_sum / rows  # f sums to k, p to 1
    aux = num_experts * (f * p).sum()
    return aux, (f / top_k).detach()
