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

from kd.linear import linear
from kd.model import Transformer


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


def sample_from_probs(
    probs: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
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
        # In fp32: argmax over bf16 is ~3x slower on CPU (~2 ms for 8 x 49152), same answer.
        return logits.float().argmax(dim=-1)
    probs = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return sample_from_probs(probs, generator=generator)


def last_logits(hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    """output_fn for the prefill: logits of the last position only, (B, V), not (B, P, V)."""
    return linear(hidden[:, -1], head_weight)


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: set[int] | None,
    pad_id: int,
    seed: int | None = None,
    max_seq_len: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt: a row ends with its EOS token (included) or after max_new_tokens.

    model: a `kd.model.Transformer`; its KV cache is set up for this batch and dropped at the end.
    prompts: token ids, any lengths (each non-empty); left-padded with pad_id, masked out.
    max_seq_len: cache slots per row; the last sampled token is never fed back, so the
        default, longest prompt + max_new_tokens - 1, is exactly enough. A smaller cache
        stops generation when it is full.
    seed: seeds a generator on the model's device; None draws from torch's global RNG.
    on_token: called after every step with the sampled ids (B,) on the model's device; rows
        that had already finished hold pad_id. Reading the ids is a host-device sync.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    _check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p)
    device = model.head_weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    S = max_seq_len or P + max_new_tokens - 1
    if P > S:
        raise ValueError(
            f"the longest prompt ({P} tokens) does not fit max_seq_len={S}: raise it or shorten"
        )
    # Decode step i writes the token sampled at step i at slot P + i and samples token i + 1;
    # the last token is not written, so S slots give S - P + 1 tokens.
    steps = min(max_new_tokens, S - P + 1)

    # Left padding: row b holds its prompt in slots P - len(b) .. P - 1. The mask is True on
    # every real slot, including all slots generation will write (causality hides the future).
    tokens = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.ones(B, S, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, : P - len(p)] = False
    tokens, mask = tokens.to(device), mask.to(device)
    eos = torch.tensor(sorted(eos_token_ids or ()), dtype=torch.long, device=device)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    # On a CPU every op has finished when it returns, so checking "all rows done" costs
    # nothing; on an accelerator each check drains the queue, so check every few steps.
    check_every = 1 if device.type == "cpu" else 8
    # A bf16 decode step on a CPU with one row multiplies one vector by every weight matrix.
    # There PyTorch's own bf16 kernel streams the weights ~2x faster than oneDNN's matmul
    # (measured, 1 thread: ~14 vs ~6.5 GB/s of weights); from a few rows on (and in the
    # prefill) oneDNN is ~3x faster. So those decode steps run with oneDNN off: a process-wide
    # flag, restored on return.
    one_row_bf16 = device.type == "cpu" and B == 1 and model.head_weight.dtype == torch.bfloat16
    mkldnn_enabled = torch.backends.mkldnn.enabled

    model.setup_cache(B, S, device=device)
    try:
        # Each call passes the mask up to the last slot it writes: attention then reads only
        # the used slots, not all S (kd/model.py's docstring), and the host knows that length.
        logits = model(
            tokens,
            input_pos=torch.arange(P, device=device),
            attention_mask=mask[:, :P],
            output_fn=last_logits,
        )  # (B, V)
        out = torch.full((B, steps), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        pos = torch.tensor([P], device=device)  # (1,): the slot the next decode step writes
        torch.backends.mkldnn.enabled = mkldnn_enabled and not one_row_bf16
        for i in range(steps):
            next_ids = sample_next(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            next_ids = next_ids.masked_fill(done, pad_id)  # (B,)
            out[:, i] = next_ids
            if on_token is not None:
                on_token(next_ids)
            done |= torch.isin(next_ids, eos)
            if i + 1 == steps or (
                (i + 1) % check_every == 0 and bool(done.all())
            ):  # host-device sync
                break
            logits = model(next_ids[:, None], input_pos=pos, attention_mask=mask[:, : P + i + 1])[
                :, -1
            ]  # (B, V)
            pos += 1
    finally:
        torch.backends.mkldnn.enabled = mkldnn_enabled
        model.clear_cache()

    # Cut each row after its first EOS (one host-device sync for the whole batch).
    results = []
    eos_set = set(eos.tolist())
    for row in out[:, : i + 1].tolist():
        end = next((j + 1 for j, t in enumerate(row) if t in eos_set), len(row))
        results.append(row[:end])
    return results
