"""The parts of a training run that train.py and the scripts share: build, then step.

Build, in train.py's order: `check_tokenizer` (one tokenizer for every model), `training_data`
(each rank's view of the data streams), `build_models` (student and teachers on the meta
device, FSDP2-sharded, then loaded from rank 0), `build_method` (the method a config names:
kd/offpolicy.py, kd/gkd.py or kd/minillm.py). Then `train_step`, one optimizer step, and the
FLOP count behind the MFU that train.py logs.

scripts/demo.py (the student before training), scripts/bench_train.py (the step) and the
tests use these as train.py does. Tests: `.venv/bin/python -m pytest -q tests/test_train.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from kd import hf, hf_config, onpolicy, parallel
from kd.config import TrainConfig
from kd.cross_tokenizer import Aligner
from kd.data import Batches, Example, load_examples
from kd.dtypes import DTYPES
from kd.gkd import GKD
from kd.losses import LossOptions
from kd.minillm import MiniLLM
from kd.model import Transformer
from kd.model_config import ModelConfig
from kd.moe import SparseMoE
from kd.offpolicy import KDLoss, OffPolicy
from kd.parallel import World
from kd.student import layer_subset_config, layer_subset_state_dict
from kd.teacher_cache import TeacherCache
from kd.tokenizer import Tokenizer, load_tokenizer

# A method gives the micro-batches of a step and the loss of one (kd/offpolicy.py explains).
Method = OffPolicy | GKD | MiniLLM

# Config fields that only label a checkpoint; all others fix parameter shapes or the math.
NON_ARCHITECTURE_KEYS = {
    "torch_dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "max_position_embeddings",
}

# ----------------------------------------------------------------------------- data


def check_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """The teacher's tokenizer (`cfg.tokenizer_dir`); every other model directory that ships
    one must map text identically (token-level distillation compares distributions over one
    vocabulary)."""
    tokenizer = load_tokenizer(cfg.tokenizer_dir)
    if cfg.cross_tokenizer:  # the student's tokenizer reads the data; the teacher's must differ
        if load_tokenizer(cfg.teacher[0]).fingerprint() == tokenizer.fingerprint():
            raise ValueError(
                f"loss={cfg.loss} is for a teacher of another tokenizer, but {cfg.teacher[0]} "
                f"and {cfg.student} share one: use forward_kl (exact, no alignment)"
            )
        return tokenizer
    for other in (*cfg.teacher[1:], cfg.student, cfg.init_from):
        if other and (other in cfg.teacher or (Path(other) / "tokenizer.json").is_file()):
            if load_tokenizer(other).fingerprint() != tokenizer.fingerprint():
                raise ValueError(
                    f"the tokenizer of {other} differs from the teacher's ({cfg.tokenizer_dir}); "
                    "token-level distillation needs one tokenizer for all models, or a loss "
                    'that aligns two: loss = "uld" or "gold"'
                )
    return tokenizer


def training_data(
    cfg: TrainConfig, tokenizer: Tokenizer, world: World, log: Callable[[str], None] = print
) -> dict[str, Batches]:
    """This rank's view of the training streams, keyed by the setting naming their files:
    "data" (prompts, for the on-policy methods) and MiniLLM's "lm_data". Every rank
    tokenizes the same files; each `Batches` gives a rank its slice of every step."""
    per_rank = dict(
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        rank=world.rank,
        world_size=world.world_size,
        pad_id=tokenizer.pad_id,
    )
    sources = []
    for path, weight in zip(cfg.data, cfg.data_weights or [1.0] * len(cfg.data)):
        if cfg.method == "offpolicy":
            examples, stats = load_examples(path, tokenizer, seq_len=cfg.seq_len)
        else:  # prompts; responses only where GKD also trains on the data's own
            examples, stats = onpolicy.load_prompt_examples(
                path,
                tokenizer,
                method=cfg.method,
                seq_len=cfg.seq_len,
                max_new_tokens=cfg.max_new_tokens,
                needs_responses=cfg.method == "gkd" and cfg.lmbda < 1 and not cfg.seq_kd,
            )
        sources.append((examples, weight))
        log(str(stats))
    streams = {"data": Batches(sources, seed=cfg.seed, **per_rank)}
    if cfg.lm_data:  # MiniLLM's language-modelling text: a stream of its own, seeded apart
        lm = [(load_examples(path, tokenizer, seq_len=cfg.seq_len)[0], 1.0) for path in cfg.lm_data]
        streams["lm_data"] = Batches(lm, seed=cfg.seed + 1, **per_rank)
    return streams


# ----------------------------------------------------------------------------- models


def build_on_meta(config: ModelConfig, dtype: torch.dtype) -> Transformer:
    """The module tree without memory: shapes only, real tensors come after sharding."""
    with torch.device("meta"):
        return Transformer(config).to(dtype)


def student_config(cfg: TrainConfig, teacher_config: ModelConfig | None) -> ModelConfig:
    """From `student`'s config.json, or the teacher's with only `student_layers`;
    `init_from` must match it. No teacher config (an API teacher's cache): `student` is set."""
    if cfg.student:
        config = hf_config.load_config(cfg.student)
    else:
        config = layer_subset_config(teacher_config, list(cfg.student_layers))
    if cfg.init_from:
        init = asdict(hf_config.load_config(cfg.init_from))
        for key, value in asdict(config).items():
            if key not in NON_ARCHITECTURE_KEYS and init[key] != value:
                raise ValueError(
                    f"init_from={cfg.init_from} has {key}={init[key]} but the student has "
                    f"{value}; init_from must be an export of this student (same student or "
                    "student_layers)"
                )
    return config


def student_weights(cfg: TrainConfig) -> dict[str, Tensor]:
    """The student's initial fp32 weights (read on rank 0 only)."""
    if cfg.init_from or cfg.student:
        return hf.load_state_dict(cfg.init_from or cfg.student, dtype=torch.float32)
    teacher = hf.load_state_dict(cfg.teacher[0], dtype=torch.float32)
    return layer_subset_state_dict(teacher, list(cfg.student_layers))


def initial_student(cfg: TrainConfig) -> Transformer:
    """The student exactly as train.py starts it, in one process (no FSDP), fp32."""
    teacher = hf_config.load_config(cfg.teacher[0]) if cfg.teacher else None
    config = student_config(cfg, teacher)
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(student_weights(cfg), strict=True, assign=True)
    return model


def common_vocab(
    cfg: TrainConfig, teachers: list[ModelConfig], student: ModelConfig, tokenizer: Tokenizer
) -> int:
    """The vocabulary rows the loss compares: all models' if equal, else the shared prefix.

    Different vocab sizes are fine only as padding: e.g. Qwen2.5-7B has 152064 rows, 1.5B has
    151936, both for a 151665-token tokenizer; rows past the tokenizer are never real tokens.
    A tokenizer may also hold more tokens than a model has rows, where those are special
    placeholders text never produces: Gemma 3's tokenizer has 262145 tokens, the last one
    `<image_soft_token>` (replaced by image embeddings), and the 1B model 262144 rows. Data that
    spells such a token out is refused (`check_token_ids`).
    """
    vocab = min([student.vocab_size, *(t.vocab_size for t in teachers)])
    added = tokenizer.backend.get_added_tokens_decoder()  # id -> AddedToken
    beyond = range(vocab, tokenizer.vocab_size)
    if not all(i in added and added[i].special for i in beyond):
        raise ValueError(
            f"the tokenizer of {cfg.tokenizer_dir} has {tokenizer.vocab_size} tokens but a model "
            f"has vocab_size {vocab}: the vocabularies differ beyond padding; distill "
            "between models of one tokenizer"
        )
    return vocab


def check_token_ids(
    cfg: TrainConfig, streams: dict[str, Batches], vocab: int, tokenizer: Tokenizer
) -> None:
    """Every token id of the training data has a row in every model (< vocab)."""
    if tokenizer.vocab_size <= vocab:
        return
    for key, stream in streams.items():
        for path, examples in zip(getattr(cfg, key), stream.sources):
            for example in examples:
                token = max(example.input_ids)
                if token >= vocab:
                    raise ValueError(
                        f"{path}: example {example.index + 1} (counting kept examples) holds "
                        f"{tokenizer.backend.id_to_token(token)!r} (id {token}), a special token "
                        f"with no row in the models' embeddings ({vocab} rows); remove it"
                    )


def build_models(
    cfg: TrainConfig, world: World, tokenizer: Tokenizer
) -> tuple[Transformer, list[Transformer], int]:
    """(student, teachers, vocab rows the loss compares), sharded and loaded on every rank.
    With a teacher cache there is no teacher model: `teachers` is empty."""
    # On the meta device: configs and shapes, no memory yet.
    teacher_configs = [hf_config.load_config(path) for path in cfg.teacher]
    s_config = student_config(cfg, teacher_configs[0] if teacher_configs else None)
    # Another tokenizer's teacher (uld, gold) compares no vocabulary rows: the student's own.
    vocab = common_vocab(cfg, [] if cfg.cross_tokenizer else teacher_configs, s_config, tokenizer)
    dtype = DTYPES[cfg.precision]
    teachers = [] if cfg.teacher_cache else [build_on_meta(c, dtype) for c in teacher_configs]
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

    # Load: rank 0 reads each checkpoint (keys and shapes checked), every rank gets its shards.
    def checked(weights: Callable[[], dict], config: ModelConfig, dtype: torch.dtype, path: str):
        return parallel.run_on_rank0(
            lambda: hf.check_state_dict(weights(), build_on_meta(config, dtype), path)
        )

    for t, path in zip(teachers, cfg.teacher):
        weights = checked(lambda: hf.load_state_dict(path, dtype=dtype), t.config, dtype, path)
        parallel.load_full_state_dict(t, weights)
    source = cfg.init_from or cfg.student or cfg.teacher[0]
    weights = checked(lambda: student_weights(cfg), s_config, torch.float32, source)
    parallel.load_full_state_dict(student, weights)
    return student, teachers, vocab


# ----------------------------------------------------------------------------- the method


def loss_options(cfg: TrainConfig, vocab: int) -> LossOptions:
    """The loss settings of a config; SFT is forward KL with alpha 0 and no teacher."""
    sft = cfg.loss == "sft"
    return LossOptions(
        divergence="forward_kl" if sft else cfg.loss,
        temperature=cfg.temperature,
        alpha=0.0 if sft else cfg.alpha,
        beta=cfg.beta,
        skew_alpha=cfg.skew_alpha,
        teacher_weights=cfg.teacher_weights or None,
        teacher_mixture=cfg.teacher_mixture,
        tokenizer_vocab_size=vocab,
        uld_top_k=cfg.uld_top_k,
        gold_divergence=cfg.gold_divergence,
        gold_weights=cfg.gold_weights,
    )


def build_method(
    cfg: TrainConfig,
    streams: dict[str, Batches],
    student: Transformer,
    teachers: list[Transformer],
    vocab: int,
    tokenizer: Tokenizer,
    world: World,
) -> Method:
    """The method `cfg.method` names, on `streams` (`training_data`): what each step trains
    on and its loss. off-policy KD, SFT (`loss = "sft"`: no teacher forward) and KD from a
    teacher cache are kd/offpolicy.py; gkd and minillm sample the student's answers."""
    check_token_ids(cfg, streams, vocab, tokenizer)
    cross = None
    if cfg.cross_tokenizer:  # the teacher reads the student's text (a chat: in its template)
        aligner = Aligner(tokenizer, load_tokenizer(cfg.teacher[0]))
        cross = (aligner, aligner.shared_vocab() if cfg.loss == "gold" else None)
    kd = KDLoss(
        teachers=[] if cfg.loss == "sft" else teachers,
        options=loss_options(cfg, vocab),
        vocab=vocab,
        chunk_size=cfg.chunk_size,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        shared=cross[1] if cross else None,
    )
    if cfg.method == "offpolicy":
        cache = None
        if cfg.teacher_cache:  # refuses a cache made for another tokenizer, data file or seq_len
            cache = TeacherCache.open(
                cfg.teacher_cache,
                tokenizer=tokenizer,
                data_path=cfg.data[0],
                seq_len=cfg.seq_len,
                examples=streams["data"].sources[0],
            )
            if cfg.teacher:  # the cache's teacher is this run's teacher
                cache.check_teacher(cfg.teacher[0])
            if cache.spec.vocab_size != vocab:
                raise ValueError(
                    f"{cfg.teacher_cache} was made by a teacher with {cache.spec.vocab_size} "
                    f"logits, the student has {vocab}"
                )
        return OffPolicy(streams["data"], kd, cache=cache, cross=cross)
    rollout = onpolicy.RolloutConfig(
        max_new_tokens=cfg.max_new_tokens,
        eos_token_ids=frozenset(tokenizer.eos_token_ids),
        pad_id=tokenizer.pad_id,
        vocab_size=vocab,
        temperature=cfg.rollout_temperature,
        top_k=cfg.rollout_top_k,
        top_p=cfg.rollout_top_p,
    )
    sampler = onpolicy.Sampler(
        student,
        teachers[0],
        rollout,
        seed=cfg.seed,
        rank=world.rank,
        all_done=parallel.all_ranks,
        cache_dtype=DTYPES[cfg.precision],
        gather=cfg.rollout_gathered,
    )
    if cfg.method == "gkd":
        return GKD(streams["data"], sampler, kd, lmbda=cfg.lmbda, seq_kd=cfg.seq_kd)
    lm = None
    if "lm_data" in streams:  # the language-modelling loss: off-policy KD on lm_data
        lm = OffPolicy(streams["lm_data"], kd)
    return MiniLLM(
        streams["data"],
        sampler,
        teacher_mix_alpha=cfg.teacher_mix_alpha,
        length_norm=cfg.length_norm,
        clip=cfg.ppo_clip,
        vocab=vocab,
        chunk_size=cfg.chunk_size,
        lm=lm,
        lm_loss_weight=cfg.lm_loss_weight,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
    )


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """What one training run holds: train.py's `main` builds it once, its loop reads it."""

    cfg: TrainConfig  # the settings, precision resolved
    world: parallel.World  # this process: rank, world size, device
    tokenizer: Tokenizer  # the one tokenizer of every model
    streams: dict[str, Batches]  # the data streams ("data", MiniLLM's "lm_data")
    eval_examples: list[Example] | None  # held-out examples, or None without eval_data
    student: Transformer  # FSDP2-sharded, fp32 master weights
    teachers: list[Transformer]  # frozen, sharded; empty with a teacher cache
    vocab: int  # the vocabulary rows the loss compares
    method: Method  # what each step trains on, and its loss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    identity: dict | None = None  # rank 0: what a resume must find unchanged (kd/rundir.py)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def say(self, *args, **kwargs) -> None:
        """print on rank 0, which speaks for all."""
        if self.world.is_main:
            print(*args, **kwargs)


# ----------------------------------------------------------------------------- the step


def train_step(
    student: Transformer,
    method: Method,
    micro_batches: list[dict[str, Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float,
) -> tuple[dict[str, Tensor], Tensor, bool]:
    """One optimizer step over this rank's micro-batches.

    Returns, as device tensors (no host sync): this rank's sums for the log, "loss" (of the
    micro-batches' losses) and the method's own (`loss`'s second value, added up), and the
    global gradient norm before clipping; then whether fp16 loss scaling skipped the step.
    """
    device = student.head_weight.device
    sums: dict[str, Tensor] = {"loss": torch.zeros((), device=device)}
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        # Reduce-scatter the gradients after the last micro-batch only; before, they accumulate.
        parallel.set_gradient_sync(student, i == len(micro_batches) - 1)
        loss, log_sums = method.loss(student, batch)
        (loss if scaler is None else scaler.scale(loss)).backward()
        sums["loss"] += loss.detach()
        for key, value in log_sums.items():
            sums[key] = sums.get(key, 0.0) + value
    if scaler is not None:
        scaler.unscale_(optimizer)
    trained = [p for p in student.parameters() if p.requires_grad]
    grad_norm = parallel.clip_grad_norm_(trained, grad_clip)
    skipped = False
    if scaler is None:
        optimizer.step()
    else:
        scale = scaler.get_scale()  # a host sync, with fp16 only
        scaler.step(optimizer)  # skipped when the unscaled gradients hold inf/NaN
        scaler.update()
        skipped = scaler.get_scale() < scale  # update() lowers the scale after a skipped step
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm, skipped


# ----------------------------------------------------------------------------- FLOPs


def matmul_params(model: Transformer) -> int:
    """Parameters that take part in a token's matmuls: all but the input embedding (a lookup)
    unless tied (then it is the output head too), and of an MoE layer's experts only the k of E
    each token runs."""
    n = sum(p.numel() for p in model.parameters())
    for moe in (m for m in model.modules() if isinstance(m, SparseMoE)):
        experts = sum(p.numel() for p in moe.experts.parameters())
        n -= round(experts * (1 - moe.top_k / len(moe.experts)))
    if model.config.tie_word_embeddings:
        return n
    return n - model.model.embed_tokens.weight.numel()


def forward_flops_per_token(model: Transformer, *, seq_len: int) -> float:
    """Forward FLOPs per token: 2 per matmul parameter, plus attention's q k^T and a v,
    2 * 2 * seq_len * (heads * head_dim) per layer (counted non-causal, as PaLM, arXiv
    2204.02311)."""
    c = model.config
    attention = 4 * c.num_hidden_layers * seq_len * c.num_attention_heads * c.head_dim
    return 2 * matmul_params(model) + attention


def flops_per_token(teachers: list[Transformer], student: Transformer, *, seq_len: int) -> float:
    """Model FLOPs per trained token: the teachers' forwards, plus the student's forward and
    backward (3x its forward)."""
    teacher = sum(forward_flops_per_token(t, seq_len=seq_len) for t in teachers)
    return teacher + 3 * forward_flops_per_token(student, seq_len=seq_len)
