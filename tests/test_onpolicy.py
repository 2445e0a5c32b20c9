"""Checks kd/onpolicy.py, kd/gkd.py (arXiv 2306.13649) and kd/minillm.py (arXiv 2306.08543):

* teacher-mixed sampling draws from alpha p + (1 - alpha) q (empirical first-token
  frequencies) and the recorded log-probabilities and importance weights q / mix equal the
  formula on full forwards of the sampled sequences;
* returns (with and without length normalization), whitened advantages and the PPO clipped
  surrogate equal hand-computed / float64 numpy references;
* rollouts become right-padded batches whose labels and aligned per-token values sit where
  the response tokens are;
* on a small peaky synthetic teacher, GKD (JSD) and MiniLLM both lower the student's
  sequence-level reverse KL to the teacher on the student's own samples;
* 2 gloo ranks with FSDP2-sharded models, whose rollouts finish at different lengths, complete
  (the done flag is all-reduced) and take a MiniLLM gradient step;
* bad input (text records for an on-policy method, a different student tokenizer) is a
  one-line ValueError.

Run: `.venv/bin/python -m pytest -q tests/test_onpolicy.py`.
"""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from kd.data import IGNORE, Example
from kd.gkd import gkd_micro_batches, on_policy
from kd.losses import LossOptions, distillation_loss, log_probs, reverse_kl
from kd.minillm import (
    importance_weights,
    minillm_batch,
    minillm_loss,
    minillm_micro_batches,
    ppo_clipped_sum,
    returns,
    whiten,
)
from kd.model import Transformer
from kd.model_config import ModelConfig
from kd.onpolicy import (
    RolloutConfig,
    Sampler,
    align,
    load_prompt_examples,
    rollout,
    rollout_batch,
    rollout_metrics,
    rollout_sums,
)
from kd.tokenizer import load_tokenizer
from tests.tiny_tokenizer import make_tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: on a busy 2-core machine, two intra-op threads spin-wait on each
    other and make every matmul ~20x slower. One thread (torchrun's default too), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


V = 16  # tiny vocabulary: sampling frequencies are measurable and models are fast
EOS = 2


def tiny_model(*, seed: int, head_std: float = 0.02, layers: int = 1) -> Transformer:
    """A 1-layer untied model; head_std ~1 makes its next-token distributions peaky (logit std
    ~sqrt(H))."""
    config = ModelConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = Transformer(config)
    model.init_weights(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.normal_(
            0.0, head_std, generator=torch.Generator().manual_seed(seed + 1)
        )
    return model


def config(max_new_tokens: int, eos: frozenset[int] = frozenset({EOS})) -> RolloutConfig:
    return RolloutConfig(max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_id=0, vocab_size=V)


# ----------------------------------------------------------------------------- sampling


def test_teacher_mixed_first_token_frequencies() -> None:
    student, teacher = tiny_model(seed=0, head_std=0.3), tiny_model(seed=1, head_std=0.3)
    prompt, n, alpha = [5, 7, 3], 20000, 0.2
    r = rollout(student, teacher, [prompt] * n, config(1), teacher_mix_alpha=alpha, seed=0)
    with torch.no_grad():
        q = student(torch.tensor([prompt]))[0, -1].double().softmax(-1)
        p = teacher(torch.tensor([prompt]))[0, -1].double().softmax(-1)
    want = (alpha * p + (1 - alpha) * q).numpy()
    got = np.bincount(r.tokens[:, 0].numpy(), minlength=V) / n
    # Each frequency is a binomial mean: std sqrt(m (1 - m) / n) <= 0.0035; 5 std of slack.
    bound = 5 * np.sqrt(want * (1 - want) / n)
    assert (np.abs(got - want) <= bound).all(), (
        f"max |diff| {np.abs(got - want).max():.4f}, bound {bound.max():.4f}"
    )
    # ...and the student alone would differ measurably from that mixture (the test has power).
    assert np.abs(q.numpy() - want).max() > 3 * bound.max()


def test_recorded_logprobs_and_importance_weights_match_the_formula() -> None:
    student, teacher = tiny_model(seed=0, head_std=0.5), tiny_model(seed=1, head_std=0.5)
    prompts = [[5, 7, 3], [9], [4, 4, 8, 1, 6]]
    alpha = 0.2
    r = rollout(student, teacher, prompts, config(6), teacher_mix_alpha=alpha, seed=3)
    batch = rollout_batch(r, pad_id=0)
    width = batch["input_ids"].shape[1]
    with (
        torch.no_grad()
    ):  # full forwards of prompt + response, right padded: logits[t] predicts labels[t]
        log_q = student(batch["input_ids"]).double().log_softmax(-1)
        log_p = teacher(batch["input_ids"]).double().log_softmax(-1)
    valid = batch["labels"] != IGNORE
    y = batch["labels"].clamp(min=0)[..., None]
    q_y, p_y = log_q.gather(-1, y).squeeze(-1).exp(), log_p.gather(-1, y).squeeze(-1).exp()
    want_w = (q_y / (alpha * p_y + (1 - alpha) * q_y))[valid]
    got_w = align(r, importance_weights(r.student_logprobs, r.behaviour_logprobs), width)[
        valid
    ].double()
    # Cached decoding vs one full forward, fp32: ~1e-6 apart; 1e-4 leaves room for exp().
    assert (got_w - want_w).abs().max() < 1e-4, f"max |diff| {(got_w - want_w).abs().max():.2e}"
    for recorded, full in ((r.student_logprobs, q_y), (r.teacher_logprobs, p_y)):
        diff = (align(r, recorded, width)[valid].double() - full.log()[valid]).abs().max()
        assert diff < 1e-4, f"max |diff| {diff:.2e}"
    assert int(valid.sum()) == int(r.lengths.sum()) and r.tokens.shape[1] <= 6


def test_rollout_batch_layout_and_eos() -> None:
    student = tiny_model(seed=0, head_std=1.0)
    prompts = [[5, 7, 3], [9], [4, 4, 8, 1, 6], [3, 3]]
    r = rollout(student, None, prompts, config(8, eos=frozenset({EOS, 11})), seed=1)
    batch = rollout_batch(r, pad_id=0)
    for b, (prompt, row, n) in enumerate(zip(prompts, r.tokens.tolist(), r.lengths.tolist())):
        ids, labels = batch["input_ids"][b].tolist(), batch["labels"][b].tolist()
        assert ids[: len(prompt) + n] == prompt + row[:n]
        assert [t for t in labels if t != IGNORE] == row[:n]
        assert labels[len(prompt) - 1] == row[0]
        ended = any(t in (EOS, 11) for t in row[:n])
        assert ended == (row[n - 1] in (EOS, 11)) and (
            ended or n == r.tokens.shape[1]
        )  # EOS is kept, then stop
        assert all(t == 0 for t in row[n:])  # finished rows are fed padding
    assert r.student_logprobs is not None and r.teacher_logprobs is None


def test_seq_kd_rollout_samples_the_teacher_alone() -> None:
    teacher = tiny_model(seed=1, head_std=0.5)
    r = rollout(None, teacher, [[5, 7, 3]] * 4, config(3), teacher_mix_alpha=1.0, seed=0)
    assert r.student_logprobs is None
    diff = (r.behaviour_logprobs - r.teacher_logprobs).abs().max()
    assert diff < 1e-6, f"the sampler is the teacher: max |diff| {diff:.2e}"
    with pytest.raises(ValueError, match="teacher_mix_alpha"):
        rollout(None, teacher, [[5]], config(3), teacher_mix_alpha=0.5)


# ----------------------------------------------------------------------------- MiniLLM math


def test_returns_hand_computed() -> None:
    rewards = torch.tensor(
        [[1.0, 2.0, 3.0, 7.0], [0.5, -1.0, 9.0, 9.0]]
    )  # off-mask values must not count
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    # Row 0: R = [1+2+3, 2+3, 3] = [6, 5, 3]; remaining tokens [3, 2, 1] -> [2, 2.5, 3].
    # Row 1: R = [-0.5, -1]; remaining [2, 1] -> [-0.25, -1].
    plain = torch.tensor([[6.0, 5.0, 3.0, 0.0], [-0.5, -1.0, 0.0, 0.0]])
    normed = torch.tensor([[2.0, 2.5, 3.0, 0.0], [-0.25, -1.0, 0.0, 0.0]])
    for length_norm, want in ((False, plain), (True, normed)):
        got = returns(rewards, mask, length_norm=length_norm)
        assert (got - want).abs().max() < 1e-6, (
            f"length_norm={length_norm}: max |diff| {(got - want).abs().max():.2e}"
        )

    # Whitening over the 5 response tokens: mean 1.25, biased variance, as LMOps' global whiten.
    values = np.array([2.0, 2.5, 3.0, -0.25, -1.0])
    want = (values - values.mean()) / np.sqrt(values.var() + 1e-8)
    got = whiten(normed, mask)[mask].double().numpy()
    assert np.abs(got - want).max() < 1e-6, f"max |diff| {np.abs(got - want).max():.2e}"
    assert whiten(normed, mask)[~mask].abs().max() == 0


def test_whiten_uses_the_all_reduced_statistics() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    # Two "ranks" each holding one row: the all-reduce hands each rank the sum of both.
    other = torch.stack(
        [x[1].double().sum(), x[1].double().pow(2).sum(), torch.tensor(2.0, dtype=torch.float64)]
    )
    got = whiten(x[:1], mask[:1], all_reduce_sum=lambda s: s + other)
    want = whiten(x, mask)[:1]
    assert (got - want).abs().max() < 1e-6, f"max |diff| {(got - want).abs().max():.2e}"


def test_ppo_clipped_surrogate_against_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    logp, old = torch.randn(3, 5, generator=g) * 0.3 - 2, torch.randn(3, 5, generator=g) * 0.3 - 2
    adv, w = torch.randn(3, 5, generator=g), torch.rand(3, 5, generator=g) * 1.5 + 0.25
    mask = torch.rand(3, 5, generator=g) > 0.3
    got = float(ppo_clipped_sum(logp, old, adv, w, mask, clip=0.2))
    lp, lo, a, ww, m = (t.double().numpy() for t in (logp, old, adv, w, mask))
    want = 0.0
    for i, j in zip(*np.nonzero(m)):  # written per token from the PPO definition
        rho = np.exp(lp[i, j] - lo[i, j]) * ww[i, j]
        want += max(-a[i, j] * rho, -a[i, j] * min(max(rho, 0.8), 1.2))
    assert abs(got - want) < 1e-5, f"|diff| {abs(got - want):.2e}"

    # Gradient: zero for tokens clipped on the side the advantage pushes toward, -A rho otherwise.
    logp.requires_grad_(True)
    ppo_clipped_sum(logp, old, adv, w, mask, clip=0.2).backward()
    rho = (logp.detach() - old).exp() * w
    clipped = ((adv > 0) & (rho > 1.2)) | ((adv < 0) & (rho < 0.8))
    want_grad = torch.where(mask & ~clipped, -adv * rho, 0.0)
    assert (logp.grad - want_grad).abs().max() < 1e-5, (
        f"max |diff| {(logp.grad - want_grad).abs().max():.2e}"
    )


def test_minillm_loss_terms() -> None:
    """The loss = PPO sum / N + mean token KL(q || p); at sampling time rho = w and the value is
    checked."""
    student, teacher = tiny_model(seed=0, head_std=0.5), tiny_model(seed=1, head_std=0.5)
    r = rollout(student, teacher, [[5, 7, 3], [9, 1]], config(5), teacher_mix_alpha=0.2, seed=2)
    batch = minillm_batch(r, pad_id=0)
    loss, metrics = minillm_loss(student, teacher, batch, num_tokens=None, vocab=V, chunk_size=3)
    valid = batch["labels"] != IGNORE
    with torch.no_grad():
        s_logits, t_logits = student(batch["input_ids"]), teacher(batch["input_ids"])
    single = reverse_kl(log_probs(t_logits, 1.0), log_probs(s_logits, 1.0))[valid].mean()
    pg = (
        ppo_clipped_sum(
            batch["old_logprobs"],
            batch["old_logprobs"],
            batch["advantages"],
            batch["weights"],
            valid,
            clip=0.2,
        )
        / valid.sum()
    )
    diff = abs(float(loss.detach()) - float(single + pg))
    assert diff < 1e-5, f"|diff| {diff:.2e}"  # fp32 sums of ~10 terms
    assert abs(float(metrics["divergence"]) - float(single)) < 1e-5
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())


# ----------------------------------------------------------------------------- both methods learn


def seq_reverse_kl(
    student: Transformer, teacher: Transformer, prompts: list[list[int]], seed: int
) -> float:
    """KL_seq(q || p) on the student's own samples: mean over rows of sum_t KL(q_t || p_t),
    the exact token-level KL along sampled prefixes (lower variance than sum log q/p)."""
    r = rollout(student, None, prompts, config(8), seed=seed)
    batch = rollout_batch(r, pad_id=0)
    valid = batch["labels"] != IGNORE
    with torch.no_grad():
        log_q = log_probs(student(batch["input_ids"]), 1.0)
        kl = reverse_kl(log_probs(teacher(batch["input_ids"]), 1.0), log_q)
    return float(torch.where(valid, kl, 0.0).sum() / len(prompts))


@pytest.mark.parametrize("method", ["gkd", "minillm"])
def test_on_policy_training_lowers_reverse_kl(method: str) -> None:
    torch.manual_seed(0)
    teacher = tiny_model(seed=1, head_std=1.0)  # peaky: logit std ~5.7
    student = tiny_model(seed=2)  # near-uniform
    prompts = [
        [int(t) for t in torch.randint(3, V, (3,), generator=torch.Generator().manual_seed(i))]
        for i in range(16)
    ]
    before = seq_reverse_kl(student, teacher, prompts, seed=100)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    for step in range(30):
        if method == "gkd":
            batch = rollout_batch(rollout(student, None, prompts, config(8), seed=step), pad_id=0)
            with torch.no_grad():
                t_logits = teacher(batch["input_ids"])
            loss, _ = distillation_loss(
                student(batch["input_ids"]),
                t_logits,
                batch["labels"],
                LossOptions(divergence="jsd", alpha=1.0, beta=0.5),
            )
        else:
            r = rollout(student, teacher, prompts, config(8), teacher_mix_alpha=0.2, seed=step)
            loss, _ = minillm_loss(
                student, teacher, minillm_batch(r, pad_id=0), num_tokens=None, vocab=V
            )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = seq_reverse_kl(student, teacher, prompts, seed=100)
    # Seeded: 45.9 -> 0.4 (GKD) and 1.0 (MiniLLM) here; a 4x drop leaves a wide margin for
    # platform rounding while a student that does not learn (or learns the wrong way) fails.
    assert after < 0.25 * before, f"{method}: reverse KL {before:.3f} -> {after:.3f}"


# ----------------------------------------------------------------------------- GKD coin and logging


def test_gkd_coin_is_deterministic_and_has_rate_lmbda() -> None:
    flips = [
        on_policy(seed=7, step=s, micro_batch=m, lmbda=0.3) for s in range(500) for m in range(2)
    ]
    again = [
        on_policy(seed=7, step=s, micro_batch=m, lmbda=0.3) for s in range(500) for m in range(2)
    ]
    assert flips == again  # the same on every rank: all roll out or none does
    # 1000 Bernoulli(0.3) draws: std 0.0145; 4 std of slack.
    assert abs(np.mean(flips) - 0.3) < 0.06, f"rate {np.mean(flips):.3f}"
    assert all(on_policy(seed=1, step=s, micro_batch=0, lmbda=1.0) for s in range(50))
    assert not any(on_policy(seed=1, step=s, micro_batch=0, lmbda=0.0) for s in range(50))


def test_gkd_micro_batches_mix_student_data_and_teacher_batches() -> None:
    student, teacher = tiny_model(seed=0, head_std=0.5), tiny_model(seed=1, head_std=0.5)
    # prompt [5, 7, 3], response [9, 9]
    data = Example([5, 7, 3, 9, 9], [IGNORE, IGNORE, 9, 9, IGNORE], [5, 7, 3], 2)
    micro = [[data, data] for _ in range(6)]
    for seq_kd in (False, True):
        sampler = Sampler(student, teacher, config(4), seed=0, rank=0)
        batches, rollouts = gkd_micro_batches(sampler, micro, step=3, lmbda=0.5, seq_kd=seq_kd)
        flips = [on_policy(seed=0, step=3, micro_batch=m, lmbda=0.5) for m in range(6)]
        # both kinds occur
        assert len(batches) == 6 and len(rollouts) == sum(flips) and 0 < sum(flips) < 6
        for batch, student_made in zip(batches, flips):
            from_data = (
                batch["input_ids"][0, :5].tolist() == data.input_ids
                and batch["labels"][0].tolist() == data.labels
            )
            # seq_kd: sampled by the teacher instead
            assert from_data == (not student_made and not seq_kd)
            assert batch["input_ids"][0, :3].tolist() == [5, 7, 3]
    assert all(r.student_logprobs is not None and r.teacher_logprobs is not None for r in rollouts)


def test_rollout_metrics() -> None:
    student, teacher = tiny_model(seed=0, head_std=0.5), tiny_model(seed=1, head_std=0.5)
    r = rollout(student, teacher, [[5, 7, 3], [9]], config(6), seed=0)
    sums = rollout_sums([r], micro_batches=4)
    metrics = rollout_metrics(sums)
    assert metrics["response_length"] == float(r.lengths.float().mean())
    want_kl = float((r.student_logprobs - r.teacher_logprobs).sum()) / 2
    assert abs(metrics["seq_reverse_kl"] - want_kl) < 1e-6 and metrics["on_policy_fraction"] == 0.25
    assert 0.0 <= metrics["repetition"] <= 1.0


# ----------------------------------------------------------------------------- bad input


def test_text_records_are_refused_for_on_policy_methods(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(make_tiny_tokenizer(tmp_path / "tok"))
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "Hi", "response": "Hello"}\n{"text": "plain pretraining text"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: method=minillm .* has none"):
        load_prompt_examples(
            path, tokenizer, method="minillm", seq_len=64, max_new_tokens=16, needs_responses=False
        )
    path.write_text('{"prompt": "What is the capital of France?"}\n')
    with pytest.raises(ValueError, match=r'data.jsonl:1: no "response".*set lmbda = 1'):
        load_prompt_examples(
            path, tokenizer, method="gkd", seq_len=64, max_new_tokens=16, needs_responses=True
        )
    examples, _ = load_prompt_examples(
        path, tokenizer, method="gkd", seq_len=64, max_new_tokens=16, needs_responses=False
    )
    assert examples[0].prompt_ids and examples[0].num_targets == 0


def test_tokenizer_mismatch_is_an_error(tmp_path: Path) -> None:
    """train.py checks every model's tokenizer against the teacher's, for every method: on-policy
    ones feed the student's sampled ids to the teacher, so one vocabulary is a must there."""
    from kd.config import TrainConfig
    from kd.training import check_tokenizer

    teacher_dir = make_tiny_tokenizer(tmp_path / "teacher")
    student_dir = make_tiny_tokenizer(tmp_path / "student")
    spec = json.loads((student_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same tokens, two ids swapped: other text per id
    (student_dir / "tokenizer.json").write_text(json.dumps(spec))
    cfg = TrainConfig(
        teacher=(str(teacher_dir),), student=str(student_dir), data=("prompts.jsonl",)
    )
    with pytest.raises(ValueError, match="differs from the teacher's"):
        check_tokenizer(cfg)


# ----------------------------------------------------------------------------- 2 ranks


def _two_rank_worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
    )
    from kd import parallel

    torch.set_num_threads(1)  # as torchrun would: 2 ranks on 2 cores
    parallel.init_distributed()
    try:
        student, teacher = (
            tiny_model(seed=0, head_std=0.4, layers=2),
            tiny_model(seed=1, head_std=0.4, layers=2),
        )
        parallel.shard_student(
            student, precision="fp32", activation_checkpointing=False, compile=False
        )
        parallel.shard_teacher(teacher, compile=False)

        # Different prompt lengths and seeds per rank: the ranks' rows end at different steps.
        prompts = [[5, 7, 3], [9]] if rank == 0 else [[4, 4, 8, 1, 6, 2, 9]]
        examples = [[Example(p, [IGNORE] * len(p), p, 0) for p in prompts]]
        eos = frozenset({EOS, 3})
        sampler = Sampler(
            student, teacher, config(24, eos), seed=10, rank=rank, all_done=parallel.all_ranks
        )
        (batch,), (r,) = minillm_micro_batches(
            sampler, examples, step=0, all_reduce_sum=parallel.all_reduce_sum
        )
        n = parallel.agree([float((batch["labels"] != IGNORE).sum())])[0]
        loss, _ = minillm_loss(student, teacher, batch, num_tokens=int(n), vocab=V)
        loss.backward()
        results[rank] = {
            "steps": r.tokens.shape[1],
            "longest": int(r.lengths.max()),
            "grad_finite": all(
                torch.isfinite(p.grad.full_tensor()).all() for p in student.parameters()
            ),
        }
        # Leave together: the group must not go away under a peer's last collective.
        parallel.barrier()
    finally:
        parallel.shutdown()  # rank 0 last: see its docstring


def test_two_ranks_with_different_lengths_complete() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    context = mp.spawn(_two_rank_worker, args=(port, results), nprocs=2, join=False)
    # A rank that stopped decoding early would leave the other blocked in an all-gather:
    # a timeout turns that deadlock into a failure.
    for process in context.processes:
        process.join(timeout=120)
    alive = [p.pid for p in context.processes if p.is_alive()]
    for p in context.processes:
        if p.is_alive():
            p.kill()
    assert not alive, "ranks deadlocked in the rollout"
    assert all(p.exitcode == 0 for p in context.processes), [p.exitcode for p in context.processes]
    r0, r1 = results[0], results[1]
    assert r0["longest"] != r1["longest"], (
        f"ranks sampled equal lengths ({r0['longest']}): the test lost its point"
    )
    # both stepped until all were done
    assert r0["steps"] == r1["steps"] == max(r0["longest"], r1["longest"])
    assert r0["grad_finite"] and r1["grad_finite"]
