"""Tests of the offline teacher cache (kd/teacher_cache.py, scripts/cache_teacher.py).

Checks, on a tiny random llama teacher (vocab 512) and the tiny BPE tokenizer:
- round trip: the cache returns exactly what the teacher's top-k computation produced
  (fp32 storage bit for bit, fp16 as its rounding), and that equals the dense logits' top-k;
- k = V: the cached loss and its gradients equal the dense online loss (also at T = 2, where
  re-tempering is exact because the tail is empty), through the chunked loss too, and AdamW
  training of a tiny student from the cache equals online training step for step;
- re-tempering with k < V: the tail estimate is the documented bound (below the truth for
  T > T_c, above it for T < T_c);
- a cache for another tokenizer, data file, seq_len or tokenization, or an unfinished one, is
  refused with the field named; a batch not from the cached data is refused;
- an interrupted caching run (scripts/cache_teacher.py --max-shards 1, plus leftovers of a
  crash mid-shard) resumes and yields byte-identical files to an uninterrupted run;
- check_teacher: the teacher that wrote a cache passes, another seed of the same architecture
  (same config.json, other weights) or another config is refused in one line; a manifest
  without the teacher's fingerprint (an older cache) is checked on the config alone;
- a shard with a flipped byte (at its first read), a truncated one (at open) and a missing one
  are one-line errors naming the shard; a rerun of scripts/cache_teacher.py rewrites them to
  the same bytes; a manifest without checksums still opens;
- scripts/cache_teacher.py with --out a file, a read-only folder or one that fills up (a real
  tmpfs, tests/fs_faults.py): exit 1, one `error:` line naming the path; the shards finished
  before stay whole, and a rerun elsewhere finishes the cache an uninterrupted run writes;
- scripts/cache_teacher.py under torchrun (2 gloo ranks, an odd number of shards, so one rank
  idles in the last round) finishes a cache begun by one process with the one-process bytes;
- (slow) train.py from a k = V cache equals online KD.

Run: `.venv/bin/python -m pytest -q tests/test_teacher_cache.py` (~35 s of CPU time, ~10 s of
it the torchrun test); `-m slow` for the train.py run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fs_faults import run_on_tmpfs
from safetensors.torch import load_file
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import TINY_VOCAB_SIZE, make_tiny_tokenizer
from tokenizers import Tokenizer as Backend

from kd.cache_writer import teacher_topk, write_cache
from kd.chunked_loss import chunked_distillation_loss
from kd.data import IGNORE, collate, load_examples
from kd.hf import load_model
from kd.losses import LossOptions, distillation_loss
from kd.teacher_cache import CacheSpec, TeacherCache, config_sha256, file_sha256
from kd.tokenizer import load_tokenizer

SEQ_LEN = 40
RECORDS = [
    {
        "text": "The river rises in the northern hills and flows south for about two hundred "
        "kilometres."
    },
    {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"text": "def add(a: int, b: int) -> int:\n    return a + b\n"},
    {
        "prompt": "Explain distillation.",
        "response": "A student is trained to match the teacher's "
        "distribution over the next token, which carries more than the label alone.",
    },
    {"text": "In 1969 the first crewed landing on the Moon took place."},
    {"text": "Café, naïve, façade and résumé keep their accents; 東京 and 北京 are capitals."},
    {"prompt": "Name a planet.", "response": "Mars."},
]
REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "cache_teacher.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tokenizer, data file, examples and a tiny fp32 teacher (vocab = the tokenizer's 512)."""
    root = tmp_path_factory.mktemp("cache")
    tok_dir = make_tiny_tokenizer(root / "tok")
    teacher_dir = make_tiny_checkpoint(
        root / "teacher", "llama", seed=0, vocab_size=TINY_VOCAB_SIZE
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, teacher_dir / name)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    tokenizer = load_tokenizer(tok_dir)
    examples, _ = load_examples(data, tokenizer, seq_len=SEQ_LEN)
    teacher = load_model(teacher_dir).eval().requires_grad_(False)
    return {
        "root": root,
        "tok_dir": tok_dir,
        "teacher_dir": teacher_dir,
        "data": data,
        "tokenizer": tokenizer,
        "examples": examples,
        "teacher": teacher,
    }


