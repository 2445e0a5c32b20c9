"""Distill a teacher LLM into a smaller student: the whole training loop, top to bottom.

    python train.py --config configs/smollm2_kd.toml                   # one process, CPU or GPU
    torchrun --nproc_per_node=8 train.py --config configs/llama3_8b_to_1b.toml
    python train.py --help                                             # every setting

`main(cfg)` reads in order: init -> data -> student and teacher(s) on the meta device ->
shard (FSDP2, kd/parallel.py) -> load weights -> optimizer and LR -> resume -> loop -> export.
One optimizer step:
  1. Each rank counts the valid (label != -100) tokens of its micro-batches; one all-reduce
     gives the global count N (and tells every rank whether a SIGTERM arrived anywhere).
  2. Per micro-batch: the frozen teacher's forward gives its final hidden states; the
     student's forward computes, inside it (output_fn), the chunked loss
         sum_valid [alpha T^2 D(p_teacher || q_student) + (1 - alpha) CE] / N
     without ever materializing the (tokens x vocab) logits; then backward. Gradients are
     reduce-scattered after the last micro-batch only, and FSDP sums them instead of
     averaging, so the update is the gradient of the global per-token mean: the same for any
     split into ranks and micro-batches (tests/test_train.py).
  3. Clip the global gradient norm, AdamW step, learning rate = linear warmup + cosine.
Methods, all this one loop: logit KD with any divergence (loss=...), SFT (loss=sft), response
distillation (SFT or KD on teacher-written data from generate.py), multi-teacher (several
`teacher`s), two-stage (stage 2 `init_from` stage 1's OUT/final), and on-policy GKD and MiniLLM
(method=gkd|minillm: each step first samples the student's own answers, kd/onpolicy.py). See configs/.

Outputs in `out`: train_config.toml (resolved settings), metrics.jsonl (per log step and eval;
scripts/plot_metrics.py draws it), checkpoints/step_N/ (every `save_every` steps and on SIGTERM;
`resume=true` continues exactly), final/ (the student, HF; export step N: --resume=true --max_steps=N).
dtypes: master weights and AdamW state fp32; compute and teacher in `precision` (auto: bf16 or
fp32, whichever this device runs faster); gradients reduced and every loss computed in fp32.
"""

import datetime
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from kd import checkpoint, hf, onpolicy, parallel
from kd.chunked_loss import chunked_distillation_loss
from kd.config import TrainConfig, help_text, load_config
from kd.data import IGNORE, Batches, load_examples
from kd.losses import LossOptions, TopK
from kd.metrics import teacher_forced_metrics
from kd.model import ModelConfig, Transformer
from kd.optim import build_optimizer, lr_at
from kd.parallel import DTYPES, World
from kd.student import layer_subset_config, layer_subset_state_dict
from kd.teacher_cache import TeacherCache
from kd.tokenizer import Tokenizer, load_tokenizer

# Dense bf16 tensor-core peak per GPU, for MFU (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
# Config fields that only label a checkpoint; all others fix parameter shapes or the math.
NON_ARCHITECTURE_KEYS = {
    "torch_dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "max_position_embeddings",
}

stop_requested = (
    threading.Event()
)  # set by SIGTERM: checkpoint at the next step boundary, then exit


class NonFiniteLoss(Exception):
    """The loss or gradient norm became NaN/inf: the run stops, its last checkpoint stays."""


# ----------------------------------------------------------------------------- models


def build_on_meta(config: ModelConfig, dtype: torch.dtype) -> Transformer:
    """The module tree without memory: shapes only, real tensors come after sharding."""
    with torch.device("meta"):
        return Transformer(config).to(dtype)


def matmul_params(model: Transformer) -> int:
    """Parameters that take part in matmuls: all but the input embedding (a lookup) unless tied."""
    n = sum(p.numel() for p in model.parameters())
    return n if model.config.tie_word_embeddings else n - model.model.embed_tokens.weight.numel()


