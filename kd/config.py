"""TrainConfig: every setting of `train.py`, read from a TOML file plus `--key=value` overrides.

    python train.py --config configs/smollm2_kd.toml --lr=1e-3 --teacher=a,b --resume=true
    python train.py --help                   # every setting with its default and meaning

One dataclass, one setting per line with a comment (meaning, unit, typical value) after it,
or above it where the line would be too long; `--help` prints those comments. TOML files are
flat (no tables); relative paths are relative to the directory `train.py` is run from. On the
command line lists are comma-separated and booleans are true/false. An unknown key, a wrong
type or a bad value is a `ValueError` naming the setting, which `train.py` prints as one line.
"""

import inspect
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from kd.losses import CROSS_DIVERGENCES, DIVERGENCES

# sft: cross-entropy on the data alone, no teacher; uld, gold: a teacher of another tokenizer
LOSSES = ("sft", *DIVERGENCES, *CROSS_DIVERGENCES)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
METHODS = ("offpolicy", "gkd", "minillm")
# Settings a resume may change when the user lists them in `resume_changes`: how long the run
# goes (max_steps also stretches the cosine) and what it logs, evaluates, keeps or compiles;
# not what a step computes.
SAFE_TO_CHANGE = (
    "max_steps",
    "log_every",
    "eval_every",
    "eval_batches",
    "eval_data",
    "save_every",
    "keep_checkpoints",
    "compile",
    "activation_checkpointing",
    "rollout_gathered",
)


