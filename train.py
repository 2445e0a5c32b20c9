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

`out` belongs to one run (locked; kd/rundir.py): train_config.toml, metrics.jsonl (per log
step and eval), checkpoints/step_N/ (every `save_every` steps, at the last step, on SIGTERM
and Ctrl-C; `resume=true` continues exactly, and only the same run), final/ (the student,
HF). dtypes: master weights and AdamW state fp32; compute and teacher in `precision` (auto:
bf16 or fp32, whichever this device runs faster); gradients reduced and losses in fp32.
"""

import math
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

import torch

from kd import checkpoint, parallel, rundir, training
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
    # OUT is this run's: locked (on rank 0, released at exit) and refused if it holds another.
    parallel.run_on_rank0(lambda: rundir.claim(out, resume=cfg.resume, overwrite=cfg.overwrite))
    say(f"world: {world.world_size} process(es) on {world.device}\n{cfg.to_toml()}", end="")

    # --- build the data: one tokenizer for every model; each rank's slice of every step.
    tokenizer = training.check_tokenizer(cfg)
    streams = training.training_data(cfg, tokenizer, world, log=say)
    eval_examples = None
    if cfg.eval_data:
        eval_examples = load_examples(cfg.eval_data, tokenizer, seq_len=cfg.seq_len)[0]

    # --- build the student and teacher(s): meta device -> FSDP2 shards -> weights from rank 0.
    student, teachers, vocab = training.build_models(cfg, world, tokenizer)
    sizes = ", ".join(f"{t.num_params() / 1e6:.1f}M" for t in teachers) or cfg.teacher_cache
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
        identity=parallel.run_on_rank0(lambda: rundir.identity(cfg, student.config)),
    )

    # --- resume (only this run's checkpoints); then the settings go on record, and train.
    step = rundir.resume(run) if cfg.resume else 0
    if world.is_main:
        (out / "train_config.toml").write_text(cfg.to_toml())
    step = train(run, step)
    if step is not None:  # not stopped early: checkpoint the last step, export the student
        say(f"exported the student to {rundir.export(run, step)}")
    parallel.barrier()


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


def train(run: Run, step: int) -> int | None:
    """Optimizer steps from `step` to max_steps: the last step, or None if a SIGTERM or Ctrl-C
    stopped the run first (with a checkpoint). fp16 steps whose gradients overflow are skipped
    by the loss scaler: counted, and a run that skipped them all fails."""
    cfg = run.cfg
    if run.eval_examples and cfg.eval_every and step == 0:
        evaluate(run, step)
    meter, skipped, first = Meter(step, cfg.max_steps), 0, step
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while step < cfg.max_steps:
        if parallel.agree([float(stop_requested.is_set())])[0]:  # a signal on any rank
            done = (checkpoint.checkpoint_root(run.out) / f"step_{step:06d}").exists()
            saved = "already saved" if done else rundir.save(run, step)
            run.say(f"stopped at step {step}; checkpoint {saved}; continue with --resume=true")
            return None
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
        sums, grad_norm, was_skipped = training.train_step(
            run.student,
            run.method,
            micro_batches,
            optimizer=run.optimizer,
            scaler=run.scaler,
            grad_clip=cfg.grad_clip,
        )
        meter.add(sum(b["input_ids"].numel() for b in micro_batches))
        skipped += was_skipped

        # --- log, check, evaluate, save. Reading values back is a device sync: these steps only.
        save_now = cfg.save_every > 0 and step % cfg.save_every == 0
        last = step == cfg.max_steps
        eval_now = run.eval_examples is not None and (
            (cfg.eval_every and step % cfg.eval_every == 0) or last
        )
        if step % cfg.log_every == 0 or save_now or eval_now or last:
            log_step(run, step, sums, grad_norm, lr=lr, meter=meter, skipped=skipped)
        if eval_now:
            evaluate(run, step)
        if save_now:
            rundir.save(run, step)
        if eval_now or save_now:
            meter.skip()  # tokens/s measures training only
    if skipped:
        run.say(f"{skipped} of {step - first} steps were skipped: fp16 gradients overflowed")
        if skipped == step - first:
            raise NonFiniteLoss(
                "every step was skipped (fp16 overflow): the student did not "
                "train; use bf16, or a lower lr"
            )
    return step


def on_signal(signum: int, frame: object) -> None:
    """SIGTERM and Ctrl-C: checkpoint at the next step boundary, then exit. A second Ctrl-C
    exits at once (the steps since the last checkpoint are lost)."""
    if signum == signal.SIGINT and stop_requested.is_set():
        raise KeyboardInterrupt
    stop_requested.set()
    if signum == signal.SIGINT:
        print(
            "Ctrl-C: stopping at the next step, with a checkpoint (Ctrl-C again: at once)",
            file=sys.stderr,
        )


def log_step(
    run: Run,
    step: int,
    sums: dict,
    grad_norm: torch.Tensor,
    *,
    lr: float,
    meter: Meter,
    skipped: int,
) -> None:
    """One record in metrics.jsonl and one console line; stops a run whose loss or gradient
    norm is not finite (its last checkpoint stays the last good one)."""
    record = {"step": step, "epochs": run.streams["data"].epochs(step), **step_values(sums)}
    record |= {"lr": lr, "grad_norm": grad_norm.item()}
    if run.scaler is not None:
        record["skipped_steps"] = skipped
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


def describe(e: Exception) -> str:
    """A user-facing error as one line; an OS error names its file and what to check."""
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.strerror:
        return f"{e.filename or ''}: {e.strerror}; check that it is writable and has free space"
    return " ".join(str(e).split())


def cli(argv: list[str]) -> int:
    """Entry point: user errors become one `error: ...` line on stderr and exit status 1."""
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return 0
    try:
        main(load_config(argv))
    except (ValueError, OSError, NonFiniteLoss) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {describe(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; the last checkpoint is kept (--resume=true)", file=sys.stderr)
        return 130
    finally:
        rundir.release_all()
        parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
