"""Checks kd/sampling.py: filtering against a float64 numpy reference, seeded reproducibility,
sampling frequencies against softmax(logits / T), generation against `transformers`, and the
oneDNN switch for single-row bf16 decoding.

Run: `.venv/bin/python -m pytest -q tests/test_sampling.py`.
"""

import numpy as np
import pytest
import torch

from kd.sampling import generate, sample_from_probs, sample_next, sampling_probs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def reference_probs(
    logits: np.ndarray, *, temperature: float, top_k: int, top_p: float
) -> np.ndarray:
    """Written from the definitions, row by row, in float64."""
    out = np.zeros_like(logits, dtype=np.float64)
    for b, row in enumerate(logits.astype(np.float64)):
        z = row / temperature
        order = np.argsort(-z, kind="stable")
        keep = order if top_k == 0 else order[:top_k]
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
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.equal(
        probs.sum(-1), torch.ones(4)
    )


def test_bad_arguments_raise_value_error() -> None:
    logits = torch.zeros(1, 4)
    for kwargs in ({"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            sample_next(logits, **kwargs)


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.randn(8, 100)
    draws = [
        [
            sample_next(logits, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(s))
            for _ in range(2)
        ]
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


# ---------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The same tiny random llama checkpoint loaded by kd and by transformers, fp32, eval."""
    from transformers import AutoModelForCausalLM

    from kd.hf import load_model
    from tests.tiny_models import make_tiny_checkpoint

    # initializer_range 0.2 (not 0.02): peaked logits, so greedy paths are varied and no
    # argmax is a near-tie that float rounding could flip.
    path = make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny_llama"), "llama", initializer_range=0.2
    )
    ours = load_model(path, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, theirs


PROMPTS = [[5, 17, 99, 3, 42, 8, 200], [11, 12], [7, 250, 31, 64]]


def test_greedy_generation_matches_transformers(tiny_pair) -> None:
    ours, theirs = tiny_pair
    alone = []
    for p in PROMPTS:
        want = theirs.generate(
            torch.tensor([p]),
            max_new_tokens=20,
            do_sample=False,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(p) :].tolist()
        got = generate(ours, [p], max_new_tokens=20, temperature=0.0, eos_token_ids=None, pad_id=0)[
            0
        ]
        assert got == want, f"prompt {p}: ours {got} vs transformers {want}"
        alone.append(got)
    # Left-padded batch of different lengths: each row as if it were alone.
    batched = generate(
        ours, PROMPTS, max_new_tokens=20, temperature=0.0, eos_token_ids=None, pad_id=0
    )
    assert batched == alone


def test_cached_decoding_equals_full_forward(tiny_pair) -> None:
    model, _ = tiny_pair
    prompt, new = [5, 17, 99, 3], [42, 8, 200, 7, 1]
    seq = torch.tensor([prompt + new])
    full = model(seq)  # (1, T, V), no cache
    P, S = len(prompt), len(prompt) + len(new)
    model.setup_cache(1, S)
    try:
        cached = [model(seq[:, :P], input_pos=torch.arange(P))[:, -1]]
        for i in range(len(new) - 1):
            cached.append(model(seq[:, P + i : P + i + 1], input_pos=torch.tensor([P + i]))[:, -1])
    finally:
        model.clear_cache()
    cached = torch.stack(cached, dim=1)  # (1, len(new), V)
    # fp32, the same math in a different association (cache slices vs one matmul): 1e-5 is
    # ~100 ulps of logits of size ~10.
    diff = (cached - full[:, P - 1 : S - 1]).abs().max().item()
    assert diff < 1e-5, f"cached vs full forward max |diff| {diff:.2e}"


def test_eos_stops_each_row_and_the_loop(tiny_pair) -> None:
    model, _ = tiny_pair
    free = generate(
        model, PROMPTS, max_new_tokens=12, temperature=0.0, eos_token_ids=None, pad_id=0
    )
    eos = free[0][2]  # row 0 must stop at its third token (or earlier, if it occurs earlier)
    steps: list[torch.Tensor] = []
    got = generate(
        model,
        PROMPTS,
        max_new_tokens=12,
        temperature=0.0,
        eos_token_ids={eos},
        pad_id=0,
        on_token=steps.append,
    )
    for row, want in zip(got, free):
        end = want.index(eos) + 1 if eos in want else len(want)
        assert row == want[:end]  # EOS included, nothing after it
    assert len(steps) == max(len(r) for r in got)  # the loop ends when the last row does
    streamed = torch.stack(steps, dim=1).tolist()  # (B, steps)
    for row, s in zip(got, streamed):
        assert s[: len(row)] == row and all(t == 0 for t in s[len(row) :])  # pad after EOS


def test_seeded_generation_is_reproducible(tiny_pair) -> None:
    model, _ = tiny_pair
    kwargs = dict(
        max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, eos_token_ids=None, pad_id=0
    )
    a, b = (generate(model, PROMPTS, seed=7, **kwargs) for _ in range(2))
    assert a == b and a != generate(model, PROMPTS, seed=8, **kwargs)


def test_a_full_cache_stops_generation(tiny_pair) -> None:
    model, _ = tiny_pair
    prompt = PROMPTS[0]
    free = generate(
        model, [prompt], max_new_tokens=8, temperature=0.0, eos_token_ids=None, pad_id=0
    )[0]
    # len(prompt) + 2 slots: the prompt, then two fed-back tokens, and a third sampled last.
    short = generate(
        model,
        [prompt],
        max_new_tokens=8,
        temperature=0.0,
        eos_token_ids=None,
        pad_id=0,
        max_seq_len=len(prompt) + 2,
    )[0]
    assert short == free[:3]
    with pytest.raises(ValueError, match="does not fit max_seq_len"):
        generate(
            model,
            [prompt],
            max_new_tokens=8,
            eos_token_ids=None,
            pad_id=0,
            max_seq_len=len(prompt) - 1,
        )


def test_generate_leaves_process_wide_flags_alone(tiny_pair) -> None:
    """A library function does not flip process-wide flags such as oneDNN's (generate.py, the
    CLI, decides it): bf16 decoding of one row runs with the flag as the caller set it."""
    import copy

    bf16 = copy.deepcopy(tiny_pair[0]).to(torch.bfloat16)
    seen = []
    generate(
        bf16,
        PROMPTS[:1],
        max_new_tokens=4,
        temperature=0.0,
        eos_token_ids=None,
        pad_id=0,
        on_token=lambda ids: seen.append(torch.backends.mkldnn.enabled),
    )
    assert seen == [True] * 4 and torch.backends.mkldnn.enabled
