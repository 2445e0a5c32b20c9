"""Sampling and batched generation with a static KV cache (gpt-fast style).

Pure functions first: `sampling_probs` is the exact distribution a token is drawn from
(temperature, then top-k, then top-p, the order `transformers` uses), `sample_from_probs`
draws from any such distribution, `sample_next` is the two together. On-policy distillation
(MiniLLM, arXiv 2306.08543) needs those probabilities, and its teacher-mixed sampling draws
from 0.2 p + 0.8 q through `sample_from_probs`.

Then `generate`: left-padded batched prompts, one prefill forward, then one cached decode
forward per new token, each row stopping at its own EOS.

    from kd.sampling import generate
    new_tokens = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.0,
                          eos_token_ids={2}, pad_id=2)

Tests: `.venv/bin/python -m pytest -q tests/test_sampling.py`.
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _check_sampling_args(*, temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is negative: use 0 for greedy or a value > 0")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} is negative: use 0 to disable top-k or a value >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} is outside (0, 1]: use 1.0 to disable nucleus sampling")


def sampling_probs(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """The distribution `sample_next` draws from: fp32 probabilities (B, V), rows sum to 1.

    temperature 0 is greedy: a one-hot on the argmax. Otherwise, in fp32:
      z = logits / T
      top-k: keep z_i >= the k-th largest z (ties at the boundary are all kept)
      top-p: on softmax(z) over the top-k survivors, sorted descending, keep the smallest
             prefix whose mass reaches top_p (the first token is always kept)
      probs = softmax(z) over the kept set, zero elsewhere.
    """
    _check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    z = logits.float() / temperature  # (B, V)
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]  # (B, 1)
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)  # (B, V)
        sorted_p = torch.softmax(sorted_z, dim=-1)
        # Mass strictly before each token; a token is dropped when that alone reaches top_p.
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return torch.softmax(z, dim=-1)


def sample_from_probs(probs: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of probs (B, V), drawn with P(i) = probs_i / sum(probs).

    Exponential race instead of torch.multinomial (gpt-fast's trick, no host-device sync):
    with E_i ~ Exp(1), E_i / p_i ~ Exp(rate p_i), and the smallest of independent exponentials
    is i with probability p_i / sum_j p_j, so argmax p_i / E_i is an exact sample.
    The generator must live on probs' device.
    """
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V); temperature 0 is greedy argmax."""
    if temperature == 0:
        _check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p)
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return sample_from_probs(probs, generator=generator)
