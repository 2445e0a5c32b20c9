"""Checks kd/sampling.py: filtering against a float64 numpy reference, seeded reproducibility,
sampling frequencies against softmax(logits / T), and generation against `transformers`.

Run: `.venv/bin/python -m pytest -q tests/test_sampling.py`.
"""
import numpy as np
import pytest
import torch

from kd.sampling import sample_from_probs, sample_next, sampling_probs


def reference_probs(logits: np.ndarray, *, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Written from the definitions, row by row, in float64."""
    out = np.zeros_like(logits, dtype=np.float64)
    for b, row in enumerate(logits.astype(np.float64)):
        z = row / temperature
        order = np.argsort(-z, kind="stable")
        keep = order if top_k == 0 else order[: top_k]
        p = np.exp(z[keep] - z[keep].max())
        p /= p.sum()
        # smallest prefix of the sorted survivors whose mass reaches top_p
        n = int(np.searchsorted(np.cumsum(p), top_p) + 1) if top_p < 1 else len(keep)
        kept = keep[:n]
        q = np.exp(z[kept] - z[kept].max())
        out[b, kept] = q / q.sum()
    return out


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 10, 0.5), (0.5, 3, 0.95), (1.0, 1, 1.0)],
)
def test_filtering_matches_numpy_reference(temperature: float, top_k: int, top_p: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    got = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p).double().numpy()
    want = reference_probs(logits.numpy(), temperature=temperature, top_k=top_k, top_p=top_p)
    # The kept set must be identical; the renormalized values agree to fp32 softmax precision.
    np.testing.assert_array_equal(got > 0, want > 0)
    assert np.abs(got - want).max() < 1e-6, f"max |diff| {np.abs(got - want).max():.2e}"


def test_greedy_is_argmax_and_one_hot() -> None:
    logits = torch.randn(4, 30)
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))
    probs = sampling_probs(logits, temperature=0.0)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.equal(probs.sum(-1), torch.ones(4))


def test_bad_arguments_raise_value_error() -> None:
    logits = torch.zeros(1, 4)
    for kwargs in ({"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            sample_next(logits, **kwargs)


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.randn(8, 100)
    draws = [
        [sample_next(logits, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(s)) for _ in range(2)]
        for s in (1, 1, 2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(draws[0], draws[1]))
    assert not all(torch.equal(a, b) for a, b in zip(draws[0], draws[2]))


def test_sampling_frequencies_match_tempered_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 8)
    temperature, n = 0.7, 40_000
    want = torch.softmax(logits[0].double() / temperature, -1)
    probs = sampling_probs(logits.expand(n, -1), temperature=temperature)
    draws = sample_from_probs(probs, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=8).double()
    # Pearson chi-square with 7 degrees of freedom: mean 7, P(chi2 > 24.3) = 0.001,
    # so a correct sampler fails this about once in a thousand seeds (and this seed is fixed).
    chi2 = (((counts - n * want) ** 2) / (n * want)).sum().item()
    assert chi2 < 24.3, f"chi-square {chi2:.1f} over 7 dof; counts {counts.tolist()}"


def test_filtered_tokens_are_never_sampled() -> None:
    logits = torch.randn(2000, 30)
    probs = sampling_probs(logits, top_k=4, top_p=0.7)
    draws = sample_from_probs(probs, generator=torch.Generator().manual_seed(3))
    assert bool((probs.gather(1, draws[:, None]) > 0).all())