def forward_flops_per_token(model: Transformer, *, seq_len: int) -> float:
    """Forward FLOPs per token: 2 per matmul parameter, plus attention's q k^T and a v,
    2 * 2 * seq_len * (heads * head_dim) per layer (counted non-causal, as PaLM, arXiv 2204.02311)."""
    c = model.config
    return (
        2 * matmul_params(model)
        + 4 * c.num_hidden_layers * seq_len * c.num_attention_heads * c.head_dim
    )


def flops_per_token(teachers: list[Transformer], student: Transformer, *, seq_len: int) -> float:
    """Model FLOPs per trained token: teacher forwards, plus the student's forward and backward (x3)."""
    return sum(
        forward_flops_per_token(t, seq_len=seq_len) for t in teachers
    ) + 3 * forward_flops_per_token(student, seq_len=seq_len)


def check_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """The teacher's tokenizer; every other model directory that ships one must map text identically."""
    tokenizer = load_tokenizer(cfg.teacher[0])
    for other in (*cfg.teacher[1:], cfg.student, cfg.init_from):
        if other and (other in cfg.teacher or (Path(other) / "tokenizer.json").is_file()):
            if load_tokenizer(other).fingerprint() != tokenizer.fingerprint():
                raise ValueError(
                    f"the tokenizer of {other} differs from the teacher's ({cfg.teacher[0]}); "
                    "token-level distillation needs one tokenizer for all models"
                )
    return tokenizer


def student_config(cfg: TrainConfig, teacher_config: ModelConfig) -> ModelConfig:
    """From `student`'s config.json, or the teacher's with only `student_layers`; `init_from` must match it."""
    config = (
        hf.load_config(cfg.student)
        if cfg.student
        else layer_subset_config(teacher_config, list(cfg.student_layers))
    )
    if cfg.init_from:
        init = asdict(hf.load_config(cfg.init_from))
        for key, value in asdict(config).items():
            if key not in NON_ARCHITECTURE_KEYS and init[key] != value:
                raise ValueError(
                    f"init_from={cfg.init_from} has {key}={init[key]} but the student has {value}; "
                    "init_from must be an export of this student (same student/student_layers)"
                )
    return config


def student_weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The student's initial fp32 weights (read on rank 0 only)."""
    if cfg.init_from or cfg.student:
        return hf.load_state_dict(cfg.init_from or cfg.student, dtype=torch.float32)
    return layer_subset_state_dict(
        hf.load_state_dict(cfg.teacher[0], dtype=torch.float32), list(cfg.student_layers)
    )


def common_vocab(
    cfg: TrainConfig, teachers: list[ModelConfig], student: ModelConfig, tokenizer: Tokenizer
) -> int:
    """The vocabulary rows the loss compares: all models' if equal, else the shared prefix.

    Different vocab sizes are fine only as padding: e.g. Qwen2.5-7B has 152064 rows, 1.5B has
    151936, both for a 151665-token tokenizer; rows past the tokenizer are never real tokens.
    """
    sizes = [student.vocab_size, *(t.vocab_size for t in teachers)]
    if tokenizer.vocab_size > min(sizes):
        raise ValueError(
            f"the tokenizer of {cfg.teacher[0]} has {tokenizer.vocab_size} tokens but a model has "
            f"vocab_size {min(sizes)}: the vocabularies differ beyond padding; distill between "
            "models of one tokenizer"
        )
    return min(sizes)


