"""Soft targets from a teacher behind an API: its reported top-k log-probs as a teacher cache.

`generate.py --api-base ... --top-logprobs K` stores, with each answer, the tokens the server
generated, each with its log-prob and the K most likely alternatives (as bytes, in the
teacher's own vocabulary). `build_api_cache` (run by scripts/cache_api.py) turns that file
into a training file of the answers it can align to the student's tokenizer, and a teacher
cache of kd's format (kd/teacher_cache.py) for it: train.py then distills with
`teacher_cache = ...` and no teacher model at all.

Alignment. An answer is kept only if all of these hold, else it is refused and counted under
its reason (never aligned by guesswork):
  - every generated token, and every alternative, has the bytes of exactly one id of the
    student's tokenizer (kd/token_bytes.py): "not in the student's vocabulary", "ambiguous";
  - the server reports at least K alternatives with text per token: "fewer than K
    alternatives" (an alternative without text, as llama.cpp renders special tokens such as
    the end of turn, names no token: it is left out, its mass stays in the tail);
  - the tokens' bytes, joined, are the response's UTF-8: "text differs from its tokens";
  - the student's tokenizer, reading the record as train.py does (kd.data.load_examples),
    trains exactly these ids, then the end of turn: "tokenized differently" (a sampled
    tokenization the student's tokenizer would not produce, or a teacher of another
    tokenizer whose pieces differ).
For a teacher with the student's tokenizer (a larger model of the same family) only sampled
non-canonical tokenizations are refused; a teacher of another family is refused mostly.

Rows. Each trained position holds the K alternatives by decreasing log-prob and the tail
log(1 - sum_i p_i): the mass the server did not report (float64, log1p; -inf when the rounded
reported mass reaches 1). The end-of-turn position has no reported distribution (servers
stop there without reporting the stop token): its row is NaN, which the loss reads as "no
teacher here" (kd.losses.topk_buckets): no divergence, no gradient from it; the CE term alone
trains the model to stop.

Temperature. Servers report the model's own distribution at T = 1, whatever temperature they
sample at (llama-cpp-python, vLLM's default; measured against kd's forward in
tests/test_api_generate.py), so the cache's T_c is 1 and training re-tempers it as for any cache.

Tests: `.venv/bin/python -m pytest -q tests/test_api_cache.py tests/test_api_generate.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from kd.cache_writer import write_rows
from kd.data import IGNORE, Example, load_examples, read_jsonl
from kd.hf_config import load_config
from kd.outputs import write_jsonl_atomically
from kd.teacher_cache import CacheSpec, file_sha256
from kd.token_bytes import ByteVocab
from kd.tokenizer import Tokenizer

Tensor = torch.Tensor

ADDED = ("finish_reason", "teacher_logprobs")  # what the answers file adds to training records


@dataclass(frozen=True)
class Aligned:
    """One answer in the student's ids: the generated ids, and per token its alternatives."""

    record: dict  # the training record (prompt, response, ...), without the log-probs
    ids: list[int]  # (n,) generated tokens
    alternatives: list[list[tuple[int, float]]]  # per token: (id, log-prob), most likely first

    def top(self, k: int) -> tuple[Tensor, Tensor]:
        """(ids (n, k), log-probs (n, k) float64): each token's k most likely alternatives."""
        top = [a[:k] for a in self.alternatives]
        ids = torch.tensor([[i for i, _ in a] for a in top], dtype=torch.long)
        logprobs = torch.tensor([[lp for _, lp in a] for a in top], dtype=torch.float64)
        return ids.view(-1, k), logprobs.view(-1, k)


def align_answer(line: dict, vocab: ByteVocab) -> Aligned | str:
    """The answer in the student's ids, or the reason it cannot be (module docstring). An
    alternative without text is left out: llama.cpp renders special tokens such as the end
    of turn as "", which names no token; its mass stays in the tail bucket."""
    ids, alternatives, text = [], [], b""
    for data, _, reported in line["teacher_logprobs"]:
        token = bytes.fromhex(data)
        text += token
        ranked = sorted(((bytes.fromhex(b), lp) for b, lp in reported if b), key=lambda a: -a[1])
        wanted = [token, *(b for b, _ in ranked)]
        found = [vocab.id_of(b) for b in wanted]
        if None in found:
            missing = wanted[found.index(None)]
            return "ambiguous" if vocab.ambiguous(missing) else "not in the student's vocabulary"
        if len(set(found[1:])) < len(ranked):  # two teacher tokens with one student token's bytes
            return "ambiguous"
        ids.append(found[0])
        alternatives.append([(i, lp) for i, (_, lp) in zip(found[1:], ranked)])
    if text != line["response"].encode("utf-8"):
        return "text differs from its tokens"
    record = {key: value for key, value in line.items() if key not in ADDED}
    return Aligned(record, ids, alternatives)