def _spec(
    s: dict, *, k: int, dtype: str = "float32", temperature: float = 1.0, per_shard: int = 3
) -> CacheSpec:
    return CacheSpec(
        tokenizer_fingerprint=s["tokenizer"].fingerprint(),
        data_sha256=file_sha256(s["data"]),
        seq_len=SEQ_LEN,
        teacher_config_sha256=config_sha256(s["teacher_dir"]),
        vocab_size=TINY_VOCAB_SIZE,
        num_examples=len(s["examples"]),
        k=k,
        dtype=dtype,
        temperature=temperature,
        examples_per_shard=per_shard,
    )


def _cache(s: dict, name: str, **spec_kwargs) -> TeacherCache:
    """Write a cache (batch size 1: each example's forward is the one the tests recompute) and
    open it."""
    out = s["root"] / name
    if not out.exists():
        assert write_cache(out, s["teacher"], s["examples"], _spec(s, **spec_kwargs), batch_size=1)
    return TeacherCache.open(
        out, tokenizer=s["tokenizer"], data_path=s["data"], seq_len=SEQ_LEN, examples=s["examples"]
    )


def _batch(s: dict, indices: list[int]) -> dict[str, torch.Tensor]:
    return collate([s["examples"][i] for i in indices], pad_id=0)


