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
N, one each, and rank 0 the manifest (`write_cache`): same bytes.

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

Written by scripts/cache_teacher.py.
Tests: `.venv/bin/python -m pytest -q tests/test_teacher_cache.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from kd import parallel
from kd.data import IGNORE, Example, collate
from kd.hf import fingerprint
from kd.losses import TopK
from kd.model import Transformer
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


# ----------------------------------------------------------------------------- the teacher side


@torch.no_grad()
def teacher_topk(
    teacher: Transformer,
    input_ids: Tensor,
    labels: Tensor,
    *,
    k: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's (ids (n, k), log-probs (n, k), log tail (n,)) at the n labelled positions.

    Rows follow the row-major order of labels != IGNORE. Log-probs are fp32 log_softmax(z / T)
    of the teacher's logits; only `chunk_size` rows of (rows x V) logits exist at a time.
    """
    valid = labels != IGNORE  # (B, T)
    hidden, weight = teacher(input_ids, output_fn=lambda h, w: (h[valid], w))  # (n, H), (V, H)
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"top-k k={k} must be in 1..{weight.shape[0]} (the teacher's vocabulary)")
    ids, logprobs, log_tail = [], [], []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = hidden[start : start + chunk_size] @ weight.T  # (c, V) in the teacher's dtype
        log_p = F.log_softmax(logits.float() / temperature, dim=-1)  # (c, V) fp32
        top, top_ids = log_p.topk(k, dim=-1)  # (c, k), largest first
        ids.append(top_ids)
        logprobs.append(top)
        # Log of the mass outside the top-k (c,), as a logsumexp over those V - k entries (-inf
        # when k = V): log(1 - sum exp(top)) loses all precision when the top-k hold nearly all
        # the mass.
        log_tail.append(log_p.scatter(-1, top_ids, -math.inf).logsumexp(-1))
    return torch.cat(ids), torch.cat(logprobs), torch.cat(log_tail)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary name, then rename it over `path`: readers see the old file or
    the new one, never half. A failed write (a full disk) removes the temporary file and raises
    an OSError naming it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # give a full disk its space back; may fail (read-only)
            tmp.unlink(missing_ok=True)
        if e.filename is None:  # write() on a full disk names no file
            raise OSError(e.errno, e.strerror, str(tmp)) from None
        raise


def _write_manifest(out: Path, manifest: dict) -> None:
    _atomic_write(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def make_cache_dir(out: str | Path) -> Path:
    """`out` as a directory, created if missing; a file there is a ValueError (cheap: call it
    before loading a teacher)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a cache directory: choose another output directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _read_manifest(path: Path) -> tuple[CacheSpec, dict]:
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


@torch.no_grad()
def _idle_forward(teacher: Transformer, device: torch.device) -> None:
    """A one-token forward whose result is dropped: it joins the teacher's FSDP all-gathers."""
    teacher(torch.zeros(1, 1, dtype=torch.long, device=device), output_fn=lambda h, w: None)


def write_cache(
    out: str | Path,
    teacher: Transformer,
    examples: list[Example],
    spec: CacheSpec,
    *,
    batch_size: int = 8,
    max_shards: int | None = None,
    info: dict | None = None,
    on_batch: Callable[[int], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> bool:
    """Write (or continue) the cache of `examples` in `out`; return True once it is complete.

    Resumes after the last shard the manifest lists, if the existing manifest has the same
    spec (else ValueError: another run's cache is there), first writing again any listed shard
    that is missing or not of its recorded size. `max_shards` stops after writing that many
    shards (a long job split into pieces; the next call continues). `info` goes into the
    manifest as is (e.g. teacher and data paths). `on_batch(examples_done)` reports progress,
    once at the start, then per batch. Examples are batched only within a shard, so a resumed
    cache is byte-identical. A failed write (a full or read-only disk) is an OSError naming
    the file; the shards the manifest lists stay whole, so a later call continues.

    Several ranks (torchrun; every rank calls this with the same arguments, `out` on a
    filesystem all of them see): the shards are dealt out in rounds of `world_size`, rank r
    computing and writing the round's r-th shard; after each round rank 0 alone lists the
    round's shards in the manifest, with their checksums (its own from memory, the others'
    read back from disk). The manifest thus lists a prefix of the shards, as with one process,
    so the bytes and the resume point do not depend on the number of ranks.
    """
    _check_spec(spec, examples, batch_size)
    out = make_cache_dir(out)
    manifest = _start_manifest(out, spec, info)
    listed = manifest["shards"]
    todo = _todo(out, listed, math.ceil(len(examples) / spec.examples_per_shard), world_size)
    run = todo if max_shards is None else todo[:max_shards]
    device = teacher.head_weight.device  # a plain tensor on every rank (see kd/parallel.py)
    pending = set(todo)
    done = sum(e["end"] - e["first"] for i, e in enumerate(listed) if i not in pending)
    if on_batch is not None:
        on_batch(done)
    manifest["complete"] = not todo

    for r in range(0, len(run), world_size):
        shards = run[r : r + world_size]  # one per rank; the last round may leave ranks idle
        mine = shards[rank] if rank < len(shards) else None
        parts = _run_round(
            teacher, examples, spec, shards, mine, batch_size, device, on_batch=on_batch, done=done
        )
        written = None  # (bytes, sha256) of this rank's shard
        if mine is not None:
            first, end = _shard_bounds(mine, spec)
            written = _write_shard(out / _shard_file(mine), parts, examples[first:end], spec)
        if world_size > 1:
            parallel.barrier()  # every shard of the round is renamed into place before it is listed
        for shard in shards:
            first, end = _shard_bounds(shard, spec)
            tokens = sum(e.num_targets for e in examples[first:end])
            entry = dict(file=_shard_file(shard), first=first, end=end, tokens=tokens)
            if rank == 0:  # the manifest's writer records the checksums
                size, sha256 = written if shard == mine else _checksum(out / entry["file"])
                entry.update(bytes=size, sha256=sha256)
            listed[shard : shard + 1] = [entry]  # replaces a rewritten shard's entry, or appends
            done += end - first
        manifest["complete"] = r + len(shards) == len(todo)
        if rank == 0:
            # After the shards' renames: a shard the manifest lists is always whole.
            _write_manifest(out, manifest)
    return manifest["complete"]


def _check_spec(spec: CacheSpec, examples: list[Example], batch_size: int) -> None:
    """ValueError for a spec that does not fit the examples or cannot be written."""
    if spec.num_examples != len(examples):
        raise ValueError(
            f"spec.num_examples={spec.num_examples} but {len(examples)} examples were given"
        )
    if spec.dtype not in STORAGE_DTYPES:
        raise ValueError(f"cache dtype {spec.dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
    if spec.examples_per_shard < 1 or batch_size < 1:
        raise ValueError(
            f"examples_per_shard={spec.examples_per_shard} and batch_size={batch_size} must be >= 1"
        )


def _todo(out: Path, listed: list[dict], n_shards: int, world_size: int) -> list[int]:
    """The shards to write, in order: listed ones that are missing or not of their recorded
    size (any size passes in older caches), then the unlisted ones."""

    def whole(entry: dict) -> bool:
        file = out / entry["file"]
        return file.is_file() and entry.get("bytes", file.stat().st_size) == file.stat().st_size

    broken = [float(not whole(entry)) for entry in listed]
    if world_size > 1 and broken:  # one answer for all: ranks stat the files at different times
        broken = parallel.agree(broken)  # a shard broken on any rank's view is written again
    return [*(i for i, b in enumerate(broken) if b), *range(len(listed), n_shards)]


def _checksum(file: Path) -> tuple[int, str]:
    """(bytes, sha256) of a shard another rank wrote (rank 0 reads it back once)."""
    return file.stat().st_size, file_sha256(file)


def _start_manifest(out: Path, spec: CacheSpec, info: dict | None) -> dict:
    """The manifest of the cache in `out` if there is one made for `spec`, else a fresh one.

    Every rank reads it: rank 0 rewrites it only after the first round's barrier. A teacher
    fingerprint missing on either side (an older cache, a caller without one) is not compared.
    """
    if not (out / MANIFEST).exists():
        return {
            "format_version": FORMAT_VERSION,
            **dataclasses.asdict(spec),
            **(info or {}),
            "layout": LAYOUT,
            "shards": [],
            "complete": False,
        }
    existing, manifest = _read_manifest(out)
    for f in dataclasses.fields(CacheSpec):
        old, new = getattr(existing, f.name), getattr(spec, f.name)
        if old != new and not (f.name == "teacher_fingerprint" and None in (old, new)):
            raise ValueError(
                f"{out} holds a cache with {f.name}={old!r}, this run has {new!r}; use another "
                "output directory or delete it"
            )
    return manifest


def _shard_file(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def _shard_bounds(shard: int, spec: CacheSpec) -> tuple[int, int]:
    """The shard's examples [first, end)."""
    first = shard * spec.examples_per_shard
    return first, min(first + spec.examples_per_shard, spec.num_examples)


def _run_round(
    teacher: Transformer,
    examples: list[Example],
    spec: CacheSpec,
    shards: list[int],
    mine: int | None,
    batch_size: int,
    device: torch.device,
    *,
    on_batch: Callable[[int], None] | None,
    done: int,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """This rank's part of one round: the teacher's top-k of shard `mine`, batch by batch, as
    host tensors (no batches when `mine` is None: no shard left for this rank). `done`:
    examples finished before the round, for `on_batch`."""
    first, end = _shard_bounds(mine, spec) if mine is not None else (0, 0)
    # Lock-step: a sharded teacher's every forward all-gathers each block's weights, a
    # collective all ranks must join, so all run as many forwards as the round's biggest
    # shard needs; a rank out of batches (the last, shorter shard, or none) runs idle ones.
    sizes = [hi - lo for lo, hi in (_shard_bounds(s, spec) for s in shards)]
    parts = []
    for step in range(math.ceil(max(sizes) / batch_size)):
        i = first + step * batch_size
        if i < end:
            # Right padding: every pad comes after the real tokens, which never attend to it.
            batch = collate(examples[i : min(i + batch_size, end)], pad_id=0)
            topk = teacher_topk(
                teacher,
                batch["input_ids"].to(device),
                batch["labels"].to(device),
                k=spec.k,
                temperature=spec.temperature,
            )
            parts.append(tuple(t.cpu() for t in topk))  # host copy: a sync on a GPU, per batch
        else:
            _idle_forward(teacher, device)
        if on_batch is not None:  # every rank is at this step too (lock-step)
            on_batch(done + sum(min((step + 1) * batch_size, n) for n in sizes))
    return parts


def _write_shard(
    path: Path,
    parts: list[tuple[Tensor, Tensor, Tensor]],
    examples: list[Example],
    spec: CacheSpec,
) -> tuple[int, str]:
    """One shard file from its batches' (ids, logprobs, log_tail) rows and its examples; returns
    its (size in bytes, sha256). Serialized in memory (a second copy of the shard, ~270 MB at
    the defaults) so the checksum is of exactly the bytes written."""
    storage = STORAGE_DTYPES[spec.dtype]
    tensors = {
        "ids": torch.cat([p[0] for p in parts]).to(ids_dtype(spec.vocab_size)),
        "logprobs": torch.cat([p[1] for p in parts]).to(storage),
        "log_tail": torch.cat([p[2] for p in parts]).to(storage),
        # (E + 1,): the rows of the shard's j-th example are offsets[j] .. offsets[j + 1].
        "offsets": torch.tensor([0] + [e.num_targets for e in examples]).cumsum(0),
    }
    data = save(tensors, metadata={"format": "pt"})
    _atomic_write(path, data)
    return len(data), hashlib.sha256(data).hexdigest()


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
        wrote = f"{self.path} was written by teacher {self.manifest.get('teacher', '(unknown)')}"
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
        spec, manifest = _read_manifest(path)
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
