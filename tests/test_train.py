"""train.py end to end on tiny real models: sharding, accumulation, resume, export, KD vs SFT.

A tiny random llama teacher (4 layers, the tiny BPE tokenizer's 512-token vocabulary) and a
2-layer student cut from it (`student_layers=0,2`) train for a few AdamW steps in fp32:
- 2 ranks (torchrun, gloo) and 1 process give the same losses and final weights, and so do
  1, 2 or 4 micro-batches per step (same global batch of 4);
- a run killed with SIGKILL after a checkpoint, or stopped by SIGTERM (which checkpoints),
  then resumed, ends with weights bitwise equal to the uninterrupted run;
- OUT/final loads in `transformers` with the logits of kd's own model;
- Qwen3, Gemma 2 and Gemma 3 teacher/student pairs: 2 ranks match 1 process, transformers
  loads the export;
- MoE teachers (Qwen3-MoE -> a dense Qwen3; Mixtral -> an MoE student of its layers, with the
  router's balancing loss): 2 ranks match 1 process, SIGKILL then resume is exact;
- on a peaky synthetic teacher, KD lowers held-out KL to the teacher faster than SFT;
- multi-teacher, two-stage (`init_from`) and response distillation (generate.py writes the
  data) run through the same loop.
- on-policy GKD and MiniLLM (kd/onpolicy.py, with lm_data) run on 2 ranks whose rollouts end
  at different lengths, log the rollout metrics, and a resumed MiniLLM run is exact.

Run: .venv/bin/python -m pytest -q tests/test_train.py   (`-m slow`: the tests marked SLOW)
"""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import CORPUS, TINY_VOCAB_SIZE, make_tiny_tokenizer

from kd import hf

REPO = Path(__file__).resolve().parent.parent
# Same thread count everywhere: fp32 sums then happen in the same order in every run.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
SLOW = pytest.mark.slow  # `make test-slow` runs these, `make test` skips them
# train.py's flags of every run here (argv words)
BASE = (
    "--student_layers=0,2 --max_steps=12 --seq_len=48 --lr=1e-2 --warmup_steps=2 --min_lr=1e-3"
    " --precision=fp32 --log_every=1 --chunk_size=64 --loss=forward_kl"
).split()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("train")
    teacher = make_tiny_checkpoint(
        d / "teacher", "llama", vocab_size=TINY_VOCAB_SIZE, num_hidden_layers=4
    )
    make_tiny_tokenizer(teacher)
    rng = random.Random(0)
    words = " ".join(CORPUS).split()
    train_records = [
        {"prompt": " ".join(rng.sample(words, 4)), "response": " ".join(rng.sample(words, 10))}
        for _ in range(48)
    ]
    eval_records = [{"text": " ".join(rng.sample(words, 12))} for _ in range(12)]
    return {
        "dir": d,
        "teacher": teacher,
        "data": write_jsonl(d / "train.jsonl", train_records),
        "eval": write_jsonl(d / "eval.jsonl", eval_records),
    }


def args(assets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        f"--teacher={assets['teacher']}",
        f"--data={assets['data']}",
        f"--out={out}",
        *BASE,
        *extra,
    ]


def run(argv: list[str], *, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    result = subprocess.run(
        [*launcher, str(REPO / "train.py"), *argv],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = (load_file(out / "final" / "model.safetensors") for out in (a, b))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def baseline(assets) -> Path:
    """1 process, 1 micro-batch of 4, checkpoints every 2 steps: the reference run."""
    out = assets["dir"] / "baseline"
    run(
        args(
            assets,
            out,
            "--batch_size=4",
            "--grad_accum=1",
            "--save_every=2",
            "--keep_checkpoints=2",
            f"--eval_data={assets['eval']}",
        )
    )
    return out


def test_two_ranks_and_micro_batches_match_one_process(assets, baseline):
    ranks = assets["dir"] / "two_ranks"
    micro = assets["dir"] / "four_micro"
    run(args(assets, ranks, "--batch_size=2", "--grad_accum=1"), nproc=2)
    run(args(assets, micro, "--batch_size=1", "--grad_accum=4"))
    reference = losses(baseline)
    assert len(reference) == 12
    for out in (ranks, micro):
        got = losses(out)
        diff = max(abs(a - b) for a, b in zip(got, reference))
        # fp32: only the order of the sums differs (other reduce and matmul shapes), ~1e-7
        # relative per step, grown by 12 AdamW steps at lr 1e-2; a per-micro-batch or
        # per-rank normalization bug would be off by >1e-2.
        assert diff < 1e-4, f"{out.name}: losses differ from 1 process by up to {diff:.2e}"
        wdiff = max_weight_diff(out, baseline)
        assert wdiff < 1e-4, f"{out.name}: final weights differ from 1 process by up to {wdiff:.2e}"


def test_sigkill_then_resume_is_exact(assets, baseline):
    out = assets["dir"] / "killed"
    argv = args(
        assets,
        out,
        "--batch_size=4",
        "--grad_accum=1",
        "--save_every=2",
        "--keep_checkpoints=2",
        f"--eval_data={assets['eval']}",
    )
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *argv],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not (out / "checkpoints" / "step_000002").is_dir() and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "final").exists()
    run([*argv, "--resume=true"])
    diff = max_weight_diff(out, baseline)
    assert diff == 0.0, (
        f"resumed run must equal the uninterrupted one bit for bit; max |diff| {diff}"
    )
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), (
        f"metrics.jsonl must not repeat the steps redone after the kill: {steps}"
    )