def _dense_teacher_logits(s: dict, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return s["teacher"](batch["input_ids"])  # (B, T, V)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_is_exact(setup, dtype):
    s = setup
    cache = _cache(s, f"k16-{dtype}", k=16, dtype=dtype)
    for i, example in enumerate(s["examples"]):
        one = _batch(s, [i])
        ids, logprobs, log_tail = teacher_topk(s["teacher"], one["input_ids"], one["labels"], k=16)
        got_ids, got_lp, got_tail = cache._rows(i)
        store = getattr(torch, dtype)
        assert torch.equal(got_ids.long(), ids), f"example {i}: ids differ"
        assert torch.equal(got_lp, logprobs.to(store)), (
            f"max |diff| {(got_lp.float() - logprobs).abs().max():.3g}"
        )
        assert torch.equal(got_tail, log_tail.to(store)), (
            f"max |diff| {(got_tail.float() - log_tail).abs().max():.3g}"
        )

    # The stored top-k is the dense logits' top-k; 1e-5: fp32 head rows computed in other blocks.
    batch = _batch(s, [0, 3, 6])
    # (n, V)
    log_p = F.log_softmax(_dense_teacher_logits(s, batch).double(), -1)[batch["labels"] != IGNORE]
    top, top_ids = log_p.topk(16, -1)
    ids, logprobs, log_tail = teacher_topk(s["teacher"], batch["input_ids"], batch["labels"], k=16)
    assert torch.equal(ids, top_ids)
    assert (logprobs - top).abs().max() < 1e-5, f"max |diff| {(logprobs - top).abs().max():.3g}"
    tail = torch.log1p(-top.exp().sum(-1))  # float64: no cancellation worth the name at this scale
    assert (log_tail - tail).abs().max() < 1e-5, f"max |diff| {(log_tail - tail).abs().max():.3g}"

    # topk_for puts the rows at the labelled positions, in order; at T = T_c it only renormalizes
    # the k + 1 buckets. Tolerance: fp32 ~1e-7 per entry, so 1e-6; fp16 rounds |log p| < 16 by
    # < 2^-7 and renormalizing shifts every entry by about as much again, so 2e-2.
    topk = cache.topk_for([0, 3, 6], batch["labels"])
    valid = batch["labels"] != IGNORE
    assert topk.ids.shape == (3, batch["labels"].shape[1], 16)
    assert torch.equal(topk.ids[valid], ids)
    diff = (topk.logprobs[valid] - logprobs).abs().max()
    assert diff < (1e-6 if dtype == "float32" else 2e-2), f"max |diff| {diff:.3g}"


def test_ids_are_16_bit_and_bytes_per_token(setup):
    s = setup
    cache = _cache(s, "k16-float16", k=16, dtype="float16")
    shard = cache._files[0]
    assert shard.get_slice("ids").get_dtype() == "U16"
    rows = sum(sh["tokens"] for sh in cache.shards)
    size = sum(
        f.get_slice(n)[:].nbytes for f in cache._files for n in ("ids", "logprobs", "log_tail")
    )
    assert size == rows * (4 * 16 + 2)  # 2-byte id + 2-byte log-prob per kept token, 2-byte tail


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equals_vocab_matches_dense_loss_and_gradients(setup, temperature):
    s = setup
    cache = _cache(s, "kV", k=TINY_VOCAB_SIZE)
    indices = [5, 1, 2, 4]
    batch = _batch(s, indices)
    labels = batch["labels"]
    torch.manual_seed(0)
    student_logits = (2 * torch.randn(*labels.shape, TINY_VOCAB_SIZE)).requires_grad_()
    options = LossOptions(temperature=temperature, alpha=0.5)
    dense, _ = distillation_loss(student_logits, _dense_teacher_logits(s, batch), labels, options)
    (g_dense,) = torch.autograd.grad(dense, student_logits)
    topk = cache.topk_for(indices, labels, temperature=temperature)
    cached, _ = distillation_loss(student_logits, topk, labels, options)
    (g_cached,) = torch.autograd.grad(cached, student_logits)
    # 1e-5: the cached teacher ran one example per forward, the dense one the batch (fp32 rows
    # in other blocks, ~1e-6 in log-probs); everything else is the same arithmetic.
    assert abs(dense.item() - cached.item()) < 1e-5, (
        f"|diff| {abs(dense.item() - cached.item()):.3g}"
    )
    assert (g_dense - g_cached).abs().max() < 1e-6, (
        f"max |diff| {(g_dense - g_cached).abs().max():.3g}"
    )

    # The chunked loss takes the same TopK; hidden @ W stands in for the logits (1e-5: matmul
    # order).
    hidden = torch.randn(*labels.shape, 16, requires_grad=True)
    weight = torch.randn(TINY_VOCAB_SIZE, 16)
    chunked, _ = chunked_distillation_loss(
        hidden, weight, None, None, labels, options, chunk_size=16, teacher_logits=topk
    )
    plain, _ = distillation_loss(hidden @ weight.T, topk, labels, options)
    assert abs(chunked.item() - plain.item()) < 1e-5, (
        f"|diff| {abs(chunked.item() - plain.item()):.3g}"
    )


def test_training_from_cache_equals_online_step_for_step(setup, tmp_path):
    s = setup
    cache = _cache(s, "kV", k=TINY_VOCAB_SIZE)
    student_dir = make_tiny_checkpoint(
        tmp_path / "student", "llama", seed=1, vocab_size=TINY_VOCAB_SIZE, num_hidden_layers=1
    )
    online, cached = load_model(student_dir), load_model(student_dir)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1) for m in (online, cached)]
    for step, indices in enumerate([[0, 1], [2, 3], [4, 5], [6, 0], [1, 2]]):
        batch = _batch(s, indices)
        labels = batch["labels"]
        losses = []
        for model, opt, teacher in (
            (online, opts[0], _dense_teacher_logits(s, batch)),
            (cached, opts[1], cache.topk_for(indices, labels)),
        ):
            options = LossOptions(alpha=0.5)
            loss, _ = distillation_loss(model(batch["input_ids"]), teacher, labels, options)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        # 1e-5: teacher log-probs differ by ~1e-6 (batching, see above); Adam's g / sqrt(v)
        # keeps the relative size of such differences in the update.
        assert abs(losses[0] - losses[1]) < 1e-5, (
            f"step {step}: |diff| {abs(losses[0] - losses[1]):.3g}"
        )
    diff = max((a - b).abs().max().item() for a, b in zip(online.parameters(), cached.parameters()))
    assert diff < 1e-5, f"weights after 5 steps: max |diff| {diff:.3g} (lr 1e-3 moves them ~5e-3)"


def test_retempering_bounds_the_tail(setup):
    """k < V: top-k buckets exact up to the normaliser; the tail estimate m p_k^(a-1) is below the
    true tail mass for T > T_c and above it for T < T_c (concavity / convexity of x^a)."""
    s = setup
    cache = _cache(s, "k16-float32", k=16)
    batch = _batch(s, [0, 3])
    valid = batch["labels"] != IGNORE
    logits = _dense_teacher_logits(s, batch)[valid].double()  # (n, V)
    for temperature in (2.0, 0.5):
        topk = cache.topk_for([0, 3], batch["labels"], temperature=temperature)
        ids, est = topk.ids[valid], topk.logprobs[valid].double()
        est_tail = torch.log1p(-est.exp().sum(-1))
        log_p = F.log_softmax(logits / temperature, -1)
        true_tail = log_p.scatter(-1, ids, -math.inf).logsumexp(-1)
        # Top-k buckets relative to each other: exact, as log p_i - log p_1 (1e-5: fp32 storage).
        rel = (est - est[:, :1]) - (log_p.gather(-1, ids) - log_p.gather(-1, ids[:, :1]))
        assert rel.abs().max() < 1e-5, f"T={temperature}: max |diff| {rel.abs().max():.3g}"
        gap = (est_tail - true_tail) if temperature > 1 else (true_tail - est_tail)
        assert gap.max() < 1e-5, (
            f"T={temperature}: the tail estimate is on the wrong side by {gap.max():.3g}"
        )


