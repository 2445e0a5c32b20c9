"""Sampling and batched decoding with a static KV cache (gpt-fast style).

Pure functions first: `sampling_probs` is the exact distribution a token is drawn from
(temperature, then top-k, then top-p, the order `transformers` uses), `sample_from_probs`
draws from any such distribution, `sample_next` is the two together. On-policy distillation
(MiniLLM, arXiv 2306.08543) needs those probabilities, and its teacher-mixed sampling draws
from 0.2 p + 0.8 q through `sample_from_probs`.

Then the one decoding core, in small pieces: `prefill` (the left-padded prompts into the KV
cache, one forward), `decode_one_token` (one cached forward), and `decode`, the loop over
them that steps one model or several in lockstep and lets the caller choose each token.
`generate` (generate.py, the evaluation's greedy answers) is `decode` with `sample_next`;
on-policy rollouts (kd/onpolicy.py) are `decode` over student and teacher with a mixture.

    from kd.sampling import generate
    new_tokens = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.0,
                          eos_token_ids={2}, pad_id=2)

Tests: `.venv/bin/python -m pytest -q tests/test_sampling.py`.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kd.model import Head, Transformer


def _check_sampling_args(*, temperature: float, top_k: int, top_p: float) -> None:
    # `not x >= 0` rather than `x < 0`: NaN fails every comparison and must not pass.
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature} is not a number >= 0: use 0 for greedy or > 0")
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


def last_logits(hidden: torch.Tensor, head: Head) -> torch.Tensor:
    """output_fn for the prefill: logits of the last position only, (B, V), not (B, P, V)."""
    return head(hidden[:, -1])


# ----------------------------------------------------------------------------- decoding core


def this_rank_only(done: bool) -> bool:
    """`all_done` of a single process: every row is done when this rank's rows are."""
    return done


def left_padded(
    prompts: list[list[int]], *, pad_id: int, max_seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, P), mask (B, S)): row b holds its prompt in slots P - len(b) .. P - 1.

    The mask is True on every real slot, including all slots decoding will write (causality
    hides the future ones), and False on the left padding (kd/model.py's cache conventions).
    """
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.ones(B, max_seq_len, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, : P - len(p)] = False
    return tokens.to(device), mask.to(device)


def prefill(model: Transformer, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Write the prompts (B, P) into cache slots 0..P-1; logits (B, V) of the last position.

    mask (B, P) covers exactly the slots this call reads, so attention costs O(P), not O(S).
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return model(tokens, input_pos=positions, attention_mask=mask, output_fn=last_logits)


def decode_one_token(
    model: Transformer, ids: torch.Tensor, *, pos: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Feed ids (B,) at cache slot pos (1,); logits (B, V) of the next token.

    mask (B, pos + 1) covers the slots up to and including pos: attention reads only those.
    """
    return model(ids[:, None], input_pos=pos, attention_mask=mask)[:, -1]


def decode(
    models: list[Transformer],
    prompts: list[list[int]],
    *,
    steps: int,
    next_token: Callable[[list[torch.Tensor]], torch.Tensor],
    eos_token_ids: set[int] | frozenset[int] | None,
    pad_id: int,
    max_seq_len: int | None = None,
    all_done: Callable[[bool], bool] = this_rank_only,
    cache_dtype: torch.dtype | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Decode up to `steps` tokens per prompt, every model in lockstep; tokens (B, n), n <= steps.

    Each model prefills the left-padded prompts into its own KV cache, then at every step
    `next_token(logits)` turns the models' next-token logits (one (B, V) tensor per model, in
    `models`' order) into ids (B,); finished rows get pad_id instead. Every model is fed those
    ids, so several models (on-policy: student and teacher) score the same sequences. A row is
    finished after one of eos_token_ids (kept); the loop ends when every row is, or after
    `steps` tokens. The last token is never fed back: S = P + steps - 1 cache slots suffice.
    all_done: maps "every row of this rank finished" to "every rank finished" (an all-reduce
        under torch.distributed): every rank then makes the same forward calls, as FSDP needs.
    on_token: called with each step's ids (B,), pad_id on finished rows (a host sync to read).
    """
    device = models[0].head_weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    S = max_seq_len or P + steps - 1
    tokens, mask = left_padded(prompts, pad_id=pad_id, max_seq_len=S, device=device)
    eos = torch.tensor(sorted(eos_token_ids or ()), dtype=torch.long, device=device)
    # On a CPU every op has finished when it returns, so checking "all rows done" costs
    # nothing; on an accelerator each check drains the queue, so check every few steps.
    # The schedule depends on the step only: the same on every rank.
    check_every = 1 if device.type == "cpu" else 8
    out = torch.full((B, steps), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for model in models:
        model.setup_cache(B, S, dtype=cache_dtype, device=device)
    try:
        # Each call passes the mask up to the last slot it writes: attention then reads only
        # the used slots, and the host knows that length without a sync.
        logits = [prefill(model, tokens, mask[:, :P]) for model in models]
        pos = torch.tensor([P], device=device)  # (1,): the slot the next decode step writes
        for i in range(steps):
            ids = next_token(logits).masked_fill(done, pad_id)  # (B,)
            out[:, i] = ids
            if on_token is not None:
                on_token(ids)
            done |= torch.isin(ids, eos)
            if i + 1 == steps or ((i + 1) % check_every == 0 and all_done(bool(done.all()))):
                break  # bool(): a host-device sync
            step_mask = mask[:, : P + i + 1]
            logits = [decode_one_token(m, ids, pos=pos, mask=step_mask) for m in models]
            pos += 1
    finally:
        for model in models:
            model.clear_cache()
    return out[:, : i + 1]


def response_mask(tokens: torch.Tensor, eos_token_ids: set[int] | frozenset[int]) -> torch.Tensor:
    """(B, n) bool: True on each row's decoded tokens up to and including its first EOS."""
    eos = torch.tensor(sorted(eos_token_ids), dtype=torch.long, device=tokens.device)
    is_eos = torch.isin(tokens, eos).long()
    return (is_eos.cumsum(-1) - is_eos) == 0  # no EOS before this token


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
    P = max(len(p) for p in prompts)
    S = max_seq_len or P + max_new_tokens - 1
    if P > S:
        raise ValueError(
            f"the longest prompt ({P} tokens) does not fit max_seq_len={S}: raise it or shorten"
        )
    device = model.head_weight.device
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)

    def next_token(logits: list[torch.Tensor]) -> torch.Tensor:
        return sample_next(
            logits[0], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )

    # Decode step i writes the token sampled at step i at slot P + i and samples token i + 1;
    # the last token is not written, so S slots give S - P + 1 tokens.
    out = decode(
        [model],
        prompts,
        steps=min(max_new_tokens, S - P + 1),
        next_token=next_token,
        eos_token_ids=eos_token_ids,
        pad_id=pad_id,
        max_seq_len=S,
        on_token=on_token,
    )
    kept = response_mask(out, eos_token_ids or set()).sum(-1)  # each row through its EOS
    return [row[:n] for row, n in zip(out.tolist(), kept.tolist())]  # one host sync per batch
