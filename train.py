"""Distill a teacher LLM into a smaller student: the training loop, top to bottom.

    python train.py --config configs/smollm2_kd.toml                   # one process, CPU or GPU
    torchrun --nproc_per_node=8 train.py --config configs/llama3_8b_to_1b.toml
    python train.py --help                                             # every setting

`main(cfg)` reads in order: init -> data -> student and teacher(s) on the meta device, FSDP2
shards, weights -> the method -> optimizer -> resume -> loop -> export. The method, chosen
once from the config (kd/training.py's `build_method`), says what a step trains on and its
loss: KD or SFT on the data (kd/offpolicy.py, also from a teacher cache), GKD (kd/gkd.py) or
MiniLLM (kd/minillm.py). The loop never asks which. One optimizer step:
  1. `method.micro_batches(step)`: this rank's micro-batches, each carrying N, the valid
     (label != -100) tokens of the whole step, all micro-batches and ranks.
  2. Per micro-batch, `method.loss`: the frozen teacher's forward, then the student's, which
     computes inside it (output_fn) the chunked loss
         sum_valid [alpha T^2 D(p_teacher || q_student) + (1 - alpha) CE] / N
     without ever materializing the (tokens x vocab) logits; then backward. Gradients are
     reduce-scattered after the last micro-batch only, and FSDP sums them instead of
     averaging, so the update is the gradient of the global per-token mean: the same for any
     split into ranks and micro-batches (tests/test_train.py).
  3. Clip the global gradient norm, AdamW step; learning rate = linear warmup + cosine.
The methods: logit KD with any divergence (loss=...), SFT (loss=sft), response distillation
(SFT or KD on teacher-written data from generate.py), multi-teacher (several `teacher`s),
two-stage (stage 2 `init_from` stage 1's OUT/final), KD from a top-k teacher cache
(teacher_cache, scripts/cache_teacher.py), on-policy GKD and MiniLLM (method=gkd|minillm:
each step first samples the student's own answers). See configs/.

Outputs in `out`: train_config.toml (resolved settings), metrics.jsonl (per log step and
eval; scripts/plot_metrics.py draws it), checkpoints/step_N/ (every `save_every` steps and on
SIGTERM; `resume=true` continues exactly), final/ (the student, HF; to export step N:
--resume=true --max_steps=N). dtypes: master weights and AdamW state fp32; compute and
teacher in `precision` (auto: bf16 or fp32, whichever this device runs faster); gradients
reduced and every loss computed in fp32.
"""

import math
import os
import signal
import sys
import threading
from dataclasses import asdict, replace
from pathlib import Path

import torch

from kd import checkpoint, hf, parallel, training
from kd.config import TrainConfig, help_text, load_config
from kd.data import load_examples
from kd.metrics import teacher_forced_metrics
from kd.optim import build_optimizer, lr_at
from kd.runlog import (
    Meter,
    format_step,
    gpu_peak_flops,
    log_record,
    peak_memory_gb,
    step_values,
    trim_metrics,
)
from kd.training import Run

# Set by SIGTERM: checkpoint at the next step boundary, then exit.
stop_requested = threading.Event()


class NonFiniteLoss(Exception):
    """The loss or gradient norm became NaN/inf: the run stops, its last checkpoint stays."""


# ----------------------------------------------------------------------------- main