def test_mismatched_cache_is_refused(setup, tmp_path):
    s = setup
    _cache(s, "k16-float32", k=16)
    path = s["root"] / "k16-float32"
    kwargs = dict(
        tokenizer=s["tokenizer"], data_path=s["data"], seq_len=SEQ_LEN, examples=s["examples"]
    )

    backend = Backend.from_file(str(s["tok_dir"] / "tokenizer.json"))
    backend.add_tokens(["<extra>"])
    other_tok = tmp_path / "tok"
    other_tok.mkdir()
    backend.save(str(other_tok / "tokenizer.json"))
    shutil.copy(s["tok_dir"] / "tokenizer_config.json", other_tok)
    with pytest.raises(ValueError, match="tokenizer_fingerprint differs"):
        TeacherCache.open(path, **{**kwargs, "tokenizer": load_tokenizer(other_tok)})

    other_data = tmp_path / "data.jsonl"
    other_data.write_text(s["data"].read_text().replace("Paris", "Lyon"))
    with pytest.raises(ValueError, match="data_sha256 differs"):
        TeacherCache.open(path, **{**kwargs, "data_path": other_data})
    with pytest.raises(ValueError, match="seq_len is 40 in the cache, 64 here"):
        TeacherCache.open(path, **{**kwargs, "seq_len": 64})
    with pytest.raises(ValueError, match="tokenization changed"):
        TeacherCache.open(path, **{**kwargs, "examples": s["examples"][:-1]})
    with pytest.raises(FileNotFoundError, match="not a teacher cache"):
        TeacherCache.open(tmp_path, **kwargs)

    # A batch whose rows are not the examples named: caught by its count of labelled positions.
    cache = TeacherCache.open(path, **kwargs)
    with pytest.raises(ValueError, match="does not come from the cached data"):
        cache.topk_for([1, 0], _batch(s, [0, 1])["labels"])

    # Continuing a cache with another k is refused, naming the field.
    with pytest.raises(ValueError, match="holds a cache with k=16, this run has 8"):
        write_cache(path, s["teacher"], s["examples"], _spec(s, k=8))


