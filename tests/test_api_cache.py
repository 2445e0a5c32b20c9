"""Checks kd/api_cache.py (an API teacher's reported top-k log-probs -> a teacher cache) with
the real SmolLM2 tokenizer and answers written as a server writes them (bytes as hex, the
alternatives' log-probs): rows against float64 numpy references (the tail is log(1 - sum p),
the end-of-turn row NaN), every refusal reason on an answer that should trigger it, k from
the alternatives with text, seq_len cutting the rows, no data file replaced unasked, and a
cache that refuses to stand for a teacher directory.
The real server's answers are tests/test_api_generate.py's.

Run: `.venv/bin/python -m pytest -q tests/test_api_cache.py` (needs `make teacher`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kd.api_cache import build_api_cache
from kd.data import IGNORE, load_examples
from kd.teacher_cache import TeacherCache
from kd.token_bytes import ByteVocab, token_bytes
from kd.tokenizer import load_tokenizer

K = 4


@pytest.fixture(scope="module")
def tok(teacher_dir):
    return load_tokenizer(teacher_dir)


def answer(tok, prompt: str, pieces: list[bytes], *, seed: int, k: int = K, response=None) -> dict:
    """A line of generate.py --top-logprobs output: each piece (a token's bytes) sampled, with
    k alternatives (the piece first, then k - 1 other tokens) and their log-probs, which leave
    some mass to tokens not reported."""
    rng = np.random.default_rng(seed)
    byte_of = token_bytes(tok)
    tokens = []
    for piece in pieces:
        others = rng.choice(np.arange(300, 40000), size=k - 1, replace=False)
        alternatives = [piece, *(byte_of[i] for i in others)]
        logits = rng.normal(size=k + 1) * 2  # the last one: the unreported rest
        logprobs = logits - np.log(np.exp(logits).sum())
        pairs = [[b.hex(), float(lp)] for b, lp in zip(alternatives, logprobs[:k])]
        tokens.append([piece.hex(), float(logprobs[0]), pairs])
    text = response if response is not None else b"".join(pieces).decode("utf-8")
    return {"prompt": prompt, "response": text, "finish_reason": "stop", "teacher_logprobs": tokens}


def canonical(tok, text: str) -> list[bytes]:
    byte_of = token_bytes(tok)
    return [byte_of[i] for i in tok.encode(text, add_special_tokens=False)]


def build(tmp_path: Path, tok, teacher_dir, lines: list[dict], **kw):
    tmp_path.mkdir(exist_ok=True)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(line) + "\n" for line in lines))
    options = dict(
        student=teacher_dir,
        tokenizer=tok,
        data_out=tmp_path / "train.jsonl",
        out=tmp_path / "cache",
        seq_len=256,
        teacher_name="test",
        dtype="float32",
    )
    return build_api_cache(answers, **{**options, **kw})


def test_rows_are_the_reported_log_probs(tmp_path, tok, teacher_dir):
    lines = [
        answer(tok, "Name a colour.", canonical(tok, "Blue, like the sky 🦜."), seed=1),
        answer(tok, "Say hi.", canonical(tok, "Hi  there!\n\nBye."), seed=2),
    ]
    kept, refused, k = build(tmp_path, tok, teacher_dir, lines)
    assert (kept, dict(refused), k) == (2, {}, K)
    vocab = ByteVocab.of(tok)
    examples, _ = load_examples(tmp_path / "train.jsonl", tok, seq_len=256)
    cache = TeacherCache.open(
        tmp_path / "cache",
        tokenizer=tok,
        data_path=tmp_path / "train.jsonl",
        seq_len=256,
        examples=examples,
    )
    shard = load_file(tmp_path / "cache" / "shard-00000.safetensors")
    with pytest.raises(ValueError, match="API teacher test .* leave 'teacher' unset"):
        cache.check_teacher(teacher_dir)  # the cache is an API teacher's, not a directory's
    for example, line in zip(examples, lines):
        labels = torch.tensor([example.labels])
        top = cache.topk_for([example.index], labels)
        valid = labels[0] != IGNORE
        ids, logprobs = top.ids[0][valid], top.logprobs[0][valid].double()
        first = int(shard["offsets"][example.index])
        log_tail = shard["log_tail"][first : first + int(valid.sum())].double()
        n = len(line["teacher_logprobs"])
        assert int(valid.sum()) == n + 1  # the answer's tokens, then the end of turn
        assert torch.isnan(logprobs[n]).all()  # no teacher there: the loss skips it
        for t, (_, _, alternatives) in enumerate(line["teacher_logprobs"]):
            want = sorted(alternatives, key=lambda a: -a[1])
            assert ids[t].tolist() == [vocab.id_of(bytes.fromhex(b)) for b, _ in want], t
            # retemper renormalizes the k + 1 buckets; at T = T_c that only absorbs rounding.
            assert np.abs(logprobs[t].numpy() - [lp for _, lp in want]).max() < 1e-6, t
            tail = math.log(1.0 - np.exp([lp for _, lp in want]).sum())  # float64 reference
            assert abs(float(log_tail[t]) - tail) < 1e-6 * max(1.0, abs(tail)), t  # fp32 storage


def test_each_refusal_reason(tmp_path, tok, teacher_dir):
    good = canonical(tok, "Paris is the capital.")
    split = [b"Par", b"is", *good[1:]]  # a tokenization the student's tokenizer never makes
    assert tok.encode("Paris", add_special_tokens=False) != tok.encode("Par") + tok.encode("is")
    lines = [
        answer(tok, "Q1", good, seed=3),
        answer(tok, "Q2", split, seed=4),
        answer(tok, "Q3", [*good[:-1], b"\xff\xfe!"], seed=5, response="Paris is the capital\xfe!"),
        answer(tok, "Q4", good, seed=6, response="Lyon is the capital."),
        answer(tok, "Q5", good, seed=7, k=2),
    ]
    kept, refused, k = build(tmp_path, tok, teacher_dir, lines, k=K)
    assert kept == 1 and k == K
    assert dict(refused) == {
        "tokenized differently": 1,
        "not in the student's vocabulary": 1,
        "text differs from its tokens": 1,
        f"fewer than {K} alternatives": 1,
    }
    assert [
        json.loads(x)["prompt"] for x in (tmp_path / "train.jsonl").read_text().splitlines()
    ] == ["Q1"]


def test_alternatives_without_text_are_left_out(tmp_path, tok, teacher_dir):
    """llama.cpp reports special tokens (the end of turn) as "": left out, k follows."""
    line = answer(tok, "Q", canonical(tok, "Yes."), seed=8)
    line["teacher_logprobs"][-1][2][-1][0] = ""  # the last token's least likely alternative
    kept, refused, k = build(tmp_path, tok, teacher_dir, [line])
    assert (kept, dict(refused), k) == (1, {}, K - 1)


def test_seq_len_cuts_rows_and_data_is_never_replaced(tmp_path, tok, teacher_dir):
    line = answer(tok, "Q", canonical(tok, "One two three four five six seven."), seed=9)
    build(tmp_path / "full", tok, teacher_dir, [line])
    whole = load_examples(tmp_path / "full" / "train.jsonl", tok, seq_len=256)[0][0]
    seq_len = len(whole.input_ids) - 4  # four tokens short
    kept, _, _ = build(tmp_path, tok, teacher_dir, [line], seq_len=seq_len)
    examples, stats = load_examples(tmp_path / "train.jsonl", tok, seq_len=seq_len)
    assert kept == 1 and stats.truncated == 1
    assert examples[0].num_targets < len(line["teacher_logprobs"])  # cut inside the answer
    build(tmp_path, tok, teacher_dir, [line], seq_len=seq_len)  # the same again: fine
    other = answer(tok, "Q", canonical(tok, "Eight."), seed=10)
    with pytest.raises(ValueError, match="exists with other records"):
        build(tmp_path, tok, teacher_dir, [other], seq_len=seq_len)
