"""Offline teacher: the teacher's top-k next-token log-probs, computed once, read by training.

A 70B teacher and its full-vocabulary logits rarely fit beside the student, and online KD pays
for the teacher's forward pass every epoch. Caching the top-k (DistillKit's approach) costs a
few hundred bytes per token, and students then train at about SFT speed.

Format: a directory with `manifest.json` and safetensors shards `shard-00000.safetensors`, ...
Shard i covers examples [i E, (i + 1) E) of `kd.data.load_examples(data, tokenizer, seq_len)`
in file order (before any shuffling), E = examples_per_shard. It stores one row per position
with a label (labels != -100, the only positions the loss reads), examples one after another:

    ids       (n, k)  uint16 when the vocabulary fits (V <= 65536), else int32; sorted by prob
    logprobs  (n, k)  float16 / bfloat16 / float32: log p_i at the cache temperature T_c
    log_tail  (n,)    same dtype: log(1 - sum_i p_i) = logsumexp of the V - k other log-probs
                      (computed that way, never as log(1 - sum), which cancels catastrophically)
    offsets   (E+1,)  int64: the rows of the shard's j-th example are offsets[j] .. offsets[j+1]

Bytes per token with 16-bit ids and log-probs: 4 k + 2 (k = 8: 34, 32: 130, 128: 514); with
int32 ids (V > 65536): 6 k + 2. The manifest also records what the cache is only valid for
(tokenizer fingerprint, data file sha256, seq_len, teacher config sha256 and
`kd.hf.fingerprint`, vocab size, k, dtype, T_c, number of examples); `TeacherCache.open`
refuses a cache made for other ones, naming the field, and `check_teacher(teacher_dir)` one
made by another teacher. Shards are written to a temporary name and renamed, and the manifest
is rewritten (atomically) after each shard, so an interrupted run resumes after its last whole
shard and produces the same bytes as an uninterrupted one; a listed shard that is missing (or
of the wrong size) is written again. Under torchrun the N ranks write the shards in rounds of
N, one each, and rank 0 the manifest (kd/cache_writer.py): same bytes.

Integrity. The manifest records each shard's size and sha256. `open` compares the sizes (one
stat per shard: a truncated shard fails at once); the first read of a shard (`topk_for`)
hashes it whole, once per process: one extra sequential read of the cache, spread over the
first epoch (sha256 runs at ~1.5 GB/s on one core: ~0.2 s per default shard of up to ~270 MB,
a minute or two per 100 GB; `verify()` pays it all up front instead). A damaged shard is a
ValueError naming it: delete it and rerun scripts/cache_teacher.py with the same arguments,
which rewrites it. Caches written before checksums (no sha256 in the manifest) open unchecked.

Temperature. Cached log-probs are at T_c (1 by default), the loss wants them at T. Since
p_T(v) is proportional to p_Tc(v)^a with a = T_c / T, the top-k part is exact up to the
normaliser; the tail is not, because sum_{v in tail} p(v)^a is not a function of the tail's
mass m alone. We estimate it as if the tail were m / p_k tokens of the k-th probability p_k:
m p_k^(a - 1). For a < 1 (T > T_c) that is a lower bound (x^a is concave, so spreading the mass
over more, smaller tokens raises the sum), for a > 1 an upper bound, and exact at a = 1. It is
far better than treating the tail as one token (m^a), but at T = 2 from a T_c = 1 cache of
SmolLM2 the true tail holds ~85% of the mass for k = 8 and the estimate ~45% (numbers in
docs/benchmarks.md): cache at the training temperature (`--temperature`) when T != 1.

Divergences. The loss (`kd.losses.TopK`) compares teacher and student over k + 1 buckets: the
k cached tokens and one tail holding the rest of each distribution. Every divergence of
`kd.losses` except logit_mse runs on these coarsened distributions; by the data-processing
inequality each is a lower bound of its full-vocabulary value, and equal to it at k = V.

    cache = TeacherCache.open("cache/", tokenizer=tok, data_path="data.jsonl", seq_len=512,
                              examples=examples)
    cache.check_teacher("models/teacher")   # the teacher training was given wrote the cache
    teacher = cache.topk_for(indices, batch["labels"], temperature=2.0)   # a kd.losses.TopK

Written by kd/cache_writer.py (run by scripts/cache_teacher.py).
Tests: `.venv/bin/python -m pytest -q tests/test_teacher_cache.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from kd.data import IGNORE, Example
from kd.hf import fingerprint
from kd.losses import TopK
from kd.tokenizer import Tokenizer

Tensor = torch.Tensor

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LAYOUT = (
    "per shard: ids (n, k), logprobs (n, k), log_tail (n,), offsets (examples + 1,) int64; "
    "rows = positions with labels != -100 of the shard's examples, in order; "
    "log-probs at the cache temperature, ids sorted by decreasing probability"
)
REWRITE = "delete it and run scripts/cache_teacher.py again with the same arguments to rewrite it"


@dataclass(frozen=True)
class CacheSpec:
    """What a cache is valid for; two runs with equal specs write identical caches."""

    tokenizer_fingerprint: str  # kd.tokenizer.Tokenizer.fingerprint(): maps text to the same ids
    data_sha256: str  # sha256 of the training JSONL file's bytes
    seq_len: int  # load_examples' seq_len: longer examples were cut there
    teacher_config_sha256: str  # sha256 of the teacher's config.json, canonical JSON
    vocab_size: int  # teacher's vocabulary (logit rows)
    num_examples: int  # examples load_examples returned
    k: int  # tokens kept per position
    dtype: str  # storage dtype of logprobs and log_tail: float16, bfloat16 or float32
    temperature: float  # T_c the log-probs were computed at
    examples_per_shard: int  # E: shard i holds examples [i E, (i + 1) E)
    # kd.hf.fingerprint of the teacher's directory (config + sampled weights); None where not
    # known: caches written before it was recorded, which are checked on the config alone.
    teacher_fingerprint: str | None = None


def ids_dtype(vocab_size: int) -> torch.dtype:
    """uint16 when every id fits in 16 bits (V <= 65536), else int32."""
    return torch.uint16 if vocab_size <= 2**16 else torch.int32


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_sha256(model_dir: str | Path) -> str:
    """sha256 of a HF directory's config.json as canonical JSON (key order and spaces ignored)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def read_manifest(path: Path) -> tuple[CacheSpec, dict]:
    """(spec, the whole manifest) of the cache in `path`."""
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: {path} is not a teacher cache; make one with "
            "scripts/cache_teacher.py"
        )
    try:
        manifest = json.loads(file.read_text())
        values = {"teacher_fingerprint": None, **manifest}  # absent from older caches' manifests
        spec = CacheSpec(**{f.name: values[f.name] for f in dataclasses.fields(CacheSpec)})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f"{file} is not a readable cache manifest ({e!r}); make the cache again"
        ) from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file}: format_version {manifest.get('format_version')} is not "
            f"{FORMAT_VERSION}; make the cache again with this version of kd"
        )
    return spec, manifest