@SLOW
def test_sigterm_saves_then_resume_is_exact(assets, baseline):
    out = assets["dir"] / "terminated"
    argv = args(
        assets, out, "--batch_size=4", "--grad_accum=1", f"--eval_data={assets['eval']}"
    )  # save_every=0
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *argv],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not (out / "metrics.jsonl").is_file() and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
    finally:
        stderr = process.communicate()[1]
    assert process.returncode == 0, stderr
    saved = sorted((out / "checkpoints").iterdir())
    assert len(saved) == 1 and not (out / "final").exists(), (
        f"one checkpoint at the stop, no export: {saved}"
    )
    run([*argv, "--resume=true"])
    diff = max_weight_diff(out, baseline)
    assert diff == 0.0, (
        f"stopped by SIGTERM and resumed must equal the uninterrupted run; max |diff| {diff}"
    )


def test_export_loads_in_transformers(baseline):
    from transformers import AutoModelForCausalLM

    final = baseline / "final"
    ours = hf.load_model(final)
    theirs = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    # SDPA rounding is ~1e-6.
    assert diff < 1e-5, f"fp32 logits of the export, kd vs transformers: max |diff| {diff:.2e}"
    assert (final / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    "arch", ["qwen3", *(pytest.param(a, marks=SLOW) for a in ("gemma2", "gemma3"))]
)
def test_family_pair_on_two_ranks_matches_one_process_and_exports(assets, arch, tmp_path):
    """A 4-layer teacher of the family and a student of its layers 0 and 2 (gemma2: softcapped
    heads in the chunked loss; qwen3: q/k norms; gemma3: local and global layers): 2 ranks
    match 1 process, and transformers loads the export with kd's logits."""
    from transformers import AutoModelForCausalLM

    teacher = make_tiny_checkpoint(
        tmp_path / "teacher", arch, vocab_size=TINY_VOCAB_SIZE, num_hidden_layers=4
    )
    make_tiny_tokenizer(teacher)
    base = [a for a in BASE if not a.startswith("--max_steps")] + ["--max_steps=6"]

    def train(out: Path, batch_size: int, nproc: int) -> None:
        data = f"--data={assets['data']}"
        flags = [f"--batch_size={batch_size}", "--grad_accum=1"]
        run([f"--teacher={teacher}", data, f"--out={out}", *base, *flags], nproc=nproc)

    train(tmp_path / "two", 2, nproc=2)
    train(tmp_path / "one", 4, nproc=1)
    diff = max(abs(a - b) for a, b in zip(losses(tmp_path / "two"), losses(tmp_path / "one")))
    # fp32, as test_two_ranks_and_micro_batches_match_one_process (6 steps here, not 12).
    assert diff < 1e-4, f"{arch}: 2 ranks' losses differ from 1 process by up to {diff:.2e}"
    # Weights: AdamW at lr 1e-2 turns rounding in near-zero gradients into steps of up to lr:
    # measured 2e-5 to 1.1e-4 (gemma2, qwen3; two ways of writing the same G, equally close to
    # float64); a normalization bug moves weights by ~lr = 1e-2.
    wdiff = max_weight_diff(tmp_path / "two", tmp_path / "one")
    assert wdiff < 5e-4, f"{arch}: final weights differ from 1 process by up to {wdiff:.2e}"
    final = tmp_path / "one" / "final"
    ours = hf.load_model(final)
    theirs = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff < 1e-5, f"{arch} export, kd vs transformers: max |logit diff| {diff:.2e}"


