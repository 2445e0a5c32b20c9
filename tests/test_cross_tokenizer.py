"""Checks kd/cross_tokenizer.py: ULD and the GOLD-style hybrid against float64 numpy references
written from their formulas (values; gradients: ULD's closed form, the hybrid's by central
differences of the numpy formula), masking of unaligned positions, the chunked loss against
the dense one, and the alignment of real tokenizers (SmolLM2's byte-level BPE against the tiny
tokenizer's, and against Gemma 3's SentencePiece where `make gemma3` has run) on strings that
break naive code: each aligned pair predicts text from the same byte, checked by decoding.

Chats, each model reading its own template (ChatML; Gemma 3's template, set on its real
tokenizer since models/gemma3-270m has none; SmolLM2's, which adds a system prompt), with
several turns, a system message, whitespace the Gemma template trims, emoji, CJK and a cut at
seq_len: each aligned pair predicts from the same content byte of the same reply, the ends of
turn are aligned, prompts and markup never are, the teacher's ids are its own rendering and
no longer than the student's; a conversation the teacher's template refuses, or a teacher
without a template, is read as markerless text. train.py runs end to end on text and chats.

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
from kd.data import IGNORE, Example, load_examples, tokenize_chat
from kd.losses import LossOptions, distillation_loss
from kd.offpolicy import teacher_view
from kd.token_bytes import token_bytes
from kd.tokenizer import Tokenizer, load_tokenizer
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


def aligner_for(student, teacher, fresh: bool = False) -> Aligner:
    key = (id(student), id(teacher))
    if fresh or key not in ALIGNERS:
        ALIGNERS[key] = Aligner(student, teacher)
    return ALIGNERS[key]


def check_alignment(student, teacher, text: str, seq_len: int = 10_000, fresh=False) -> Aligner:
    """Align `text` (+ the student's end of sequence), cut to seq_len tokens; each aligned
    student position t and teacher position u must see the same text before them, decoded."""
    aligner = aligner_for(student, teacher, fresh)
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


# ----------------------------------------------------------------------------- chat

# Gemma 3's published chat template, minimal and faithful: <bos>, then per turn
# "<start_of_turn>{user|model}\n" + content | trim + "<end_of_turn>\n", a system message folded
# into the first user turn, user and assistant turns that must alternate. models/gemma3-270m
# (the base model, from its GGUF) has no chat template of its own.
GEMMA3_CHAT = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

CHATS = [
    [  # a system message; replies with a leading space, newlines, digits, emoji and CJK
        {"role": "system", "content": "You are terse.\nAnswer in English."},
        {"role": "user", "content": "What is 12345 * 2?"},
        {"role": "assistant", "content": " It is 24690 🦜, i.e. 2.469e4.\n\nDone.\n"},
        {"role": "user", "content": "東京は?"},
        {"role": "assistant", "content": "東京は日本の首都です。 Emoji: 👩‍👩‍👧, naïve café."},
    ],
    [  # no system message: SmolLM2's template adds its own; code, tabs, a whitespace prompt
        {"role": "user", "content": "Write f."},
        {"role": "assistant", "content": "def f(x):\n    return x ** 2  # square\n"},
        {"role": "user", "content": "  and g?  "},
        {"role": "assistant", "content": "g = f   # the same\t\n"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome! 🙂 1/2 = 0.5"},
    ],
]

END_OF_TURN = {"smollm2": "<|im_end|>", "tiny": "<|im_end|>", "gemma3_chat": "<end_of_turn>"}


@pytest.fixture(scope="module")
def gemma3_chat(gemma3):
    """Gemma 3's real tokenizer with its chat template (GEMMA3_CHAT)."""
    return Tokenizer(
        gemma3.backend, special_tokens=gemma3.special_tokens, chat_template=GEMMA3_CHAT
    )


def chat_example(student, messages: list[dict], tmp_path: Path, seq_len: int = 4096) -> Example:
    """The student's Example of one {"messages": ...} record, as training loads it."""
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    [example], _ = load_examples(path, student, seq_len=seq_len)
    return example


def runs(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    found: list[list[int]] = []
    for i, on in enumerate(mask):
        if on and i > 0 and mask[i - 1]:
            found[-1][1] = i + 1
        elif on:
            found.append([i, i + 1])
    return [(a, b) for a, b in found]


def check_chat(aligner: Aligner, example: Example, ends: tuple[str, str]) -> tuple[list, list]:
    """Align a chat example; check the teacher's ids against its own template and each aligned
    pair (t, u) against the replies' text. ends: the student's and teacher's end-of-turn."""
    student, teacher, messages = aligner.student, aligner.teacher, example.messages
    counted = aligner.aligned + sum(aligner.masked.values())
    t_ids, aligned = aligner.align(example.input_ids, example.labels, messages)
    assert aligner.aligned + sum(aligner.masked.values()) - counted == example.num_targets
    # The teacher reads its own template's rendering, up to the token its last aligned
    # position predicts.
    full, t_trained, _ = tokenize_chat(messages, teacher, "test")
    assert t_ids == full[: len(t_ids)] and max(aligned) == len(t_ids) - 2
    rendering = teacher.apply_chat_template(messages)
    assert rendering.startswith(teacher.decode(t_ids, skip_special_tokens=False))
    s_replies = runs([label != IGNORE for label in example.labels])  # positions p .. q - 1
    t_replies = runs(t_trained)  # teacher tokens a .. b - 1
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    s_end, t_end = student.token_to_id(ends[0]), teacher.token_to_id(ends[1])
    for t, u in enumerate(aligned):
        if u < 0:
            continue
        assert example.labels[t] != IGNORE, t  # prompts and template markup: never aligned
        [k] = [k for k, (p, q) in enumerate(s_replies) if p <= t < q]
        (p, _), (a, b) = s_replies[k], t_replies[k]
        assert a <= u + 1 < b, (t, u)  # the teacher predicts a token of the same reply
        s_next, t_next = example.input_ids[t + 1], t_ids[u + 1]
        if s_next == s_end:  # both predict their end of turn
            assert t_next == t_end, (t, u)
            continue
        # The same content byte: each reply so far is the content up to it (leading whitespace
        # aside, which Gemma's template trims), and both tokens spell the content from there.
        before = student.decode(example.input_ids[p + 1 : t + 1]).lstrip()
        assert teacher.decode(t_ids[a : u + 1]).lstrip() == before, (t, u)
        rest = contents[k].lstrip().encode()[len(before.encode()) :]
        for token in (aligner.student_bytes[s_next], aligner.teacher_bytes[t_next]):
            assert rest.startswith(token if before else token.lstrip()), (t, u)
    for k, (p, q) in enumerate(s_replies):
        if s_end in example.input_ids[p + 1 : q + 1]:  # a whole reply: its end is aligned
            position = p + example.input_ids[p + 1 : q + 1].index(s_end)
            assert t_ids[aligned[position] + 1] == t_end, k
        if contents[k] == contents[k].lstrip():  # the last prompt position predicts the reply
            assert aligned[p] == t_replies[k][0] - 1, k
    return t_ids, aligned


@pytest.mark.parametrize(
    "pair", [("smollm2", "gemma3_chat"), ("gemma3_chat", "smollm2"), ("tiny", "smollm2")]
)
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_alignment(request, pair, chat, tmp_path):
    """Each model reads the conversation in its own template: ChatML against Gemma's (which
    trims replies), each way round, and ChatML against SmolLM2's (a default system prompt)."""
    student, teacher = (request.getfixturevalue(name) for name in pair)
    s_name, t_name = pair
    aligner = aligner_for(student, teacher)
    example = chat_example(student, CHATS[chat], tmp_path)
    t_ids, aligned = check_chat(aligner, example, (END_OF_TURN[s_name], END_OF_TURN[t_name]))
    # The whole conversation: the teacher's rendering through its last end of turn.
    rendering = teacher.apply_chat_template(CHATS[chat])
    last_end = rendering.rindex(END_OF_TURN[t_name]) + len(END_OF_TURN[t_name])
    assert teacher.decode(t_ids, skip_special_tokens=False) == rendering[:last_end]
    assert sum(u >= 0 for u in aligned) > example.num_targets / 2


@pytest.mark.parametrize("reply", [0, 1])
def test_chat_cut_at_seq_len(smollm2, gemma3_chat, reply, tmp_path):
    """Cut inside the first or the last reply: the teacher sees its rendering up to where the
    student's ends, never the rest of the conversation."""
    student, teacher = smollm2, gemma3_chat
    whole = chat_example(student, CHATS[0], tmp_path)
    starts = [p + 1 for p, _ in runs([label != IGNORE for label in whole.labels])]
    seq_len = starts[reply] + 6  # six tokens into the reply
    example = chat_example(student, CHATS[0], tmp_path, seq_len=seq_len)
    assert len(example.input_ids) == seq_len and example.messages == CHATS[0]
    t_ids, _ = check_chat(aligner_for(student, teacher), example, ("<|im_end|>", "<end_of_turn>"))
    seen = teacher.decode(t_ids, skip_special_tokens=False)
    assert seen.count("<start_of_turn>model") == reply + 1  # no later turn
    assert seen.count("<end_of_turn>") == 2 * reply + 1  # the reply's own end is not seen
    # Its reply so far, but the token its last aligned position predicts, is the student's.
    a = runs(tokenize_chat(CHATS[0], teacher, "test")[1])[reply][0]
    said = student.decode(example.input_ids[starts[reply] :]).lstrip()
    assert said.startswith(teacher.decode(t_ids[a:-1]).lstrip())


def test_chat_the_teacher_template_refuses_is_read_as_text(smollm2, gemma3_chat, tmp_path):
    """Gemma's template wants user and assistant turns to alternate; SmolLM2's renders two
    user turns in a row. The teacher then reads the markerless text, and it is counted."""
    student, teacher = smollm2, gemma3_chat
    messages = [*CHATS[0][:2], {"role": "user", "content": "Quickly."}, *CHATS[0][2:3]]
    example = chat_example(student, messages, tmp_path)
    aligner = aligner_for(student, teacher)
    markerless = aligner.markerless
    view = aligner.align(example.input_ids, example.labels, example.messages)
    assert aligner.markerless == markerless + 1
    assert view == aligner.align(example.input_ids, example.labels)  # as for a text record
    assert "<start_of_turn>" not in teacher.decode(view[0], skip_special_tokens=False)


def test_chat_teacher_without_template_reads_text(smollm2, gemma3, tmp_path):
    """A teacher without a chat template (models/gemma3-270m as imported) reads the student's
    rendering without its markers, as for a text record; that is not a refusal."""
    student = smollm2
    plain = Tokenizer(gemma3.backend, special_tokens=gemma3.special_tokens, chat_template=None)
    aligner = Aligner(student, plain)
    example = chat_example(student, CHATS[1], tmp_path)
    view = aligner.align(example.input_ids, example.labels, example.messages)
    assert view == aligner.align(example.input_ids, example.labels) and aligner.markerless == 0
    text = student.decode(example.input_ids)  # markers dropped: "system\nYou are ..."
    assert plain.decode(view[0]) == text


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
    chat = d / "chat.jsonl"
    records = [{"messages": m} for m in CHATS] + [
        {"prompt": TEXTS[i], "response": TEXTS[i + 1]} for i in range(4)
    ]
    chat.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"dir": d, "student": student, "teacher": teacher, "data": data, "chat": chat}


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


def test_teacher_view_renders_chats_in_the_teachers_template(cross_pair, smollm2):
    """What the training step hands the teacher: its own rendering (SmolLM2's template adds
    a system prompt the tiny student's ChatML has not)."""
    student = load_tokenizer(cross_pair["student"])
    examples, _ = load_examples(cross_pair["chat"], student, seq_len=256)
    aligner = Aligner(student, smollm2)
    view = teacher_view(aligner, examples, max(len(e.input_ids) for e in examples))
    for row, example in enumerate(examples):
        t_ids, aligned = aligner.align(example.input_ids, example.labels, example.messages)
        assert view["teacher_input_ids"][row, : len(t_ids)].tolist() == t_ids
        assert view["teacher_positions"][row, : len(aligned)].tolist() == aligned
        seen = smollm2.decode(t_ids, skip_special_tokens=False)
        assert smollm2.apply_chat_template(example.messages).startswith(seen)
        if example.messages[0]["role"] != "system":  # prompt/response records too
            assert seen.startswith("<|im_start|>system\nYou are a helpful AI assistant")


def test_train_py_distills_chats_across_tokenizers(cross_pair, tmp_path, capsys):
    """train.py on chat data: each model reads its own template; finite, positive
    divergences and most trained positions aligned."""
    args = train_args(cross_pair, tmp_path / "run", "uld")
    args = [a for a in args if not a.startswith(("--data=", "--seq_len="))]
    assert train.cli([*args, f"--data={cross_pair['chat']}", "--seq_len=256"]) == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and all(
        math.isfinite(r["divergence"]) and r["divergence"] > 0 for r in steps
    )
    assert steps[-1]["aligned"] > 0.3  # as for text: the tiny tokenizer splits finer