def _run_script(args: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("cache_teacher", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(args)


def test_interrupted_run_resumes_to_identical_files(setup, tmp_path, capsys):
    s = setup
    common = [
        "--teacher",
        str(s["teacher_dir"]),
        "--data",
        str(s["data"]),
        "--top-k",
        "8",
        "--seq-len",
        str(SEQ_LEN),
        "--dtype",
        "bfloat16",
        "--teacher-dtype",
        "fp32",
        "--batch-size",
        "2",
        "--examples-per-shard",
        "2",
    ]
    _run_script([*common, "--out", str(tmp_path / "full")])

    part = tmp_path / "part"
    _run_script([*common, "--out", str(part), "--max-shards", "1"])
    kwargs = dict(
        tokenizer=s["tokenizer"], data_path=s["data"], seq_len=SEQ_LEN, examples=s["examples"]
    )
    with pytest.raises(ValueError, match=r"incomplete \(1 shards written\)"):
        TeacherCache.open(part, **kwargs)
    # A crash mid-shard leaves a temporary file; one after the shard's rename but before the
    # manifest's leaves a shard the manifest does not list. Neither may disturb the resume.
    (part / "shard-00001.safetensors.tmp").write_bytes(b"half a shard")
    (part / "shard-00002.safetensors").write_bytes(b"a shard the manifest never listed")
    _run_script([*common, "--out", str(part)])

    full_files = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert (
        full_files
        == sorted(p.name for p in part.iterdir())
        == ["manifest.json", *(f"shard-{i:05d}.safetensors" for i in range(4))]
    )
    for name in full_files:
        assert (tmp_path / "full" / name).read_bytes() == (part / name).read_bytes(), (
            f"{name} differs"
        )
    assert len(TeacherCache.open(part, **kwargs)) == len(s["examples"])

    # User errors: one line, exit status 1, no traceback.
    with pytest.raises(SystemExit) as exit_info:
        _run_script([*common, "--out", str(part), "--top-k", "9999"])
    assert str(exit_info.value).startswith("error: --top-k 9999 must be in 1..512")


@pytest.mark.usefixtures("one_thread")  # as torchrun's ranks: the same fp32 summation order
def test_two_ranks_finish_a_one_process_cache_with_the_same_bytes(setup, tmp_path):
    """9 examples in 5 shards of 2 (the last of 1). One process writes shards 0-1 (--max-shards 2),
    then torchrun with 2 gloo ranks and the FSDP-sharded fp32 teacher resumes: shards 2 | 3, then
    4 alone, rank 1 running an idle forward to keep the all-gathers in step. Every file must equal
    an uninterrupted one-process run's byte for byte (same batches, same fp32 math); one launch
    of 2 ranks, as each costs ~5-10 s of Python and torch start-up."""
    s = setup
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*RECORDS, *RECORDS[:2]]))
    common = [
        "--teacher",
        str(s["teacher_dir"]),
        "--data",
        str(data),
        "--top-k",
        "8",
        "--seq-len",
        str(SEQ_LEN),
        "--dtype",
        "float32",
        "--teacher-dtype",
        "fp32",
        "--batch-size",
        "1",
        "--examples-per-shard",
        "2",
    ]
    one, mixed = tmp_path / "one", tmp_path / "mixed"
    _run_script([*common, "--out", str(one)])
    _run_script([*common, "--out", str(mixed), "--max-shards", "2"])
    # One thread: the same fp32 summation order.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            str(SCRIPT),
            *common,
            "--out",
            str(mixed),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count(f"{mixed}: complete") == 1, "rank 0 alone reports"
    names = sorted(p.name for p in one.iterdir())
    assert names == ["manifest.json", *(f"shard-{i:05d}.safetensors" for i in range(5))]
    assert sorted(p.name for p in mixed.iterdir()) == names
    for name in names:
        assert (mixed / name).read_bytes() == (one / name).read_bytes(), f"{name} differs"


def _train_has_teacher_cache() -> bool:
    from kd.config import TrainConfig

    return "teacher_cache" in TrainConfig.__dataclass_fields__


@pytest.mark.slow
@pytest.mark.skipif(
    not _train_has_teacher_cache(), reason="train.py has no teacher_cache setting yet"
)
def test_train_py_from_cache_equals_online(setup, tmp_path):
    """train.py end to end (~1-2 min): a k = V cache at T = 2 reproduces online KD's losses and
    weights."""
    s = setup
    # One thread: the same fp32 summation order.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def run(*argv: str) -> None:
        result = subprocess.run(
            [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]

    cache = tmp_path / "cache"
    run(
        str(SCRIPT),
        f"--teacher={s['teacher_dir']}",
        f"--data={s['data']}",
        f"--out={cache}",
        f"--top-k={TINY_VOCAB_SIZE}",
        f"--seq-len={SEQ_LEN}",
        "--dtype=float32",
        "--teacher-dtype=fp32",
    )
    common = [
        str(REPO / "train.py"),
        f"--teacher={s['teacher_dir']}",
        f"--data={s['data']}",
        "--student_layers=0",
        "--max_steps=6",
        f"--seq_len={SEQ_LEN}",
        "--batch_size=2",
        "--lr=1e-2",
        "--warmup_steps=2",
        "--min_lr=1e-3",
        "--precision=fp32",
        "--log_every=1",
        "--chunk_size=64",
        "--loss=forward_kl",
        "--temperature=2.0",
    ]
    run(*common, f"--out={tmp_path / 'online'}")
    run(*common, f"--out={tmp_path / 'cached'}", f"--teacher_cache={cache}")

    def losses(out: Path) -> list[float]:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r]

    online, cached = losses(tmp_path / "online"), losses(tmp_path / "cached")
    assert len(online) == len(cached) == 6
    # 1e-5 as in the in-process test: teacher log-probs computed in other batches differ by ~1e-6.
    diff = max(abs(a - b) for a, b in zip(online, cached))
    assert diff < 1e-5, f"losses: max |diff| {diff:.3g}"
    wa, wb = (
        load_file(tmp_path / run_dir / "final" / "model.safetensors")
        for run_dir in ("online", "cached")
    )
    w_diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    # 1e-4: those differences pass through 6 Adam steps of lr 1e-2 (weights move by ~5e-2).
    assert w_diff < 1e-4, f"final weights: max |diff| {w_diff:.3g}"