def kill_after_first_checkpoint(argv: list[str], out: Path) -> None:
    """Start train.py, SIGKILL it once OUT/checkpoints/step_000002 exists."""
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *argv],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not (out / "checkpoints" / "step_000002").is_dir() and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"


@pytest.mark.parametrize(
    "teacher_arch, student", [("qwen3_moe", "qwen3"), pytest.param("mixtral", "layers", marks=SLOW)]
)
def test_moe_teacher_two_ranks_match_one_process_and_resume_exactly(
    assets, teacher_arch, student, tmp_path
):
    """MoE teachers: a Mixtral teacher with an MoE student of its layers 0 and 2 (router
    load-balancing loss on, weight 0.01), and a Qwen3-MoE teacher with a dense Qwen3 student.
    2 ranks (2 examples each) equal 1 process (2 micro-batches of 2: the same micro-batches, so
    the per-micro-batch load-balancing terms are the same); SIGKILL after step 2, then resume:
    bitwise the uninterrupted run."""
    teacher = make_tiny_checkpoint(
        tmp_path / "teacher", teacher_arch, vocab_size=TINY_VOCAB_SIZE, num_hidden_layers=4
    )
    make_tiny_tokenizer(teacher)
    base = [a for a in BASE if not a.startswith(("--max_steps", "--student_layers"))]
    picked = ["--student_layers=0,2"]
    if student != "layers":
        dense = make_tiny_checkpoint(tmp_path / "student", student, vocab_size=TINY_VOCAB_SIZE)
        picked = [f"--student={dense}"]
    common = [f"--teacher={teacher}", f"--data={assets['data']}", *base, *picked]
    common += ["--max_steps=6", "--router_aux_loss_coef=0.01", "--save_every=2"]

    def argv(out: Path, *extra: str) -> list[str]:
        return [*common, f"--out={out}", *extra]

    one = argv(tmp_path / "one", "--batch_size=2", "--grad_accum=2")
    run(one)
    run(argv(tmp_path / "two", "--batch_size=2", "--grad_accum=1"), nproc=2)
    diff = max(abs(a - b) for a, b in zip(losses(tmp_path / "two"), losses(tmp_path / "one")))
    # fp32, as test_two_ranks_and_micro_batches_match_one_process (6 steps here).
    assert diff < 1e-4, f"{teacher_arch}: 2 ranks' losses differ from 1 process by {diff:.2e}"
    assert max_weight_diff(tmp_path / "two", tmp_path / "one") < 1e-4
    records = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").open()]
    logged = [r for r in records if "loss" in r]
    if student == "layers":  # an MoE student logs its router
        loads = [v for k, v in logged[-1].items() if k.startswith("expert_load/")]
        assert len(loads) == 4 and abs(sum(loads) - 1.0) < 1e-5 and logged[-1]["router_aux"] > 0
    else:
        assert "router_aux" not in logged[-1]
    killed = argv(tmp_path / "killed", "--batch_size=2", "--grad_accum=2")
    kill_after_first_checkpoint(killed, tmp_path / "killed")
    run([*killed, "--resume=true"])
    diff = max_weight_diff(tmp_path / "killed", tmp_path / "one")
    assert diff == 0.0, f"{teacher_arch}: the resumed run differs by {diff} from the uninterrupted"


def test_kd_beats_sft_on_held_out_kl(assets):
    """A peaky teacher (head x 4) and a 1-layer student of half the width; 16 steps each."""
    d = assets["dir"]
    teacher = make_tiny_checkpoint(
        d / "peaky", "llama", vocab_size=TINY_VOCAB_SIZE, tie_word_embeddings=False
    )
    weights = load_file(teacher / "model.safetensors")
    weights["lm_head.weight"] *= 4.0  # confident predictions: a teacher worth distilling
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    make_tiny_tokenizer(teacher)
    student = make_tiny_checkpoint(
        d / "small",
        "llama",
        vocab_size=TINY_VOCAB_SIZE,
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        seed=1,
    )
    kl = {}
    for loss in ("forward_kl", "sft"):
        out = d / f"peaky_{loss}"
        run(
            [
                f"--teacher={teacher}",
                f"--student={student}",
                f"--data={assets['data']}",
                f"--out={out}",
                f"--eval_data={assets['eval']}",
                f"--loss={loss}",
                "--alpha=1.0",
                "--max_steps=16",
                "--lr=1e-2",
                "--warmup_steps=2",
                "--batch_size=8",
                "--seq_len=48",
                "--precision=fp32",
                "--log_every=8",
                "--eval_every=8",
            ]
        )
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        kl[loss] = [r["eval_kl"] for r in records if "eval_kl" in r]  # steps 0, 8, 16
    # Measured: KD 0.212 -> 0.187, SFT 0.212 -> 0.863 (fitting the data pulls away from the
    # teacher).
    assert kl["forward_kl"][-1] < kl["forward_kl"][0], (
        f"KD must lower the held-out KL: {kl['forward_kl']}"
    )
    assert kl["forward_kl"][-1] < 0.5 * kl["sft"][-1], (
        f"held-out KL to the teacher: KD {kl['forward_kl']}, SFT {kl['sft']}"
    )