def read_answers(path: Path, vocab: ByteVocab, k: int | None) -> tuple[list[Aligned], Counter, int]:
    """The answers of `path` that map to the student's vocabulary, the refusals by reason, and
    k: given, else the fewest alternatives a token of a mapped answer has (a server may add
    the sampled token to the top-k it was asked for, and an alternative without text is left
    out); answers with fewer than k are refused."""
    lines = []
    for where, line in read_jsonl(path, what="answers file"):
        if not isinstance(line.get("teacher_logprobs"), list):
            raise ValueError(
                f"{where}: no 'teacher_logprobs': collect the answers with generate.py "
                "--api-base ... --top-logprobs K"
            )
        if "prompt" not in line or "messages" in line:
            raise ValueError(f"{where}: a cache is made from 'prompt' records only")
        lines.append(line)
    refused: Counter[str] = Counter()
    mapped = []
    for line in lines:
        aligned = align_answer(line, vocab)
        if isinstance(aligned, str):
            refused[aligned] += 1
        else:
            mapped.append(aligned)
    counts = [len(a) for answer in mapped for a in answer.alternatives]
    k = k or min(counts, default=0)
    if k < 1:
        raise ValueError(f"{path}: no alternatives reported; collect with --top-logprobs K")
    kept = [a for a in mapped if all(len(alt) >= k for alt in a.alternatives)]
    refused[f"fewer than {k} alternatives"] += len(mapped) - len(kept)
    return kept, refused, k


def trained_ids(example: Example) -> list[int]:
    return [label for label in example.labels if label != IGNORE]


def matches(example: Example, answer: Aligned, end_of_turn: set[int]) -> bool:
    """Does the student train exactly the answer's ids (then one end-of-turn token), as far as
    seq_len lets the example reach?"""
    trained, n = trained_ids(example), len(answer.ids)
    if trained[:n] != answer.ids[: len(trained)]:
        return False
    return len(trained) <= n or (len(trained) == n + 1 and trained[-1] in end_of_turn)


def example_rows(example: Example, answer: Aligned, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(ids (m, k), logprobs (m, k), log_tail (m,)) of the example's m trained positions; the
    end-of-turn row, which the server reported nothing for, is NaN (module docstring)."""
    m, n = example.num_targets, len(answer.ids)
    ids = torch.arange(k).repeat(m, 1)  # (m, k) filler ids for the NaN row
    logprobs = torch.full((m, k), math.nan, dtype=torch.float64)
    log_tail = torch.full((m,), math.nan, dtype=torch.float64)
    rows = min(m, n)
    top_ids, top_logprobs = answer.top(k)
    ids[:rows] = top_ids[:rows]
    logprobs[:rows] = top_logprobs[:rows]
    mass = logprobs[:rows].exp().sum(-1)  # the reported mass, rounded by the server
    log_tail[:rows] = torch.where(mass < 1.0, torch.log1p(-mass.clamp(max=1.0)), -math.inf)
    return ids, logprobs.float(), log_tail.float()


def build_api_cache(
    answers: Path,
    *,
    student: Path,
    tokenizer: Tokenizer,
    data_out: Path,
    out: Path,
    seq_len: int,
    teacher_name: str,
    k: int | None = None,
    dtype: str = "bfloat16",
) -> tuple[int, Counter, int]:
    """Write `data_out` (the aligned answers) and the cache in `out`; return (answers kept,
    refusals by reason, k). An existing data_out with other content is refused."""
    vocab = ByteVocab.of(tokenizer)
    kept, refused, k = read_answers(answers, vocab, k)
    tmp = data_out.with_name(data_out.name + ".candidates")
    try:
        write_jsonl_atomically(
            tmp, [a.record for a in kept]
        )  # the student reads the text as train.py
        examples, stats = load_examples(tmp, tokenizer, seq_len=seq_len) if kept else ([], None)
    finally:
        tmp.unlink(missing_ok=True)
    if stats is not None and stats.dropped:
        raise ValueError(
            f"{answers}: {stats.dropped} answers have no trained token within seq_len={seq_len}"
            "; raise --seq-len"
        )
    end_of_turn = set(tokenizer.eos_token_ids)
    pairs = [(e, a) for e, a in zip(examples, kept) if matches(e, a, end_of_turn)]
    refused["tokenized differently"] += len(kept) - len(pairs)
    refused = +refused  # drop zero counts
    if not pairs:
        why = ", ".join(f"{n} {reason}" for reason, n in refused.most_common())
        raise ValueError(f"{answers}: no answer aligns with the student's tokenizer ({why})")
    records = [a.record for _, a in pairs]
    _write_data(data_out, records)
    examples, _ = load_examples(data_out, tokenizer, seq_len=seq_len)
    rows = [example_rows(e, a, k) for e, (_, a) in zip(examples, pairs)]
    spec = CacheSpec(
        tokenizer_fingerprint=tokenizer.fingerprint(),
        data_sha256=file_sha256(data_out),
        seq_len=seq_len,
        # No teacher directory exists: the name stands in for its config (kd/teacher_cache.py).
        teacher_config_sha256=hashlib.sha256(f"api:{teacher_name}".encode()).hexdigest(),
        vocab_size=load_config(student).vocab_size,
        num_examples=len(examples),
        k=k,
        dtype=dtype,
        temperature=1.0,
        examples_per_shard=4096,
    )
    info = {"teacher": teacher_name, "teacher_kind": "api", "data": str(data_out)}
    write_rows(out, examples, rows, spec, info=info)
    return len(pairs), refused, k


def _write_data(path: Path, records: list[dict]) -> None:
    """The training file; one already there is kept if equal, else refused (never replaced)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    if path.exists():
        if path.read_bytes() != text:
            raise ValueError(
                f"{path} exists with other records: delete it or choose another --data-out"
            )
        return
    write_jsonl_atomically(path, records)