# ----------------------------------------------------------------------------- the student side


def retemper(logprobs: Tensor, log_tail: Tensor, ratio: float) -> Tensor:
    """fp32 log-probs of the k cached tokens at temperature T, from log-probs at T_c;
    ratio a = T_c / T.

    p_T(v) is proportional to p_Tc(v)^a. Top-k buckets: a log p_i. Tail: the sum of p(v)^a over
    the tail is estimated as m p_k^(a - 1) (the tail as m / p_k tokens of probability p_k; see
    the module docstring for the bound and its error). Then all k + 1 buckets are normalised,
    which at a = 1 also removes the rounding of 16-bit storage (sum of buckets = 1 in fp32).
    """
    logprobs, log_tail = logprobs.float(), log_tail.float()
    # log(m p_k^(a - 1)) = log m + (a - 1) log p_k; an empty tail (-inf) stays -inf.
    tail = log_tail if ratio == 1.0 else log_tail + (ratio - 1.0) * logprobs[..., -1]
    buckets = torch.cat([ratio * logprobs, tail.unsqueeze(-1)], dim=-1)  # (..., k + 1)
    return F.log_softmax(buckets, dim=-1)[..., :-1]


class TeacherCache:
    """A finished cache, opened for reading: `topk_for(indices, labels)` per micro-batch.

    Shards are memory-mapped (safetensors), so a cache larger than RAM reads only the rows used.
    Each shard's size is checked at `open`, its sha256 at its first read (module docstring).
    """

    def __init__(self, path: Path, spec: CacheSpec, manifest: dict) -> None:
        self.path = path
        self.spec = spec
        self.manifest = manifest
        self.shards = manifest["shards"]
        self._verified: set[int] = set()  # shards whose sha256 matched, in this process
        self._files = [self._open_shard(i) for i in range(len(self.shards))]
        self._offsets = [self._tensor(i, "offsets") for i in range(len(self.shards))]  # (E + 1,)

    def __len__(self) -> int:
        return self.spec.num_examples

    def _damaged(self, shard: int, what: str) -> ValueError:
        return ValueError(f"{self.path / self.shards[shard]['file']} {what}; {REWRITE}")

    def _open_shard(self, shard: int) -> safe_open:
        """The shard's safe_open handle, after checking it is there with its recorded size."""
        file = self.path / self.shards[shard]["file"]
        if not file.is_file():
            raise self._damaged(shard, "is missing")
        size, expected = file.stat().st_size, self.shards[shard].get("bytes")
        if expected is not None and size != expected:
            raise self._damaged(shard, f"has {size} bytes, not {expected}: truncated or damaged")
        try:
            return safe_open(file, framework="pt")
        except (SafetensorError, OSError) as e:  # a cut or damaged header (older caches: no size)
            raise self._damaged(shard, f"is not a readable safetensors file ({e})") from None

    def _tensor(self, shard: int, name: str, rows: slice = slice(None)) -> Tensor:
        """Rows of one of the shard's tensors; an unreadable one is a ValueError naming it."""
        try:
            return self._files[shard].get_slice(name)[rows]
        except (SafetensorError, OSError) as e:
            raise self._damaged(shard, f"has no readable {name!r} ({e})") from None

    def verify(self, shards: Sequence[int] | None = None) -> None:
        """Hash the shards (default: all) not yet checked against the manifest's sha256: a full
        read of each, once per process. A mismatch is a ValueError naming the shard. Shards of
        caches written before checksums pass unchecked."""
        for shard in range(len(self.shards)) if shards is None else shards:
            if shard in self._verified:
                continue
            entry = self.shards[shard]
            if "sha256" in entry and file_sha256(self.path / entry["file"]) != entry["sha256"]:
                raise self._damaged(shard, "does not match its sha256 in the manifest: corrupted")
            self._verified.add(shard)

    def check_teacher(self, teacher_dir: str | Path) -> None:
        """Raise ValueError unless `teacher_dir` (an HF directory) is the teacher that wrote the
        cache: the same config.json (canonical sha256) and the same `kd.hf.fingerprint` (config,
        tensor headers, sampled weight bytes). A cache written before fingerprints were
        recorded is checked on the config alone: a fine-tune of the same architecture passes."""
        teacher = self.manifest.get("teacher", "(unknown)")
        if self.manifest.get("teacher_kind") == "api":
            raise ValueError(
                f"{self.path} holds the log-probs of API teacher {teacher} (scripts/cache_api.py),"
                " not of a model directory: leave 'teacher' unset to train from it"
            )
        wrote = f"{self.path} was written by teacher {teacher}"
        remake = "; train with that teacher, or cache this one with scripts/cache_teacher.py"
        if config_sha256(teacher_dir) != self.spec.teacher_config_sha256:
            raise ValueError(f"{wrote}, whose config.json differs from {teacher_dir}'s{remake}")
        if self.spec.teacher_fingerprint is None:  # older cache: nothing more to compare
            return
        if fingerprint(teacher_dir) != self.spec.teacher_fingerprint:
            raise ValueError(
                f"{wrote}: same config.json as {teacher_dir} but other weights "
                f"(kd.hf.fingerprint differs){remake}"
            )

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        tokenizer: Tokenizer,
        data_path: str | Path,
        seq_len: int,
        examples: list[Example],
    ) -> TeacherCache:
        """Open a complete cache after checking it was made for this tokenizer, data file, seq_len
        and these examples; a mismatch is a ValueError naming the field and the fix."""
        path = Path(path)
        spec, manifest = read_manifest(path)
        remake = "; make the cache for this run with scripts/cache_teacher.py"
        if not manifest.get("complete"):
            raise ValueError(
                f"{path} is incomplete ({len(manifest['shards'])} shards written): run "
                "scripts/cache_teacher.py again with the same arguments to finish it"
            )
        if spec.tokenizer_fingerprint != tokenizer.fingerprint():
            raise ValueError(
                f"{path}: tokenizer_fingerprint differs: the cache was made with another "
                f"tokenizer (ids would index different tokens){remake}"
            )
        if spec.data_sha256 != file_sha256(data_path):
            raise ValueError(
                f"{path}: data_sha256 differs: the cache was made from another data file "
                f"than {data_path} ({manifest.get('data', 'path unknown')}){remake}"
            )
        if spec.seq_len != seq_len:
            raise ValueError(
                f"{path}: seq_len is {spec.seq_len} in the cache, {seq_len} here; "
                f"set seq_len = {spec.seq_len}{remake.replace(';', ' or')}"
            )
        cache = cls(path, spec, manifest)
        counts = torch.cat([o.diff() for o in cache._offsets])  # (N,) rows per example
        targets = torch.tensor([e.num_targets for e in examples])
        if counts.shape != targets.shape or not torch.equal(counts, targets):
            cache.verify()  # damaged offsets would look like a change of tokenization
            raise ValueError(
                f"{path}: num_examples / trained tokens per example differ from the data "
                f"({len(counts)} vs {len(targets)} examples): the tokenization changed{remake}"
            )
        return cache

    def _rows(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """(ids, logprobs, log_tail) rows of example `index`, read from its shard's memory map."""
        if not 0 <= index < len(self):
            raise ValueError(f"example index {index} is outside the cache's 0..{len(self) - 1}")
        shard = index // self.spec.examples_per_shard
        self.verify([shard])  # the first read of a shard hashes it whole (once per process)
        j = index - self.shards[shard]["first"]
        a, b = self._offsets[shard][j : j + 2].tolist()
        return tuple(
            self._tensor(shard, name, slice(a, b)) for name in ("ids", "logprobs", "log_tail")
        )

    def topk_for(
        self,
        indices: Sequence[int] | Tensor,
        labels: Tensor,
        *,
        temperature: float = 1.0,
        ignore_index: int = IGNORE,
    ) -> TopK:
        """The teacher of a micro-batch as `TopK(ids (B, T, k), logprobs (B, T, k))` at
        `temperature`.

        indices: (B,) each row's example index (its position in load_examples' list).
        labels: (B, T) the micro-batch's labels, on the CPU; cached rows fill the positions with
        a label in order. Positions without one get a harmless uniform filler (the loss skips
        them). Call it on the CPU before moving the batch to the device.
        """
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        indices = torch.as_tensor(indices).tolist()
        B, T = labels.shape
        k = self.spec.k
        if len(indices) != B:
            raise ValueError(f"{len(indices)} example indices for a batch of {B} rows")
        valid = labels != ignore_index  # (B, T)
        rows = [self._rows(i) for i in indices]
        counts = valid.sum(-1).tolist()  # host values: labels live on the CPU here
        for i, r, n in zip(indices, rows, counts):
            if r[0].shape[0] != n:
                raise ValueError(
                    f"example {i} has {n} labelled positions in the batch but {r[0].shape[0]} "
                    "in the cache: the batch does not come from the cached data"
                )
        ids = torch.arange(k).expand(B, T, k).clone()  # (B, T, k) filler: k distinct ids,
        logprobs = torch.full((B, T, k), -math.log(k))  # uniform over them (a valid distribution)
        ids[valid] = torch.cat([r[0] for r in rows]).long()  # row-major order = example by example
        ratio = self.spec.temperature / temperature
        logprobs[valid] = retemper(
            torch.cat([r[1] for r in rows]), torch.cat([r[2] for r in rows]), ratio
        )
        return TopK(ids, logprobs)