@SLOW
def test_multi_teacher_two_stage_and_response_distillation(assets, baseline):
    d = assets["dir"]
    second = make_tiny_checkpoint(
        d / "teacher2", "llama", vocab_size=TINY_VOCAB_SIZE, num_hidden_layers=4, seed=3
    )
    make_tiny_tokenizer(second)
    # Response distillation: the teacher answers the prompts; stage 2 fine-tunes on its answers.
    prompts = write_jsonl(
        d / "prompts.jsonl", [{"prompt": p} for p in ("The river", "A teacher model", "In 1969")]
    )
    responses = d / "responses.jsonl"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "generate.py"),
            f"--model={assets['teacher']}",
            f"--prompts-file={prompts}",
            f"--output={responses}",
            "--max-new-tokens=8",
            "--chat",
        ],
        env=ENV,
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert all("response" in json.loads(line) for line in responses.read_text().splitlines())
    out = d / "stage2"
    run(
        [
            f"--teacher={assets['teacher']},{second}",
            "--teacher_weights=0.7,0.3",
            "--student_layers=0,2",
            f"--init_from={baseline / 'final'}",
            f"--data={responses}",
            f"--out={out}",
            "--loss=jsd",
            "--max_steps=2",
            "--batch_size=2",
            "--seq_len=48",
            "--precision=fp32",
            "--log_every=1",
        ]
    )
    assert len(losses(out)) == 2 and (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "method, extra",
    [("gkd", ["--loss=jsd", "--alpha=1.0", "--lmbda=0.5"]), ("minillm", ["--lm_data={eval}"])],
    ids=["gkd", "minillm"],
)
def test_on_policy_methods_run_on_two_ranks(assets, method, extra):
    """GKD and MiniLLM through train.py: 2 gloo ranks sample answers (rows end at different
    steps), stay in step (the all-reduced done flag, parallel.all_ranks) and log the rollout
    metrics; MiniLLM adds its LM loss on lm_data."""
    out = assets["dir"] / f"onpolicy_{method}"
    run(
        args(
            assets,
            out,
            f"--method={method}",
            "--max_new_tokens=8",
            "--batch_size=2",
            "--max_steps=4",
            *(e.format(eval=assets["eval"]) for e in extra),
        ),
        nproc=2,
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # Every record has the metrics; a GKD step whose coins all came up "data" logs zeros.
    assert all(
        0 <= r["response_length"] <= 8 and 0.0 <= r["on_policy_fraction"] <= 1.0 for r in records
    )
    assert all(math.isfinite(r["loss"]) and 0.0 <= r["repetition"] <= 1.0 for r in records)
    sampled = [r for r in records if r["on_policy_fraction"] > 0]
    assert sampled and all(r["response_length"] >= 1 for r in sampled), records
    if method == "minillm":
        assert all(r["on_policy_fraction"] == 1.0 for r in records)
    assert (out / "final" / "model.safetensors").is_file()


@SLOW
def test_on_policy_resume_is_exact(assets):
    """Rollouts are seeded by (seed, step, micro-batch, rank): a MiniLLM run stopped after a
    checkpoint and resumed samples the same answers and ends bitwise equal."""
    extra = [
        "--method=minillm",
        f"--lm_data={assets['eval']}",
        "--max_new_tokens=8",
        "--batch_size=2",
        "--max_steps=4",
    ]
    whole, parts = assets["dir"] / "onpolicy_whole", assets["dir"] / "onpolicy_parts"
    run(args(assets, whole, *extra))
    run(args(assets, parts, *extra, "--save_every=2", "--keep_checkpoints=2"))
    shutil.rmtree(parts / "final")
    for later in sorted((parts / "checkpoints").iterdir())[1:]:  # step 4: rewind to step 2
        shutil.rmtree(later)
    run(args(assets, parts, *extra, "--save_every=2", "--resume=true"))
    diff = max_weight_diff(parts, whole)
    assert diff == 0.0, (
        f"resumed on-policy run must equal the uninterrupted one bit for bit; max |diff| {diff}"
    )