# ----------------------------------------------------------------------------- integrity
# A cache written by scripts/cache_teacher.py (so with the teacher's fingerprint and the shards'
# checksums): 7 examples in 4 shards of 2, k = 32 in fp32, ~9 KB per shard (several tmpfs pages).


def _script_args(s: dict, out: Path) -> list[str]:
    return [
        f"--teacher={s['teacher_dir']}",
        f"--data={s['data']}",
        f"--out={out}",
        "--top-k=32",
        f"--seq-len={SEQ_LEN}",
        "--dtype=float32",
        "--teacher-dtype=fp32",
        "--batch-size=2",
        "--examples-per-shard=2",
    ]


@pytest.fixture(scope="module")
def script_cache(setup) -> Path:
    """The uninterrupted run's cache, on one thread (the fp32 summation order of the
    OMP_NUM_THREADS=1 subprocesses it is compared with)."""
    out = setup["root"] / "script-k32"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_script(_script_args(setup, out))
    finally:
        torch.set_num_threads(threads)
    return out


def _open(s: dict, path: Path) -> TeacherCache:
    return TeacherCache.open(
        path, tokenizer=s["tokenizer"], data_path=s["data"], seq_len=SEQ_LEN, examples=s["examples"]
    )


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _one_line_error(excinfo: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and all(p in message for p in parts), message
    return message


def _tensor_bytes(file: Path, name: str) -> tuple[int, int]:
    """[begin, end) of a tensor's data in a safetensors file (8-byte header length, JSON
    header, then the data the header's offsets count from)."""
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def test_training_refuses_another_teacher(setup, script_cache, tmp_path):
    """check_teacher: the teacher that wrote the cache passes; another seed of the same
    architecture and vocabulary (same config.json, other weights) and another config are
    refused in one line; a cache without the fingerprint (older) is checked on the config."""
    s = setup
    cache = _open(s, script_cache)
    cache.check_teacher(s["teacher_dir"])
    other = make_tiny_checkpoint(tmp_path / "b", "llama", seed=1, vocab_size=TINY_VOCAB_SIZE)
    assert config_sha256(other) == config_sha256(s["teacher_dir"]), "B must differ in weights only"
    with pytest.raises(ValueError) as e:
        cache.check_teacher(other)
    _one_line_error(e, str(script_cache), str(other), "other weights", "scripts/cache_teacher.py")
    deeper = make_tiny_checkpoint(
        tmp_path / "c", "llama", seed=0, vocab_size=TINY_VOCAB_SIZE, num_hidden_layers=3
    )
    with pytest.raises(ValueError) as e:
        cache.check_teacher(deeper)
    _one_line_error(e, "config.json differs", str(deeper))

    old = tmp_path / "old"
    shutil.copytree(script_cache, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["teacher_fingerprint"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    _open(s, old).check_teacher(other)  # config alone: the same
    with pytest.raises(ValueError, match="config.json differs"):
        _open(s, old).check_teacher(deeper)


def test_damaged_shards_are_refused_in_one_line(setup, script_cache, tmp_path):
    """One flipped byte: refused at the shard's first read, naming it; deleting it and rerunning
    scripts/cache_teacher.py (as the message says) restores the same bytes. A truncated shard:
    refused at open; a rerun writes it again. A manifest without checksums (an older cache)
    still opens and reads."""
    s = setup
    path = tmp_path / "cache"
    shutil.copytree(script_cache, path)
    shard = path / "shard-00001.safetensors"
    begin, end = _tensor_bytes(shard, "logprobs")
    data = bytearray(shard.read_bytes())
    data[(begin + end) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    cache = _open(s, path)  # sizes match: the flip is found when the shard is first read
    cache.topk_for([0, 1], _batch(s, [0, 1])["labels"])  # shard 0 is fine
    with pytest.raises(ValueError) as e:
        cache.topk_for([2], _batch(s, [2])["labels"])
    _one_line_error(e, str(shard), "sha256", "delete it and run scripts/cache_teacher.py again")
    with pytest.raises(ValueError, match="shard-00001.safetensors does not match its sha256"):
        cache.verify()
    shard.unlink()
    with pytest.raises(ValueError, match="shard-00001.safetensors is missing"):
        _open(s, path)
    _run_script(_script_args(s, path))  # rewrites the missing shard
    assert _files(path) == _files(script_cache)
    _open(s, path).verify()

    shard = path / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError) as e:
        _open(s, path)
    _one_line_error(
        e, str(shard), "truncated or damaged", "delete it and run scripts/cache_teacher.py again"
    )
    _run_script(_script_args(s, path))  # a shard not of its recorded size is written again
    assert _files(path) == _files(script_cache)
    shard.write_bytes(shard.read_bytes()[:-100])

    # Without checksums (as written before them): opens and reads; a truncated shard is still
    # one line naming it (safetensors finds its header's offsets past the end).
    manifest = json.loads((path / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["bytes"], entry["sha256"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as e:
        _open(s, path)
    _one_line_error(e, str(shard), "not a readable safetensors file")
    shutil.copy(script_cache / shard.name, shard)
    cache = _open(s, path)
    cache.verify()
    expected = _open(s, script_cache).topk_for([0, 2, 6], _batch(s, [0, 2, 6])["labels"])
    got = cache.topk_for([0, 2, 6], _batch(s, [0, 2, 6])["labels"])
    assert torch.equal(got.ids, expected.ids) and torch.equal(got.logprobs, expected.logprobs)


def test_out_naming_a_file_is_one_line(setup, tmp_path):
    file = tmp_path / "cache"
    file.write_text("not a directory")
    with pytest.raises(SystemExit) as e:
        _run_script(_script_args(setup, file))
    assert (
        str(e.value)
        == f"error: {file} is a file, not a cache directory: choose another output directory"
    )
    assert file.read_text() == "not a directory"


def _error_line(stderr: str) -> str:
    """The one `error:` line of a failed run (other lines: the data's statistics)."""
    lines = stderr.splitlines()
    assert "Traceback" not in stderr and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error:") for line in lines) == 1, stderr
    return lines[-1]


def test_read_only_and_full_output_folders(setup, script_cache, tmp_path):
    """A real read-only and a real full filesystem (tmpfs in a private mount namespace): exit
    1, one error line naming the path, no traceback; the shards finished before the disk
    filled stay whole and listed, no temporary file is left, and a rerun on a normal folder
    finishes a cache byte-identical to an uninterrupted run."""
    s = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # script_cache's fp32 summation order
    command = [sys.executable, str(SCRIPT)]
    read_only = tmp_path / "ro"
    result = run_on_tmpfs(
        [*command, *_script_args(s, read_only / "cache")], read_only, readonly=True, env=env
    )
    assert result.returncode == 1, result.stderr
    line = _error_line(result.stderr)
    assert f"cannot write {read_only / 'cache'}: Read-only file system" in line, line

    # Room for shards 0 and 1 and two copies of the manifest (the new one is written beside the
    # old before the rename): shard 2 (several pages) no longer fits.
    page = os.sysconf("SC_PAGE_SIZE")
    pages = {n: -(-len(b) // page) for n, b in _files(script_cache).items()}
    size = page * (pages["shard-00000.safetensors"] + pages["shard-00001.safetensors"])
    size += 2 * page * pages["manifest.json"]
    full, after = tmp_path / "full", tmp_path / "after"
    result = run_on_tmpfs(
        [*command, *_script_args(s, full)], full, size_kb=size // 1024, keep=after, env=env
    )
    assert result.returncode == 1, result.stderr
    line = _error_line(result.stderr)
    assert line.startswith(f"error: cannot write {full}/") and "No space left on device" in line
    assert "run again with the same arguments" in line, line
    kept = _files(after)
    assert not [n for n in kept if n.endswith(".tmp")], sorted(kept)
    listed = [e["file"] for e in json.loads(kept["manifest.json"])["shards"]]
    assert len(listed) >= 1, listed
    for name in listed:  # whole, and what an uninterrupted run wrote
        assert kept[name] == (script_cache / name).read_bytes(), f"{name} differs"
    with pytest.raises(ValueError, match="incomplete"):
        _open(s, after)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_script(_script_args(s, after))
    finally:
        torch.set_num_threads(threads)
    assert _files(after) == _files(script_cache)