def main(cfg: TrainConfig) -> None:
    # --- init: one process per GPU (or CPU process); a plain `python train.py` is a world of 1.
    world = parallel.init_distributed()
    say = print if world.is_main else lambda *args, **kwargs: None  # rank 0 speaks for all
    cfg = replace(cfg, precision=parallel.resolve_precision(cfg.precision, world.device))
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    if not cfg.resume and checkpoint.complete_checkpoints(out):
        raise ValueError(
            f"{out} already holds checkpoints; pass --resume=true to continue that run, "
            "or choose another --out"
        )
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.toml").write_text(cfg.to_toml())
    say(f"world: {world.world_size} process(es) on {world.device}\n{cfg.to_toml()}", end="")

    # --- build the data: one tokenizer for every model; each rank's slice of every step.
    tokenizer = training.check_tokenizer(cfg)
    streams = training.training_data(cfg, tokenizer, world, log=say)
    eval_examples = None
    if cfg.eval_data:
        eval_examples = load_examples(cfg.eval_data, tokenizer, seq_len=cfg.seq_len)[0]

    # --- build the student and teacher(s): meta device -> FSDP2 shards -> weights from rank 0.
    student, teachers, vocab = training.build_models(cfg, world, tokenizer)
    sizes = ", ".join(f"{t.num_params() / 1e6:.1f}M" for t in teachers)
    say(f"student: {student.num_params() / 1e6:.1f}M parameters, teacher(s): {sizes}")

    # --- build the method: what each step trains on, and the loss of one micro-batch.
    method = training.build_method(cfg, streams, student, teachers, vocab, tokenizer, world)

    # --- build the optimizer; the LR is a pure function of the step (nothing to checkpoint).
    scaler = parallel.grad_scaler(cfg.precision, world.device)
    optimizer = build_optimizer(
        student, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=scaler is None
    )
    run = Run(
        cfg=cfg,
        world=world,
        tokenizer=tokenizer,
        streams=streams,
        eval_examples=eval_examples,
        student=student,
        teachers=teachers,
        vocab=vocab,
        method=method,
        optimizer=optimizer,
        scaler=scaler,
    )

    # --- resume: model, optimizer, RNG, step (= data position), grad scaler; then train.
    step = resume(run) if cfg.resume else 0
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.set())
    if train(run, step):
        # --- export the student as an HF directory (transformers and generate.py load it).
        state_dict = parallel.full_state_dict(student)  # all ranks take part; rank 0 gets it
        if world.is_main:
            hf.save_state_dict(
                state_dict, student.config, out / "final", tokenizer_from=cfg.teacher[0]
            )
        say(f"exported the student to {out / 'final'}")
    parallel.barrier()


def resume(run: Run) -> int:
    """Load the newest complete checkpoint into the run; its step (= the data position)."""
    path = checkpoint.latest_checkpoint(run.out)
    meta = checkpoint.load_checkpoint(
        path, model=run.student, optimizer=run.optimizer, world=run.world
    )
    for name, stream in run.streams.items():  # refuses other data, seed or global batch
        stream.load_state_dict(meta.get(name) or {})
    if run.scaler is not None:
        run.scaler.load_state_dict(meta["scaler"])
    trim_metrics(run.out, meta["step"], run.world)
    run.say(f"resumed from {path} at step {meta['step']}")
    return meta["step"]


def save(run: Run, step: int) -> Path:
    """Checkpoint the run at `step` (atomically; all ranks call this)."""
    meta = {name: stream.state_dict() for name, stream in run.streams.items()}
    meta |= {"scaler": run.scaler.state_dict() if run.scaler else None, "config": asdict(run.cfg)}
    return checkpoint.save_checkpoint(
        run.out,
        step=step,
        model=run.student,
        optimizer=run.optimizer,
        meta=meta,
        world=run.world,
        keep=run.cfg.keep_checkpoints,
    )


def evaluate(run: Run, step: int) -> None:
    """Held-out KL(teacher || student), perplexity and top-1 agreement, on every rank."""
    cfg, world = run.cfg, run.world
    metrics = teacher_forced_metrics(
        run.student,
        run.eval_examples,
        teacher=run.teachers[0],
        pad_id=run.tokenizer.pad_id,
        batch_size=cfg.batch_size,
        vocab=run.vocab,
        max_batches=cfg.eval_batches,
        rank=world.rank,
        world_size=world.world_size,
        all_reduce_sum=parallel.all_reduce_sum,
        device=world.device,
    )
    log_record(run.out, {"step": step, **{f"eval_{k}": v for k, v in metrics.items()}}, world)
    run.say(
        f"eval step {step}: kl {metrics['kl']:.4f} | ppl {metrics['ppl']:.3f} | "
        f"top1 {metrics['top1_agreement']:.3f}"
    )