@dataclass
class TrainConfig:
    # --- models ---
    teacher: tuple[str, ...] = ()  # teacher HF dir; several (comma-separated) = multi-teacher
    teacher_weights: tuple[float, ...] = ()  # weight of each teacher in the mixture; default equal
    # dir from scripts/cache_teacher.py (or scripts/cache_api.py: then leave teacher unset):
    # distill from the teacher's cached top-k, no teacher in memory
    teacher_cache: str = ""
    # multi-teacher target: probs = sum_i w_i p_i; logits = softmax(sum_i w_i z_i)
    teacher_mixture: str = "probs"
    student: str = ""  # student HF dir (architecture + initial weights); or use student_layers
    # teacher layer indices copied into a shallower student, e.g. 0,4,8,11
    student_layers: tuple[int, ...] = ()
    # HF dir whose weights replace the student's, e.g. stage 1's OUT/final (two-stage)
    init_from: str = ""
    # --- data ---
    data: tuple[str, ...] = ()  # training JSONL file(s): prompt/response, messages or text per line
    data_weights: tuple[float, ...] = ()  # sampling ratio of each data file; default equal
    eval_data: str = ""  # held-out JSONL for KL / perplexity / top-1 agreement; "" = no eval
    seq_len: int = 512  # tokens per example (longer ones are truncated); 2048 on GPUs
    batch_size: int = 8  # examples per micro-batch per rank
    # micro-batches per optimizer step; global batch = batch_size * grad_accum * ranks
    grad_accum: int = 1
    # --- loss ---
    # sft | forward_kl | reverse_kl | jsd | skew_forward_kl | skew_reverse_kl | tvd | logit_mse;
    # uld | gold for a teacher of another tokenizer (kd/cross_tokenizer.py)
    loss: str = "forward_kl"
    # loss = alpha * T^2 * divergence + (1 - alpha) * cross-entropy; 1.0 = pure KD
    alpha: float = 0.5
    temperature: float = 1.0  # softmax temperature T of both models inside the divergence; 1-2
    # jsd: mixture M = beta * p_teacher + (1 - beta) * q_student (GKD, arXiv 2306.13649)
    beta: float = 0.5
    # skew KLs: weight of the other distribution in the mix (DistiLLM, arXiv 2402.03898)
    skew_alpha: float = 0.1
    # uld/gold: compare the k largest probabilities of each side and a tail; 0 = sort them all
    uld_top_k: int = 0
    gold_divergence: str = "forward_kl"  # gold: divergence on the tokens both vocabularies share
    gold_weights: tuple[float, ...] = (1.0, 1.0)  # gold: weights of the shared part and the rest
    # tokens per chunk of the loss (memory ~ a few chunk x vocab fp32 buffers); logits never whole
    chunk_size: int = 256
    # MoE students: weight of the router's load-balancing loss (Switch/Mixtral form, kd/moe.py,
    # transformers' default 0.001); 0 = off. Dense students have none.
    router_aux_loss_coef: float = 0.001
    # --- on-policy distillation (kd/onpolicy.py, docs/onpolicy.md) ---
    # offpolicy = KD on the data | gkd (arXiv 2306.13649) | minillm (arXiv 2306.08543): on student
    # samples
    method: str = "offpolicy"
    max_new_tokens: int = 128  # gkd/minillm: response tokens sampled per prompt at most
    # gkd/minillm: sampler temperature; 1 keeps the gradient unbiased
    rollout_temperature: float = 1.0
    # gkd/minillm: sampler top-k; 0 = off (a cut sampler biases the gradient)
    rollout_top_k: int = 0
    rollout_top_p: float = 1.0  # gkd/minillm: sampler nucleus mass; 1.0 = off
    # gkd/minillm: FSDP weights stay gathered per rollout; false if a whole model won't fit a rank
    rollout_gathered: bool = True
    # gkd: probability that a micro-batch is student-generated; 1.0 = fully on-policy
    lmbda: float = 0.5
    # gkd: the other micro-batches are teacher-generated instead of the data's responses
    seq_kd: bool = False
    # minillm: sample from alpha * p_teacher + (1 - alpha) * q_student
    teacher_mix_alpha: float = 0.2
    ppo_clip: float = 0.2  # minillm: PPO clip range of the importance ratio
    length_norm: bool = True  # minillm: divide each return by the number of response tokens left
    # minillm: pretraining-text JSONL for the language-modelling loss (loss/alpha apply)
    lm_data: tuple[str, ...] = ()
    lm_loss_weight: float = 1.0  # minillm: weight of the loss on lm_data
    # --- optimization ---
    max_steps: int = 1000  # optimizer steps
    lr: float = 3e-4  # peak learning rate after warmup; 1e-4..1e-3 for small students
    warmup_steps: int = 100  # linear warmup from 0 to lr over this many steps
    min_lr: float = 3e-5  # cosine decay floor reached at max_steps; ~lr / 10
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices (not on norms or biases)
    grad_clip: float = 1.0  # clip the global gradient 2-norm to this; 0 = off
    # Compute dtype; master weights and optimizer stay fp32. auto = bf16 on a GPU and on a CPU with
    # native bf16 (AVX512-BF16, AMX), else fp32: on an AVX2-only CPU bf16 is ~70x slower than fp32.
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    # recompute each student block in backward: less memory, ~30% more compute
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block (needs a C++/Triton toolchain)
    seed: int = 0  # seed of the data order (and of any random init)
    # --- output ---
    out: str = "runs/kd"  # run directory: metrics.jsonl, checkpoints/, final/
    # print + log a metrics line every this many steps (loss values cost a device sync)
    log_every: int = 10
    # evaluate on eval_data every this many steps; 0 = off (still once at the end if eval_data)
    eval_every: int = 0
    eval_batches: int = 0  # micro-batches per rank per evaluation; 0 = the whole eval set
    save_every: int = 0  # checkpoint every this many steps; 0 = only on SIGTERM
    keep_checkpoints: int = 2  # keep the newest K checkpoints
    # continue the run in out from its newest checkpoint that verifies (error if none)
    resume: bool = False
    # resume: settings the run may change (max_steps, log_every, ...); others are refused
    resume_changes: tuple[str, ...] = ()
    overwrite: bool = False  # start anew in an out that holds a run, deleting that run

    def __post_init__(self) -> None:
        """Check every value once, so a bad setting fails before any model is loaded."""
        self._check_models_and_data()
        self._check_choices_and_ranges()
        if self.method != "offpolicy":
            self._check_on_policy()

    @property
    def cross_tokenizer(self) -> bool:
        """Is the teacher of another tokenizer (loss uld or gold, kd/cross_tokenizer.py)?"""
        return self.loss in CROSS_DIVERGENCES

    @property
    def tokenizer_dir(self) -> str:
        """Whose tokenizer reads the data: the teacher's; the student's when an API teacher's
        cache stands in for the teacher (its ids index the student's vocabulary) or the teacher
        has another tokenizer."""
        return self.teacher[0] if self.teacher and not self.cross_tokenizer else self.student

    def _check_models_and_data(self) -> None:
        if not self.teacher and not self.teacher_cache:
            raise ValueError(
                "setting 'teacher' is required: the teacher's HF directory (or a comma-separated "
                "list), unless a teacher_cache stands in for it"
            )
        if self.teacher_weights and len(self.teacher_weights) != len(self.teacher):
            raise ValueError(
                f"teacher_weights has {len(self.teacher_weights)} values for "
                f"{len(self.teacher)} teachers; give one per teacher"
            )
        if bool(self.student) == bool(self.student_layers):
            raise ValueError(
                "give exactly one of 'student' (an HF dir) and 'student_layers' (teacher layer "
                "indices)"
            )
        if not self.data:
            raise ValueError("setting 'data' is required: one or more training JSONL files")
        if self.data_weights and len(self.data_weights) != len(self.data):
            raise ValueError(
                f"data_weights has {len(self.data_weights)} values for {len(self.data)} data "
                "files; give one per file"
            )
        if self.teacher_cache and (len(self.teacher) > 1 or len(self.data) != 1):
            raise ValueError(
                "teacher_cache takes at most one teacher (the one that wrote the cache) and the "
                "one data file the cache was made from"
            )
        if self.teacher_cache and not self.teacher and not self.student:
            raise ValueError(
                "teacher_cache without a teacher (an API teacher's cache) needs 'student' (an HF "
                "dir): its tokenizer reads the data"
            )
        if self.cross_tokenizer and (
            not self.student or self.eval_data or self.teacher_cache or len(self.teacher) != 1
        ):
            raise ValueError(
                f"loss={self.loss} (a teacher of another tokenizer) needs one teacher, 'student' "
                'an HF dir, no teacher_cache, and eval_data = "" (evaluation compares one '
                "vocabulary)"
            )
        if self.teacher_cache and (self.eval_data or self.loss in ("sft", "logit_mse")):
            raise ValueError(
                'teacher_cache: set eval_data = "" (evaluation needs the teacher) and a loss '
                "other than sft, logit_mse"
            )
        unsafe = [name for name in self.resume_changes if name not in SAFE_TO_CHANGE]
        if unsafe:
            raise ValueError(
                f"resume_changes={','.join(unsafe)}: a resume may change only "
                f"{', '.join(SAFE_TO_CHANGE)}; the others change what a step computes"
            )
        if self.resume and self.overwrite:
            raise ValueError("resume=true and overwrite=true contradict each other; pick one")
        if self.lm_data and self.method != "minillm":
            raise ValueError(
                "lm_data is MiniLLM's language-modelling data; set method=minillm or add it to data"
            )

    def _check_choices_and_ranges(self) -> None:
        for f in fields(self):  # NaN passes every range check below (all comparisons are False)
            values = getattr(self, f.name)
            for x in values if isinstance(values, tuple) else (values,):
                if isinstance(x, float) and not math.isfinite(x):
                    raise ValueError(f"{f.name}={x} is not a finite number")
        for name, choices in (
            ("loss", LOSSES),
            ("teacher_mixture", ("probs", "logits")),
            ("gold_divergence", DIVERGENCES[:-1]),  # any but logit_mse
            ("precision", PRECISIONS),
            ("method", METHODS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not one of {', '.join(choices)}"
                )
        for least, names in (
            (1, ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "chunk_size")),
            (1, ("keep_checkpoints",)),
            (0, ("warmup_steps", "eval_every", "eval_batches", "save_every", "min_lr")),
            (0, ("weight_decay", "grad_clip", "lm_loss_weight", "router_aux_loss_coef")),
        ):
            for name in names:
                if getattr(self, name) < least:
                    raise ValueError(f"{name}={getattr(self, name)} must be >= {least}")
        if self.uld_top_k < 0 or len(self.gold_weights) != 2 or min(self.gold_weights) < 0:
            raise ValueError(
                f"uld_top_k={self.uld_top_k} must be >= 0 and gold_weights="
                f"{list(self.gold_weights)} two numbers >= 0 (the shared tokens', the rest's)"
            )
        if not all(0.0 <= x <= 1.0 for x in (self.alpha, self.beta, self.skew_alpha)):
            raise ValueError("alpha, beta and skew_alpha must lie in [0, 1]")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError("lr and temperature must be > 0")
        if not (
            0.0 <= self.lmbda <= 1.0
            and 0.0 <= self.teacher_mix_alpha <= 1.0
            and 0.0 <= self.ppo_clip < 1.0
        ):
            raise ValueError(
                f"lmbda={self.lmbda} and teacher_mix_alpha={self.teacher_mix_alpha} must lie in "
                f"[0, 1], ppo_clip={self.ppo_clip} in [0, 1)"
            )

    def _check_on_policy(self) -> None:
        if self.cross_tokenizer:  # rollouts score the student's tokens with the teacher's ids
            raise ValueError(f"method={self.method} with loss={self.loss}: use method=offpolicy")
        if len(self.teacher) > 1:
            raise ValueError(
                f"method={self.method} takes one teacher; give one 'teacher' or use "
                "method=offpolicy"
            )
        if self.teacher_cache:  # the teacher must score the student's fresh samples
            raise ValueError(
                f"method={self.method} needs the live teacher to score samples; set "
                'teacher_cache = ""'
            )
        if self.max_new_tokens < 1 or self.rollout_top_k < 0 or self.rollout_temperature <= 0:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} must be >= 1, "
                f"rollout_top_k={self.rollout_top_k} >= 0 and "
                f"rollout_temperature={self.rollout_temperature} > 0"
            )
        if not 0.0 < self.rollout_top_p <= 1.0:
            raise ValueError(f"rollout_top_p={self.rollout_top_p} must lie in (0, 1]; 1.0 = off")

    def to_toml(self) -> str:
        """The resolved config as TOML, loadable again with `--config` (OUT/train_config.toml)."""

        def value(v: object) -> str:
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, tuple):
                return "[" + ", ".join(value(x) for x in v) + "]"
            return json.dumps(v)  # a JSON string or number is valid TOML

        return "".join(f"{f.name} = {value(getattr(self, f.name))}\n" for f in fields(self))


