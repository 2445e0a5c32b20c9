"""Writing a teacher cache: the teacher's top-k log-probs of every labelled position, in shards.

The format, and the reader training uses, are kd/teacher_cache.py's. `write_cache` runs the
teacher over the examples in batches and writes shard after shard (each through a temporary
name, then a rename), rewriting the manifest after each, so an interrupted run resumes after
its last whole shard and produces the same bytes as an uninterrupted one; a shard that is
missing or damaged is written again. Under torchrun the N ranks write the shards in rounds of
N, one each (their FSDP all-gathers in step), and rank 0 the manifest: the same bytes.

Run by scripts/cache_teacher.py. Tests: `.venv/bin/python -m pytest -q tests/test_teacher_cache.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save

from kd import parallel
from kd.data import IGNORE, Example, collate
from kd.model import Transformer
from kd.teacher_cache import (
    FORMAT_VERSION,
    LAYOUT,
    MANIFEST,
    STORAGE_DTYPES,
    CacheSpec,
    file_sha256,
    ids_dtype,
    read_manifest,
)

Tensor = torch.Tensor

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
    hidden, head = teacher(input_ids, output_fn=lambda h, head: (h[valid], head))  # (n, H), Head
    vocab = head.weight.shape[0]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k k={k} must be in 1..{vocab} (the teacher's vocabulary)")
    ids, logprobs, log_tail = [], [], []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = head(hidden[start : start + chunk_size])  # (c, V) in the teacher's dtype
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


@torch.no_grad()
def _idle_forward(teacher: Transformer, device: torch.device) -> None:
    """A one-token forward whose result is dropped: it joins the teacher's FSDP all-gathers."""
    teacher(torch.zeros(1, 1, dtype=torch.long, device=device), output_fn=lambda h, head: None)


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


def write_rows(
    out: str | Path,
    examples: list[Example],
    rows: list[tuple[Tensor, Tensor, Tensor]],
    spec: CacheSpec,
    *,
    info: dict | None = None,
) -> None:
    """Write a complete cache of rows computed elsewhere: (ids (m, k), logprobs (m, k), log_tail
    (m,)) per example, m = its trained positions (an API teacher's reported log-probs,
    kd/api_cache.py). Shards and manifest as `write_cache` writes them; a cache of another spec
    in `out` is refused, one of this spec written again."""
    _check_spec(spec, examples, batch_size=1)
    if len(rows) != len(examples):
        raise ValueError(f"{len(rows)} rows for {len(examples)} examples")
    out = make_cache_dir(out)
    manifest = {**_start_manifest(out, spec, info), "shards": [], "complete": False}
    n_shards = math.ceil(len(examples) / spec.examples_per_shard)
    for shard in range(n_shards):
        first, end = _shard_bounds(shard, spec)
        file = _shard_file(shard)
        size, sha256 = _write_shard(out / file, rows[first:end], examples[first:end], spec)
        tokens = sum(e.num_targets for e in examples[first:end])
        manifest["shards"].append(
            dict(file=file, first=first, end=end, tokens=tokens, bytes=size, sha256=sha256)
        )
        manifest["complete"] = shard == n_shards - 1
        _write_manifest(out, manifest)  # after the shard's rename: a listed shard is whole


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
    existing, manifest = read_manifest(out)
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
