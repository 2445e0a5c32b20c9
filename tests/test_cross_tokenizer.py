"""Checks kd/cross_tokenizer.py: ULD and the GOLD-style hybrid against float64 numpy references
written from their formulas (values; gradients: ULD's closed form, the hybrid's by central
differences of the numpy formula), masking of unaligned positions, the chunked loss against
the dense one, and the alignment of real tokenizers (SmolLM2's byte-level BPE against the tiny
tokenizer's, and against Gemma 3's SentencePiece where `make gemma3` has run) on strings that
break naive code: each aligned pair predicts text from the same byte, checked by decoding.

Run: `.venv/bin/python -m pytest -q tests/test_cross_tokenizer.py`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_tokenizer import TINY_VOCAB_SIZE, make_tiny_tokenizer

import train
from kd.chunked_loss import chunked_distillation_loss
from kd.cross_tokenizer import Aligner, CrossVocab, SharedVocab, shared_vocab, sorted_l1
from kd.data import IGNORE
from kd.losses import LossOptions, distillation_loss
from kd.token_bytes import token_bytes
from kd.tokenizer import load_tokenizer
from tests.tiny_models import make_tiny_checkpoint

GEMMA3_DIR = Path(__file__).resolve().parent.parent / "models" / "gemma3-270m"


def softmax(z: np.ndarray, t: float) -> np.ndarray:
    e = np.exp((z - z.max(-1, keepdims=True)) / t)
    return e / e.sum(-1, keepdims=True)


def np_uld(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """sum_i |p_(i) - q_(i)|, both sorted in decreasing order, the shorter padded with zeros."""
    n = max(p.shape[-1], q.shape[-1])
    ps = -np.sort(-np.pad(p, [(0, 0), (0, n - p.shape[-1])]), -1)
    qs = -np.sort(-np.pad(q, [(0, 0), (0, n - q.shape[-1])]), -1)
    return np.abs(ps - qs).sum(-1)


def np_gold(p, q, s_ids, t_ids, w_s, w_u):
    """w_S KL(p_S / P_S || q_S / Q_S) + w_U ULD(p with S zeroed, q with S zeroed)."""
    ps, qs = p[:, t_ids], q[:, s_ids]
    ps, qs = ps / ps.sum(-1, keepdims=True), qs / qs.sum(-1, keepdims=True)
    kl = (ps * (np.log(ps) - np.log(qs))).sum(-1)
    pu, qu = p.copy(), q.copy()
    pu[:, t_ids], qu[:, s_ids] = 0.0, 0.0
    return w_s * kl + w_u * np_uld(pu, qu)


def cases(seed: int, n: int = 6, v_t: int = 23, v_s: int = 17):
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(n, v_t, generator=g, dtype=torch.float64) * 2
    zs = (torch.randn(n, v_s, generator=g, dtype=torch.float64) * 2).requires_grad_()
    labels = torch.randint(0, v_s, (n,), generator=g)
    return zt, zs, labels


SHARED = SharedVocab(torch.tensor([0, 3, 4, 9, 16]), torch.tensor([5, 1, 22, 7, 0]))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_value_and_gradient_match_numpy(temperature):
    zt, zs, labels = cases(1)
    known = torch.ones(6, dtype=torch.bool)
    options = LossOptions(divergence="uld", alpha=1.0, temperature=temperature)
    loss, _ = distillation_loss(zs, CrossVocab(zt, known, None), labels, options, num_tokens=1)
    p, q = softmax(zt.numpy(), temperature), softmax(zs.detach().numpy(), temperature)
    want = temperature**2 * np_uld(p, q).sum()  # the loss's alpha T^2 sum of D
    assert abs(float(loss.detach()) - want) < 1e-12, (
        float(loss.detach()) - want
    )  # float64 both sides
    # dD/dq_j = sign(q_j - p_(r_j)), r_j the rank of q_j (zero-padded p); through the softmax at
    # T: dD/dz = q (g - <q, g>) / T.
    (grad,) = torch.autograd.grad(loss, zs)
    n = max(p.shape[1], q.shape[1])
    p_sorted = -np.sort(-np.pad(p, [(0, 0), (0, n - p.shape[1])]), -1)
    ranks = np.argsort(np.argsort(-q, -1), -1)
    g = np.sign(q - np.take_along_axis(p_sorted, ranks, -1))
    want_grad = temperature**2 * q * (g - (q * g).sum(-1, keepdims=True)) / temperature
    assert np.abs(grad.numpy() - want_grad).max() < 1e-12


def test_uld_top_k_is_a_lower_bound_equal_at_full_k():
    zt, zs, _ = cases(2)
    p, q = torch.softmax(zt, -1), torch.softmax(zs.detach(), -1)
    full = sorted_l1(p, q)
    assert torch.allclose(sorted_l1(p, q, top_k=23), full, rtol=0, atol=1e-14)
    for k in (1, 3, 10):
        assert (sorted_l1(p, q, top_k=k) <= full + 1e-14).all(), k


def test_gold_value_and_gradient_match_numpy():
    zt, zs, labels = cases(3)
    known = torch.tensor([True, True, False, True, True, False])
    options = LossOptions(divergence="gold", alpha=1.0, gold_weights=(0.7, 1.3))
    teacher = CrossVocab(zt, known, SHARED)
    loss, metrics = distillation_loss(zs, teacher, labels, options, num_tokens=1)
    (grad,) = torch.autograd.grad(loss, zs)
    s_ids, t_ids = SHARED.student_ids.numpy(), SHARED.teacher_ids.numpy()

    def np_loss(z: np.ndarray) -> float:
        d = np_gold(softmax(zt.numpy(), 1.0), softmax(z, 1.0), s_ids, t_ids, 0.7, 1.3)
        return float(np.where(known.numpy(), d, 0.0).sum())

    z = zs.detach().numpy()
    assert abs(float(loss.detach()) - np_loss(z)) < 1e-12
    h, want = 1e-6, np.zeros_like(z)
    for i in np.ndindex(z.shape):
        step = np.zeros_like(z)
        step[i] = h
        want[i] = (np_loss(z + step) - np_loss(z - step)) / (2 * h)
    # Central differences: O(h^2) truncation, ~1e-10 rounding (1e-16 / 1e-6).
    assert np.abs(grad.numpy() - want).max() < 1e-7
    assert float(grad[~known].abs().max()) == 0.0  # masked rows: no divergence gradient
    assert float(metrics["divergence"]) > 0


def test_cross_teacher_and_loss_must_match():
    zt, zs, labels = cases(4)
    with pytest.raises(ValueError, match="another vocabulary"):
        distillation_loss(zs, zt[:, :17], labels, LossOptions(divergence="uld"))
    known = torch.ones(6, dtype=torch.bool)
    with pytest.raises(ValueError, match="another vocabulary"):
        distillation_loss(zs, CrossVocab(zt, known, None), labels, LossOptions())


@pytest.mark.parametrize("divergence", ["uld", "gold"])
def test_chunked_equals_dense(divergence):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(10, 8, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(17, 8, generator=g, dtype=torch.float64).requires_grad_()
    th = torch.randn(10, 6, generator=g, dtype=torch.float64)
    tw = torch.randn(23, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 17, (10,), generator=g)
    labels[::4] = IGNORE
    known = torch.rand(10, generator=g) > 0.3
    options = LossOptions(divergence=divergence, alpha=0.5, temperature=2.0)
    dense, dm = distillation_loss(h @ w.T, CrossVocab(th @ tw.T, known, SHARED), labels, options)
    chunked, cm = chunked_distillation_loss(
        h, w, th, tw, labels, options, chunk_size=3, cross=(known, SHARED)
    )
    got = [chunked, cm["divergence"], *torch.autograd.grad(chunked, (h, w))]
    want = [dense, dm["divergence"], *torch.autograd.grad(dense, (h, w))]
    for a, b in zip(got, want):
        assert float((a - b).detach().abs().max()) < 1e-12  # float64, sums in another order


# ----------------------------------------------------------------------------- alignment

TEXTS = [
    "Knowledge distillation trains a small student.",
    " one leading space, and   three inside",
    "line one\nline two\n\n\nafter three newlines\r\nand CRLF",
    "digits 1234567 and 3.14159, dates 2026-12-01",
    "emoji 🦜🦜 and 👩‍👩‍👧 family",
    "accents: naïve café, Ångström, façade",
    "CJK 東京は日本の首都です。漢字",
    "rare 𠜎 byte fallback, soft\xadhyphen, tab\tend",
    "def f(x):\n    return x ** 2  # code\n",
]


ALIGNERS: dict[tuple[int, int], Aligner] = {}  # reading a vocabulary's bytes takes ~0.5-3 s


def check_alignment(student, teacher, text: str, seq_len: int = 10_000, fresh=False) -> Aligner:
    """Align `text` (+ the student's end of sequence), cut to seq_len tokens; each aligned
    student position t and teacher position u must see the same text before them, decoded."""
    key = (id(student), id(teacher))
    if fresh or key not in ALIGNERS:
        ALIGNERS[key] = Aligner(student, teacher)
    aligner = ALIGNERS[key]
    ids = (student.encode(text, add_special_tokens=False) + [student.eos_token_id])[:seq_len]
    labels = [*ids[1:], IGNORE]
    t_ids, aligned = aligner.align(ids, labels)
    assert len(aligned) == len(ids)
    for t, u in enumerate(aligned):
        if u < 0:
            continue
        before_s = student.decode(ids[: t + 1], skip_special_tokens=True)
        before_t = teacher.decode(t_ids[: u + 1], skip_special_tokens=True)
        assert before_s == before_t, (text, t, u)
        if t + 2 == len(ids) and ids[-1] == student.eos_token_id:  # the end: both predict EOS
            assert t_ids[u + 1] == teacher.eos_token_id
    return aligner


@pytest.fixture(scope="module")
def smollm2(teacher_dir):
    return load_tokenizer(teacher_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok")))


@pytest.mark.parametrize("text", TEXTS)
def test_alignment_smollm2_and_tiny(smollm2, tiny, text):
    """Two byte-level BPEs with different merges, each way round."""
    for student, teacher in ((smollm2, tiny), (tiny, smollm2)):
        aligner = check_alignment(student, teacher, text)
        assert aligner.aligned >= 1
    check_alignment(smollm2, tiny, text, seq_len=5)  # text longer than seq_len


def test_alignment_counts_its_reasons(smollm2, tiny):
    aligner = check_alignment(smollm2, tiny, "emoji 🦜🦜 and naïve café", fresh=True)
    assert aligner.masked["inside a character"] >= 1  # byte-level pieces of 🦜
    assert set(aligner.masked) <= {"inside a character", "no common boundary", "no teacher context"}
    total = aligner.aligned + sum(aligner.masked.values())
    ids = smollm2.encode("emoji 🦜🦜 and naïve café", add_special_tokens=False)
    assert total == len(ids)  # every trained position is aligned or counted once


@pytest.fixture(scope="module")
def gemma3():
    if not GEMMA3_DIR.is_dir():
        pytest.skip(f"no {GEMMA3_DIR}: run `make gemma3`")
    return load_tokenizer(GEMMA3_DIR)


@pytest.mark.parametrize("text", TEXTS)
def test_alignment_smollm2_and_gemma3(smollm2, gemma3, text):
    """Byte-level BPE ("Ġ") against SentencePiece ("▁", byte fallback, a <bos> prefix)."""
    check_alignment(smollm2, gemma3, text)
    check_alignment(gemma3, smollm2, text)


def test_shared_vocab_pairs_have_equal_bytes(smollm2, tiny):
    shared = shared_vocab(tiny, smollm2)
    s_bytes, t_bytes = token_bytes(tiny), token_bytes(smollm2)
    pairs = list(zip(shared.student_ids.tolist(), shared.teacher_ids.tolist()))
    assert len(pairs) > 256  # at least the byte alphabet
    assert all(s_bytes[s] == t_bytes[t] for s, t in pairs)
    assert tiny.token_to_id("<|im_end|>") not in shared.student_ids.tolist()  # specials: never


# ----------------------------------------------------------------------------- train.py


@pytest.fixture(scope="module")
def cross_pair(tmp_path_factory, teacher_dir):
    """A tiny student with the tiny tokenizer, a tiny teacher with SmolLM2's, some text."""
    d = tmp_path_factory.mktemp("cross_pair")
    student = make_tiny_checkpoint(d / "student", "llama", vocab_size=TINY_VOCAB_SIZE)
    make_tiny_tokenizer(student)
    teacher = make_tiny_checkpoint(d / "teacher", "qwen3", vocab_size=49152, seed=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(teacher_dir / name, teacher / name)
    data = d / "train.jsonl"
    lines = [{"text": f"{t} The river rises {i} times, naïvely 🦜."} for i, t in enumerate(TEXTS)]
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return {"dir": d, "student": student, "teacher": teacher, "data": data}


def train_args(pair: dict, out: Path, loss: str) -> list[str]:
    return [
        f"--teacher={pair['teacher']}",
        f"--student={pair['student']}",
        f"--data={pair['data']}",
        f"--out={out}",
        f"--loss={loss}",
        "--max_steps=3",
        "--batch_size=3",
        "--seq_len=48",
        "--precision=fp32",
        "--log_every=1",
        "--chunk_size=16",
        "--uld_top_k=64",
    ]


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_train_py_distills_across_tokenizers(cross_pair, loss, tmp_path, capsys):
    """train.py end to end with a teacher of another tokenizer: finite, positive divergences,
    the aligned share logged, a student exported."""
    assert train.cli(train_args(cross_pair, tmp_path / "run", loss)) == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and all(math.isfinite(r["divergence"]) for r in steps)
    # The tiny tokenizer (253 merges) splits words finer than SmolLM2's, so about half of its
    # boundaries fall inside a SmolLM2 token (measured: 0.49 aligned).
    assert all(r["divergence"] > 0 for r in steps) and steps[-1]["aligned"] > 0.3
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_other_tokenizer_needs_uld_or_gold(cross_pair, tmp_path, capsys):
    assert train.cli(train_args(cross_pair, tmp_path / "kl", "forward_kl")) == 1
    err = capsys.readouterr().err
    assert 'loss = "uld" or "gold"' in err and err.count("\n") == 1, err
    same = [*train_args(cross_pair, tmp_path / "same", "uld")]
    same[0] = f"--teacher={cross_pair['student']}"
    assert train.cli(same) == 1
    assert "share one: use forward_kl" in capsys.readouterr().err