def _setting_help() -> dict[str, str]:
    """{name: its comment} from this dataclass's source: the comment after the setting, else the
    comment lines right above it. So --help and the code never disagree."""
    lines = inspect.getsource(TrainConfig).splitlines()
    setting = re.compile(r"^    (\w+): [^=]+ = .+?(?:  # (.*))?$")
    helps = {}
    for i, line in enumerate(lines):
        if (m := setting.match(line)) is None:
            continue
        above = []
        for prev in reversed(lines[:i]):
            if not prev.strip().startswith("# ") or prev.strip().startswith("# ---"):
                break
            above.insert(0, prev.strip()[2:])
        helps[m[1]] = m[2] or " ".join(above)
    return helps


def help_text() -> str:
    lines = [
        "usage: [torchrun --nproc_per_node=N] train.py [--config FILE.toml] [--key=value ...]",
        "",
    ]
    helps = _setting_help()
    for f in fields(TrainConfig):
        default = f.default
        shown = (
            ",".join(map(str, default))
            if isinstance(default, tuple)
            else str(default).lower()
            if isinstance(default, bool)
            else default
        )
        lines.append(f"  --{f.name}={shown}".ljust(33) + f" {helps[f.name]}")
    return "\n".join(lines)


def _convert(name: str, raw: object, kind: object, *, source: str) -> object:
    """Checks/converts one value (from TOML or a command-line string) to the setting's type."""
    if typing.get_origin(kind) is tuple:
        item_kind = typing.get_args(kind)[0]
        if isinstance(raw, str):
            raw = [x.strip() for x in raw.split(",") if x.strip()]
        elif not isinstance(raw, list):
            raw = [raw]
        return tuple(_convert(name, x, item_kind, source=source) for x in raw)
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
                return raw.lower() in ("true", "1")
            raise ValueError
        if kind is int and not isinstance(raw, bool):
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw)
        if kind is float and not isinstance(raw, bool) and math.isfinite(float(raw)):
            return float(raw)
        if kind is str and isinstance(raw, (str, int, float)):
            return str(raw)
    except (ValueError, TypeError, OverflowError):  # a list or table where a number belongs, ...
        pass
    kind_name = {float: "finite number", int: "whole number", bool: "true or false"}.get(kind, kind)
    kind_name = kind_name.__name__ if isinstance(kind_name, type) else kind_name
    raise ValueError(f"setting '{name}' ({source}) = {raw!r} is not a valid {kind_name}")