# ----------------------------------------------------------------------------- the loop


def train(run: Run, step: int) -> bool:
    """Optimizer steps from `step` to max_steps; False if a SIGTERM stopped the run first."""
    cfg = run.cfg
    if run.eval_examples and cfg.eval_every and step == 0:
        evaluate(run, step)
    meter = Meter(step, cfg.max_steps)
    while step < cfg.max_steps:
        if parallel.agree([float(stop_requested.is_set())])[0]:  # a SIGTERM on any rank
            done = (checkpoint.checkpoint_root(run.out) / f"step_{step:06d}").exists()
            saved = "already saved" if done else save(run, step)
            run.say(
                f"SIGTERM: stopped at step {step}; checkpoint {saved}; continue with --resume=true"
            )
            return False
        micro_batches = run.method.micro_batches(step)  # each with the step's token count
        step += 1
        lr = lr_at(
            step,
            lr=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            max_steps=cfg.max_steps,
            min_lr=cfg.min_lr,
        )
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        sums, grad_norm = training.train_step(
            run.student,
            run.method,
            micro_batches,
            optimizer=run.optimizer,
            scaler=run.scaler,
            grad_clip=cfg.grad_clip,
        )
        meter.add(sum(b["input_ids"].numel() for b in micro_batches))

        # --- log, check, evaluate, save. Reading values back is a device sync: these steps only.
        save_now = cfg.save_every > 0 and step % cfg.save_every == 0
        last = step == cfg.max_steps
        eval_now = run.eval_examples is not None and (
            (cfg.eval_every and step % cfg.eval_every == 0) or last
        )
        if step % cfg.log_every == 0 or save_now or eval_now or last:
            log_step(run, step, sums, grad_norm, lr=lr, meter=meter)
        if eval_now:
            evaluate(run, step)
        if save_now:
            save(run, step)
        if eval_now or save_now:
            meter.skip()  # tokens/s measures training only
    return True


def log_step(
    run: Run, step: int, sums: dict, grad_norm: torch.Tensor, *, lr: float, meter: Meter
) -> None:
    """One record in metrics.jsonl and one console line; stops a run whose loss or gradient
    norm is not finite (its last checkpoint stays the last good one)."""
    record = {"step": step, "epochs": run.streams["data"].epochs(step), **step_values(sums)}
    record |= {"lr": lr, "grad_norm": grad_norm.item()}
    norm_checked = run.scaler is None  # with fp16 loss scaling an inf norm skips the step
    if not math.isfinite(record["loss"]) or (
        norm_checked and not math.isfinite(record["grad_norm"])
    ):
        kept = checkpoint.complete_checkpoints(run.out)
        raise NonFiniteLoss(
            f"loss {record['loss']:.4g}, grad norm {record['grad_norm']:.4g} at step {step}: "
            f"not finite; stopped without saving; last good checkpoint: "
            f"{kept[-1] if kept else 'none'} (lower lr or check the data, then --resume=true)"
        )
    speed = meter.read(step)
    record |= {
        "tokens_per_s": speed["tokens_per_s"],
        "peak_mem_gb": peak_memory_gb(run.world.device),
        "eta_s": speed["eta_s"],
    }
    extra = run.method.log_fields()  # the method's own numbers, e.g. on-policy lengths
    record |= extra
    peak_flops = gpu_peak_flops(run.world.device)
    if peak_flops:
        flops = training.flops_per_token(run.method.teachers, run.student, seq_len=run.cfg.seq_len)
        record["mfu"] = flops * record["tokens_per_s"] / (peak_flops * run.world.world_size)
    log_record(run.out, record, run.world)
    run.say(format_step(record, run.cfg.max_steps, list(extra)))


def cli(argv: list[str]) -> int:
    """Entry point: user errors become one `error: ...` line on stderr and exit status 1."""
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return 0
    try:
        main(load_config(argv))
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    finally:
        parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