def build_models(
    cfg: TrainConfig, world: World, tokenizer: Tokenizer
) -> tuple[Transformer, list[Transformer], int]:
    """(student, teachers, vocab rows the loss compares), sharded and loaded on every rank."""
    # On the meta device: configs and shapes, no memory yet.
    teacher_configs = [hf.load_config(path) for path in cfg.teacher]
    s_config = student_config(cfg, teacher_configs[0])
    vocab = common_vocab(cfg, teacher_configs, s_config, tokenizer)
    compute_dtype = DTYPES[cfg.precision]
    teachers = (
        [] if cfg.teacher_cache else [build_on_meta(c, compute_dtype) for c in teacher_configs]
    )  # cache: none
    student = build_on_meta(s_config, torch.float32)  # fp32 master weights

    # Shard: FSDP2 per block, then the root; allocate only this rank's shards.
    parallel.shard_student(
        student,
        precision=cfg.precision,
        activation_checkpointing=cfg.activation_checkpointing,
        compile=cfg.compile,
    )
    for t in teachers:
        parallel.shard_teacher(t, compile=cfg.compile)
    for model in (student, *teachers):
        model.to_empty(device=world.device)

    # Load: rank 0 reads each checkpoint (keys and shapes checked), every rank receives its shards.
    for t, path in zip(teachers, cfg.teacher):
        parallel.load_full_state_dict(
            t,
            parallel.run_on_rank0(
                lambda: hf.check_state_dict(
                    hf.load_state_dict(path, dtype=compute_dtype),
                    build_on_meta(t.config, compute_dtype),
                    path,
                )
            ),
        )
    parallel.load_full_state_dict(
        student,
        parallel.run_on_rank0(
            lambda: hf.check_state_dict(
                student_weights(cfg),
                build_on_meta(s_config, torch.float32),
                cfg.init_from or cfg.student or cfg.teacher[0],
            )
        ),
    )
    return student, teachers, vocab


# ----------------------------------------------------------------------------- the step