def load_config(argv: list[str]) -> TrainConfig:
    """TrainConfig from `--config FILE.toml` (optional) then `--key=value` overrides, in order."""
    kinds = typing.get_type_hints(TrainConfig)
    values: dict[str, object] = {}
    args = list(argv)
    if "--config" in args:  # allow the space-separated form for this one flag
        i = args.index("--config")
        if i + 1 >= len(args):
            raise ValueError("--config needs a file: --config configs/smollm2_kd.toml")
        args[i : i + 2] = [f"--config={args[i + 1]}"]
    for arg in args:
        if not arg.startswith("--config="):
            continue
        path = Path(arg.split("=", 1)[1])
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML ({e})") from None
        for key, raw in table.items():
            if key not in kinds:
                raise ValueError(
                    f"unknown setting '{key}' in {path}; run `train.py --help` for the list"
                )
            values[key] = _convert(key, raw, kinds[key], source=str(path))
    for arg in args:
        if arg.startswith("--config="):
            continue
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(
                f"unexpected argument {arg!r}: use --key=value (see `train.py --help`)"
            )
        key, raw = arg[2:].split("=", 1)
        if key not in kinds:
            raise ValueError(f"unknown setting '--{key}'; run `train.py --help` for the list")
        values[key] = _convert(key, raw, kinds[key], source="command line")
    return TrainConfig(**values)