def forward_loss(
    student: Transformer,
    teachers: list[Transformer],
    batch: dict[str, torch.Tensor],
    *,
    num_tokens: int,
    vocab: int,
    cfg: TrainConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the step's loss: its valid-token sum divided by the global N."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    t_hidden = t_head = teacher_logits = None
    if (
        "teacher_ids" in batch
    ):  # teacher_cache: the teacher's top-k log-probs at T, read with the batch
        teacher_logits = TopK(ids=batch["teacher_ids"], logprobs=batch["teacher_logprobs"])
    elif cfg.loss != "sft":  # SFT (alpha = 0) needs no teacher forward at all
        with torch.no_grad():
            t_hidden = [
                t(input_ids, output_fn=lambda h, w: h) for t in teachers
            ]  # (B, T, H_t) each
        t_head = [t.head_weight for t in teachers]  # replicated (V_t, H_t): see kd/parallel.py
        if len(teachers) == 1:
            t_hidden, t_head = t_hidden[0], t_head[0]

    options = LossOptions(
        divergence="forward_kl" if cfg.loss == "sft" else cfg.loss,
        temperature=cfg.temperature,
        alpha=0.0 if cfg.loss == "sft" else cfg.alpha,
        beta=cfg.beta,
        skew_alpha=cfg.skew_alpha,
        teacher_weights=cfg.teacher_weights or None,
        teacher_mixture=cfg.teacher_mixture,
        tokenizer_vocab_size=vocab,
    )

    def loss_fn(
        hidden: torch.Tensor, head_weight: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Runs inside the student's root forward: FSDP2 has gathered the (compute-dtype) head
        # weight, and the gradient of the loss reaches it and `hidden` through autograd.
        return chunked_distillation_loss(
            hidden,
            head_weight[:vocab],
            t_hidden,
            t_head,
            labels,
            options,
            teacher_logits=teacher_logits,
            chunk_size=cfg.chunk_size,
            num_tokens=num_tokens,
        )

    return student(input_ids, output_fn=loss_fn)


def train_step(
    student: Transformer,
    teachers: list[Transformer],
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    num_tokens: int,
    vocab: int,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    lm_batches: list[dict[str, torch.Tensor]] | None = None,
    lm_tokens: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches. Returns, as device tensors (no sync),
    this rank's (loss, divergence sum, CE sum) and the global gradient norm before clipping.
    MiniLLM: micro_batches are rollouts (kd/onpolicy.py's loss); lm_batches (lm_data) add lm_loss_weight
    times the ordinary loss over their lm_tokens; the divergence and CE sums count rollouts only."""
    device = student.model.embed_tokens.weight.device
    sums = torch.zeros(3, device=device)
    work = [(batch, num_tokens, False) for batch in micro_batches] + [
        (b, lm_tokens, True) for b in lm_batches or []
    ]
    for i, (batch, tokens, is_lm) in enumerate(work):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        # Reduce-scatter the gradients only after the last micro-batch; before, they accumulate locally.
        parallel.set_gradient_sync(student, i == len(work) - 1)
        if cfg.method == "minillm" and not is_lm:  # rollouts: PPO + exact token reverse KL
            loss, metrics = onpolicy.minillm_loss(
                student,
                teachers[0],
                batch,
                num_tokens=tokens,
                vocab=vocab,
                clip=cfg.ppo_clip,
                chunk_size=cfg.chunk_size,
            )
        else:
            loss, metrics = forward_loss(
                student, teachers, batch, num_tokens=tokens, vocab=vocab, cfg=cfg
            )
        loss = cfg.lm_loss_weight * loss if is_lm else loss
        (loss if scaler is None else scaler.scale(loss)).backward()
        n = 0.0 if is_lm else metrics["valid_tokens"]
        sums += torch.stack([loss.detach(), metrics["divergence"] * n, metrics["ce"] * n])
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = parallel.clip_grad_norm_(
        [p for p in student.parameters() if p.requires_grad], cfg.grad_clip
    )
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # skipped when the unscaled gradients hold inf/NaN
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm


@torch.no_grad()
def evaluate(
    student: Transformer,
    teacher: Transformer,
    examples: list,
    *,
    cfg: TrainConfig,
    vocab: int,
    pad_id: int,
    world: World,
) -> dict[str, float]:
    """Held-out token-level KL(teacher || student), student perplexity, top-1 agreement
    (kd/metrics.py), over at most cfg.eval_batches rounds of batch_size examples per rank.

    Rank r takes examples [r B, (r + 1) B) of each group of world_size * B. Every rank runs the
    same number of forwards (FSDP all-gathers need all of them): a rank with nothing left
    runs a batch with every label ignored. One all-reduce of the sums at the end.
    """
    return teacher_forced_metrics(
        student,
        examples,
        teacher=teacher,
        pad_id=pad_id,
        batch_size=cfg.batch_size,
        vocab=vocab,
        max_batches=cfg.eval_batches,
        rank=world.rank,
        world_size=world.world_size,
        all_reduce_sum=parallel.all_reduce_sum,
        device=world.device,
    )


# ----------------------------------------------------------------------------- logging


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )  # Linux: KiB -> GiB, this process


def gpu_peak_flops(device: torch.device) -> float | None:
    """This GPU's dense bf16 peak from PEAK_BF16_FLOPS; None on CPU or an unlisted GPU (no MFU then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def format_step(r: dict, max_steps: int) -> str:
    """The one console line of a log step; metrics.jsonl gets the same numbers as JSON."""
    parts = [
        f"step {r['step']}/{max_steps}",
        f"loss {r['loss']:.4f}"
        + (f" (div {r['divergence']:.4f}, ce {r['ce']:.4f})" if "divergence" in r else ""),
        f"lr {r['lr']:.2e}",
        f"grad {r['grad_norm']:.3f}",
        f"{r['tokens_per_s']:.0f} tok/s",
        f"mem {r['peak_mem_gb']:.2f} GB",
        f"eta {datetime.timedelta(seconds=round(r['eta_s']))}",
    ]
    if "response_length" in r:  # on-policy methods: watch length and repetition for reward hacking
        parts += [
            f"len {r['response_length']:.1f}",
            f"seq rkl {r['seq_reverse_kl']:.3f}",
            f"rep {r['repetition']:.2f}",
            f"on-policy {r['on_policy_fraction']:.2f}",
        ]
    return " | ".join(parts + ([f"mfu {r['mfu']:.1%}"] if "mfu" in r else []))


def log_record(out: Path, record: dict, world: World) -> None:
    """Append one JSON line to OUT/metrics.jsonl (rank 0)."""
    if world.is_main:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def trim_metrics(out: Path, step: int, world: World) -> None:
    """On resume, drop records of steps after the checkpoint: they will be logged again."""
    path = out / "metrics.jsonl"
    if world.is_main and path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))


# ----------------------------------------------------------------------------- main


def main(cfg: TrainConfig) -> None:
    # --- init: one process per GPU (or CPU process); a plain `python train.py` is a world of 1.
    world = parallel.init_distributed()
    say = print if world.is_main else lambda *args, **kwargs: None  # rank 0 speaks for all
    cfg = replace(
        cfg, precision=parallel.resolve_precision(cfg.precision, world.device)
    )  # auto -> bf16 | fp32
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

    # --- data: every rank tokenizes the same files; Batches gives each rank its slice of a step.
    tokenizer = check_tokenizer(cfg)
    pad_id = (
        tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id or 0
    )
    sources = []
    for path, weight in zip(cfg.data, cfg.data_weights or [1.0] * len(cfg.data)):
        if cfg.method == "offpolicy":
            examples, stats = load_examples(path, tokenizer, seq_len=cfg.seq_len)
        else:  # prompts; responses only where GKD trains on the data's own
            examples, stats = onpolicy.load_prompt_examples(
                path,
                tokenizer,
                method=cfg.method,
                seq_len=cfg.seq_len,
                max_new_tokens=cfg.max_new_tokens,
                needs_responses=cfg.method == "gkd" and cfg.lmbda < 1 and not cfg.seq_kd,
            )
        sources.append((examples, weight))
        say(stats)
    batches = Batches(
        sources,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        rank=world.rank,
        world_size=world.world_size,
        seed=cfg.seed,
        pad_id=pad_id,
    )
    eval_examples = (
        load_examples(cfg.eval_data, tokenizer, seq_len=cfg.seq_len)[0] if cfg.eval_data else None
    )
    # MiniLLM's language-modelling data: its own stream of batches, seeded apart from the prompts'.
    lm_batches = (
        Batches(
            [(load_examples(path, tokenizer, seq_len=cfg.seq_len)[0], 1.0) for path in cfg.lm_data],
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            rank=world.rank,
            world_size=world.world_size,
            seed=cfg.seed + 1,
            pad_id=pad_id,
        )
        if cfg.lm_data
        else None
    )
    cache = None
    if cfg.teacher_cache:  # refuses a cache made for another tokenizer, data file or seq_len
        cache = TeacherCache.open(
            cfg.teacher_cache,
            tokenizer=tokenizer,
            data_path=cfg.data[0],
            seq_len=cfg.seq_len,
            examples=sources[0][0],
        )

    # --- student and teacher(s): meta device -> FSDP2 shards -> weights from rank 0.
    student, teachers, vocab = build_models(cfg, world, tokenizer)
    if cache is not None and cache.spec.vocab_size != vocab:
        raise ValueError(
            f"{cfg.teacher_cache} was made by a teacher with {cache.spec.vocab_size} logits, the student has {vocab}"
        )
    rollout_config = onpolicy.RolloutConfig(
        max_new_tokens=cfg.max_new_tokens,
        eos_token_ids=frozenset(tokenizer.eos_token_ids),
        pad_id=pad_id,
        vocab_size=vocab,
        temperature=cfg.rollout_temperature,
        top_k=cfg.rollout_top_k,
        top_p=cfg.rollout_top_p,
    )
    flops = flops_per_token([] if cfg.loss == "sft" else teachers, student, seq_len=cfg.seq_len)
    say(
        f"student: {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters, "
        f"teacher(s): {', '.join(f'{sum(p.numel() for p in t.parameters()) / 1e6:.1f}M' for t in teachers)}"
    )

    # --- optimizer and LR schedule (a pure function of the step: nothing else to checkpoint).
    scaler = parallel.grad_scaler(cfg.precision, world.device)
    optimizer = build_optimizer(
        student, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=scaler is None
    )

    # --- resume: model, optimizer, RNG, step (= data position), grad scaler.
    step = 0
    if cfg.resume:
        path = checkpoint.latest_checkpoint(out)
        meta = checkpoint.load_checkpoint(path, model=student, optimizer=optimizer, world=world)
        batches.load_state_dict(meta["data"])
        if lm_batches:  # the same check for MiniLLM's lm_data stream
            lm_batches.load_state_dict(meta.get("lm_data") or {})
        if scaler is not None:
            scaler.load_state_dict(meta["scaler"])
        step = meta["step"]
        trim_metrics(out, step, world)
        say(f"resumed from {path} at step {step}")

    def save() -> Path:
        meta = {
            "data": batches.state_dict(),
            "lm_data": lm_batches.state_dict() if lm_batches else None,
            "scaler": scaler.state_dict() if scaler else None,
            "config": asdict(cfg),
        }
        return checkpoint.save_checkpoint(
            out,
            step=step,
            model=student,
            optimizer=optimizer,
            meta=meta,
            world=world,
            keep=cfg.keep_checkpoints,
        )

    def run_eval() -> None:
        metrics = evaluate(
            student, teachers[0], eval_examples, cfg=cfg, vocab=vocab, pad_id=pad_id, world=world
        )
        log_record(out, {"step": step, **{f"eval_{k}": v for k, v in metrics.items()}}, world)
        say(
            f"eval step {step}: kl {metrics['kl']:.4f} | ppl {metrics['ppl']:.3f} | "
            f"top1 {metrics['top1_agreement']:.3f}"
        )

    # --- the loop.
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.set())
    if eval_examples and cfg.eval_every and step == 0:
        run_eval()
    peak_flops = gpu_peak_flops(world.device)
    start_step, tokens_since_log, t_start = step, 0.0, time.perf_counter()
    t_last = t_start
    rollout_log = []  # on-policy: each step's onpolicy.rollout_sums since the last log
    while step < cfg.max_steps:
        # This rank's grad_accum micro-batches: the data's, or (gkd, minillm) answers sampled now.
        # Every rank decodes until all ranks' rows are done (all_ranks), so FSDP's collectives line up.
        if cfg.method == "offpolicy":
            micro_batches = batches.micro_batches(step)
        else:
            with parallel.gathered(
                *((student, teachers[0]) if cfg.rollout_gathered else ())
            ):  # not per token
                micro_batches, rollout_sums = onpolicy.step_micro_batches(
                    cfg.method,
                    student,
                    teachers[0],
                    batches.examples(step),
                    rollout_config,
                    step=step,
                    seed=cfg.seed,
                    rank=world.rank,
                    lmbda=cfg.lmbda,
                    seq_kd=cfg.seq_kd,
                    teacher_mix_alpha=cfg.teacher_mix_alpha,
                    length_norm=cfg.length_norm,
                    all_done=parallel.all_ranks,
                    all_reduce_sum=parallel.all_reduce_sum,
                    cache_dtype=DTYPES[cfg.precision],
                )
            rollout_log.append(rollout_sums)
        lm_micro_batches = lm_batches.micro_batches(step) if lm_batches else []
        for b in micro_batches + lm_micro_batches:
            index = b.pop("index")
            if cache is not None:  # the cached teacher, aligned with the labels, read on the CPU
                b["teacher_ids"], b["teacher_logprobs"] = cache.topk_for(
                    index, b["labels"], temperature=cfg.temperature
                )
        local = [
            sum(float((b["labels"] != IGNORE).sum()) for b in micro_batches),
            sum(float(b["input_ids"].numel()) for b in micro_batches + lm_micro_batches),
            float(stop_requested.is_set()),
            sum(float((b["labels"] != IGNORE).sum()) for b in lm_micro_batches),
        ]
        num_tokens, step_tokens, stop, lm_tokens = parallel.agree(
            local
        )  # CPU all-reduce; no device sync
        if stop:
            path = (
                save()
                if not (checkpoint.checkpoint_root(out) / f"step_{step:06d}").exists()
                else None
            )
            say(
                f"SIGTERM: stopped at step {step}; checkpoint {path or 'already saved'}; continue with --resume=true"
            )
            return
        step += 1
        lr = lr_at(
            step,
            lr=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            max_steps=cfg.max_steps,
            min_lr=cfg.min_lr,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr

        sums, grad_norm = train_step(
            student,
            teachers,
            micro_batches,
            num_tokens=int(num_tokens),
            vocab=vocab,
            cfg=cfg,
            optimizer=optimizer,
            scaler=scaler,
            lm_batches=lm_micro_batches,
            lm_tokens=int(lm_tokens),
        )
        tokens_since_log += step_tokens

        # --- log, check, evaluate, save. Reading values back is a device sync: only on these steps.
        save_now = cfg.save_every > 0 and step % cfg.save_every == 0
        eval_now = eval_examples is not None and (
            (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps
        )
        if step % cfg.log_every == 0 or save_now or eval_now or step == cfg.max_steps:
            loss_sum, div_sum, ce_sum = parallel.all_reduce_sum(sums).tolist()  # host sync
            norm = grad_norm.item()  # host sync
            if not math.isfinite(loss_sum) or (scaler is None and not math.isfinite(norm)):
                kept = checkpoint.complete_checkpoints(out)
                raise NonFiniteLoss(
                    f"loss {loss_sum:.4g}, grad norm {norm:.4g} at step {step}: not finite; stopped "
                    f"without saving; last good checkpoint: {kept[-1] if kept else 'none'} "
                    "(lower lr or check the data, then --resume=true)"
                )
            now = time.perf_counter()
            record = {
                "step": step,
                "loss": loss_sum,
                "ce": ce_sum / num_tokens,
                **({} if cfg.loss == "sft" else {"divergence": div_sum / num_tokens}),
                "lr": lr,
                "grad_norm": norm,
                "tokens_per_s": tokens_since_log / (now - t_last),
                "peak_mem_gb": peak_memory_gb(world.device),
                "eta_s": (cfg.max_steps - step) * (now - t_start) / (step - start_step),
            }
            if (
                rollout_log
            ):  # on-policy: summed over the steps since the last log and over ranks (CPU)
                record.update(
                    onpolicy.rollout_metrics(
                        parallel.agree([sum(col) for col in zip(*rollout_log)])
                    )
                )
                rollout_log = []
            if peak_flops:
                record["mfu"] = flops * record["tokens_per_s"] / (peak_flops * world.world_size)
            t_last, tokens_since_log = now, 0.0
            log_record(out, record, world)
            say(format_step(record, cfg.max_steps))
        if eval_now:
            run_eval()
        if save_now:
            save()
        if eval_now or save_now:
            t_last = time.perf_counter()  # tokens/s measures training only

    # --- export the student as an HF directory (transformers and generate.py load it).
    state_dict = parallel.full_state_dict(student)  # every rank takes part; rank 0 gets the tensors
    if world.is_main:
        hf.save_state_dict(state_dict, student.config, out / "final", tokenizer_from=cfg.teacher[0])
    say(f"exported the student to {out / 'final'}")
    parallel.barrier()


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
