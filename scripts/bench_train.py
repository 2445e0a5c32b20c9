"""Benchmark of one distillation step: ours vs its parts vs the usual transformers way.

    .venv/bin/python scripts/bench_train.py                  # SmolLM2-135M teacher (make teacher)
    .venv/bin/python scripts/bench_train.py --repeat 2 --profile runs/profile --compile

Each case runs in a process of its own, so that its peak memory (max RSS on CPU, max allocated
on CUDA) is its own; the processes start one at a time and each warms up alone until two
consecutive steps agree within 5%; then --steps (5) rounds time one step of every case in turn
(kd.benchmark.interleave), so that a minute in which the machine runs slow slows every case
alike. The table gives each case's median, spread ((max - min) / median) and first step (which
includes compilation with compile = true). --repeat N runs all of it N times back to back,
prints how far each ratio moved between runs, and the ratios of each case's median over the
runs. --profile DIR writes each case's torch.profiler per-op table to DIR/CASE.txt and prints
self seconds per step by kind of work. --compile adds sft, teacher and kd with compile = true
(torch.compile per block), interleaved with each other after the other cases (all eight
processes at once would need ~22 GB).

Cases, on the same random tokens (every position trained; with --prompt-fraction F the
first F of each row is a "prompt" without labels, as in chat data, where our loss skips the heads):
  (a) sft        our SFT step: kd.training.train_step with loss=sft (FSDP2, chunked CE, AdamW)
  (b) teacher    the teacher's forward alone, to full logits, no_grad
  (c) kd         our KD step: kd.training.train_step with loss=forward_kl, alpha=0.5 (teacher +
                 student + chunked loss)
  (d) naive      the same KD the usual way: transformers models, bf16 autocast (or plain fp32),
                 both (B, T, V) logits materialized, KL + CE on them, AdamW, a plain loop
  (e) cached     (c) with the teacher replaced by its top-k cache (--top-k, 32), as train.py with
                 teacher_cache: no teacher in memory; each step reads the batch's TopK with
                 TeacherCache.topk_for (timed: training from a cache pays it every step)
  (f) kd-moe     with --moe-experts E: (c) with an MoE teacher of the same active size as the
                 dense one: the teacher's config as Mixtral's, E experts of width
                 intermediate_size / 2, top-2 (so each token's MLP is as wide as the dense
                 teacher's), random weights; the same dense student, as a directory
The cache of (e) is made before it by another process (untimed; its own process because max RSS
never drops, so a teacher freed in (e) would still count): the teacher in --precision runs over
the random batch and kd.cache_writer.write_cache stores its
top-k log-probs in bf16 at T = 1 (scripts/cache_teacher.py's defaults) in a temporary directory,
with the batch's token ids as the cache's data file; (e) opens it with TeacherCache.open.
All cases compute in one dtype, --precision (auto: bf16 on a GPU or a CPU with native bf16,
else fp32; kd.dtypes.fast_precision).
Efficiency = (time a + time b) / time c: how close KD gets to "an SFT step plus a teacher
forward" (the loss overhead); speed-up = tokens/s of c over d; memory ratio = peak c / peak d;
from cache = tokens/s of e over c (target >= 1.5) and peak e / peak c.
Achieved FLOP/s = model FLOPs per token (kd.training.flops_per_token: 2 N_teacher + 6 N_student
+ attention) x tokens/s, over the peak of a 2048^3 matmul in that dtype measured in the same run.
The student is 10 of the teacher's 30 blocks, as configs/smollm2_kd.toml.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from kd.benchmark import (  # noqa: E402
    agreement,
    interleave,
    matmul_peak,
    median_over_runs,
    serve,
)
from kd.config import TrainConfig  # noqa: E402  (after the path set-up)
from kd.data import Example  # noqa: E402
from kd.dtypes import DTYPES, fast_precision  # noqa: E402
from kd.tokenizer import Tokenizer  # noqa: E402

LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 29)
PROMPT_FRACTION = 0.0  # set from --prompt-fraction in main and in each case's process


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def serve_case(step, case: str, args: argparse.Namespace, **facts: float) -> None:
    """The case's side of kd.benchmark.interleave for `step`: with --profile the per-op table
    goes to PROFILE/CASE.txt; at the end it answers its peak memory and `facts`."""
    profile_to = Path(args.profile) / f"{case}.txt" if args.profile else None
    serve(step, profile_to=profile_to, end=lambda: {**facts, "peak_memory_gb": peak_memory_gb()})


def random_batch(vocab: int, *, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch_size, seq_len + 1), generator=g)
    labels = ids[:, 1:].clone()  # already shifted
    labels[:, : round(PROMPT_FRACTION * seq_len)] = -100  # the "prompt": no loss there
    return {"input_ids": ids[:, :-1], "labels": labels}


def batch_examples(batch: dict[str, torch.Tensor]) -> list[Example]:
    """The batch's rows as the examples of a teacher cache (index = row)."""
    return [
        Example(
            input_ids=ids.tolist(),
            labels=labels.tolist(),
            prompt_ids=[],
            num_targets=int((labels != -100).sum()),
            index=i,
        )
        for i, (ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"]))
    ]


def write_batch_cache(args: argparse.Namespace) -> dict:
    """Before case (e), in a process of its own: the teacher's top-k of the random batch as a
    teacher cache in args.cache_dir/cache, the batch's ids in args.cache_dir/batch.json as its
    data file."""
    from kd import hf, hf_config
    from kd.cache_writer import write_cache
    from kd.teacher_cache import CacheSpec, config_sha256, file_sha256
    from kd.tokenizer import load_tokenizer

    if args.moe_experts:
        write_moe_teacher(args)
    config = hf_config.load_config(args.teacher)
    # build_models' vocab is the teacher's too: the student is a subset of its layers, same rows.
    batch = random_batch(config.vocab_size, batch_size=args.batch_size, seq_len=args.seq_len)
    data = Path(args.cache_dir) / "batch.json"
    data.write_text(json.dumps(batch["input_ids"].tolist()))
    examples = batch_examples(batch)
    spec = CacheSpec(
        tokenizer_fingerprint=load_tokenizer(args.teacher).fingerprint(),
        data_sha256=file_sha256(data),
        seq_len=args.seq_len,
        teacher_config_sha256=config_sha256(args.teacher),
        vocab_size=config.vocab_size,
        num_examples=len(examples),
        k=args.top_k,
        dtype="bfloat16",
        temperature=1.0,
        examples_per_shard=len(examples),
    )
    teacher = hf.load_model(args.teacher, dtype=DTYPES[args.precision]).eval().requires_grad_(False)
    start = time.perf_counter()
    write_cache(Path(args.cache_dir) / "cache", teacher, examples, spec, batch_size=args.batch_size)
    return {"seconds": time.perf_counter() - start}


def write_moe_teacher(args: argparse.Namespace) -> None:
    """Case (f)'s models, in args.cache_dir: moe_teacher/ (random, seeded: Mixtral with the
    dense teacher's attention and embeddings, args.moe_experts experts of half its MLP width,
    top-2) and student/ (the dense student of the other cases, LAYERS of the teacher)."""
    from kd import hf, hf_config
    from kd.model import Transformer
    from kd.model_config import ModelConfig
    from kd.student import layer_subset_config, layer_subset_state_dict

    dense = hf_config.load_config(args.teacher)
    settings = asdict(dense) | {"model_type": "mixtral", "layer_types": None}
    settings |= {"intermediate_size": dense.intermediate_size // 2, "num_experts_per_tok": 2}
    moe = Transformer(ModelConfig(**settings | {"num_local_experts": args.moe_experts}))
    moe.init_weights(seed=0)
    out = Path(args.cache_dir)
    hf.save_model(moe, out / "moe_teacher", tokenizer_from=args.teacher)
    student = layer_subset_state_dict(hf.load_state_dict(args.teacher), list(LAYERS))
    config = layer_subset_config(dense, list(LAYERS))
    hf.save_state_dict(student, config, out / "student", tokenizer_from=args.teacher)


def open_batch_cache(cfg: TrainConfig, tokenizer: Tokenizer, batch: dict[str, torch.Tensor]):
    """Case (e): the cache write_batch_cache made for this (CPU) batch, opened as train.py opens
    a teacher_cache (its checks included)."""
    from kd.teacher_cache import TeacherCache

    if json.loads(Path(cfg.data[0]).read_text()) != batch["input_ids"].tolist():
        raise RuntimeError(
            f"{cfg.data[0]} holds another batch than this case's: the cache is not of this batch"
        )
    return TeacherCache.open(
        cfg.teacher_cache,
        tokenizer=tokenizer,
        data_path=cfg.data[0],
        seq_len=cfg.seq_len,
        examples=batch_examples(batch),
    )


def run_ours(case: str, args: argparse.Namespace) -> None:
    """kd's step of `case` through kd/training.py and kd/offpolicy.py, as train.py runs it: each
    timed step takes the method's micro-batch (collated, and for (e) the cache read) and runs
    kd.training.train_step on it."""
    from kd import parallel
    from kd.data import Batches
    from kd.offpolicy import KDLoss, OffPolicy
    from kd.optim import build_optimizer
    from kd.tokenizer import load_tokenizer
    from kd.training import (
        build_models,
        flops_per_token,
        forward_flops_per_token,
        loss_options,
        train_step,
    )

    cache_dir = Path(args.cache_dir or "unused")  # (e): batch.json (the cache's data) and cache/
    base = case.removesuffix("+compile")  # "kd+compile": case kd with compile = true
    moe = base == "kd-moe"  # (f): the models write_moe_teacher wrote
    cfg = TrainConfig(
        teacher=(str(cache_dir / "moe_teacher") if moe else args.teacher,),
        student=str(cache_dir / "student") if moe else "",
        student_layers=() if moe else LAYERS,
        precision=args.precision,
        data=(str(cache_dir / "batch.json"),),
        teacher_cache=str(cache_dir / "cache") if base == "cached" else "",
        loss="sft" if base == "sft" else "forward_kl",
        alpha=0.5,
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=1e-4,
        compile=base != case,
    )
    world = parallel.init_distributed()
    tokenizer = load_tokenizer(args.teacher)
    student, teachers, vocab = build_models(cfg, world, tokenizer)  # cached: teachers = []
    cpu_batch = random_batch(vocab, batch_size=args.batch_size, seq_len=args.seq_len)
    if base == "teacher":
        ids = cpu_batch["input_ids"].to(world.device)
        flops = forward_flops_per_token(teachers[0], seq_len=args.seq_len)
        with torch.no_grad():
            serve_case(lambda: teachers[0](ids), case, args, flops_per_token=flops)
    else:
        data = Batches(
            [(batch_examples(cpu_batch), 1.0)],
            batch_size=args.batch_size,
            grad_accum=1,
            rank=0,
            world_size=1,
            seed=0,
            pad_id=0,
        )
        teacher = [] if base == "sft" else teachers
        kd = KDLoss(teacher, loss_options(cfg, vocab), vocab, cfg.chunk_size)
        cache = open_batch_cache(cfg, tokenizer, cpu_batch) if base == "cached" else None
        method = OffPolicy(data, kd, cache=cache)
        optimizer = build_optimizer(student, lr=cfg.lr, weight_decay=0.1)

        def step() -> None:
            micro_batches = method.micro_batches(0)
            train_step(
                student,
                method,
                micro_batches,
                optimizer=optimizer,
                scaler=None,
                grad_clip=cfg.grad_clip,
            )

        flops = flops_per_token(method.teachers, student, seq_len=args.seq_len)
        serve_case(step, case, args, flops_per_token=flops)
    parallel.shutdown()


def run_naive(args: argparse.Namespace) -> None:
    """The usual way: transformers models, bf16 autocast (or none in fp32), full logits, KL + CE,
    a plain AdamW loop."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from kd import hf
    from kd.student import layer_subset_state_dict

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.precision]
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=dtype).to(device).eval()
    config = LlamaConfig.from_pretrained(args.teacher, num_hidden_layers=len(LAYERS))
    student = LlamaForCausalLM(config).to(device)
    weights = layer_subset_state_dict(
        hf.load_state_dict(args.teacher, dtype=torch.float32), list(LAYERS)
    )
    missing, unexpected = student.load_state_dict(weights, strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:  # a tied model's lm_head is the embedding
        raise RuntimeError(f"naive student: missing {missing}, unexpected {unexpected}")
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.1)
    batch = {
        k: v.to(device)
        for k, v in random_batch(
            config.vocab_size, batch_size=args.batch_size, seq_len=args.seq_len
        ).items()
    }

    def step() -> None:
        labels = batch["labels"]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad():
                t_logits = teacher(batch["input_ids"]).logits  # (B, T, V)
            s_logits = student(batch["input_ids"]).logits  # (B, T, V)
        log_q = F.log_softmax(s_logits.float(), dim=-1)
        log_p = F.log_softmax(t_logits.float(), dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T)
        ce = F.cross_entropy(
            s_logits.float().flatten(0, 1), labels.flatten(), reduction="none"
        ).view_as(kl)
        mask = labels != -100
        loss = ((0.5 * kl + 0.5 * ce) * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    serve_case(step, "naive", args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    teacher = str(REPO / "models" / "smollm2-135m-instruct")
    parser.add_argument("--teacher", default=teacher, help="HF teacher directory")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    chunk = TrainConfig.chunk_size
    parser.add_argument("--chunk-size", type=int, default=chunk, help="tokens per loss chunk")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case, after warm-up")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="compute dtype of every case",
    )
    parser.add_argument("--top-k", type=int, default=32, help="tokens per position, case (e)")
    parser.add_argument(
        "--prompt-fraction",
        type=float,
        default=0.0,
        help="leading share of each row without labels",
    )
    parser.add_argument(
        "--moe-experts",
        type=int,
        default=0,
        help="also case (f): an MoE teacher with this many experts (e.g. 8); 0 = off",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also sft, teacher and kd with compile = true"
    )
    parser.add_argument(
        "--peak-flops",
        type=float,
        help="the device's peak FLOP/s in --precision (e.g. 989e12, H100 bf16 dense): the "
        "'of peak' column is then MFU; default: a 2048^3 matmul measured in this run",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of all cases, back to back")
    parser.add_argument("--profile", help="directory for each case's per-op profile table")
    parser.add_argument("--case", help="one case (internal)")
    parser.add_argument("--cache-dir", help="directory of case (e)'s teacher cache (internal)")
    return parser.parse_args()


def case_groups(args: argparse.Namespace) -> list[list[str]]:
    """The cases, in groups whose steps are interleaved (a group's processes live at once)."""
    cases = ["sft", "teacher", "kd", "naive", "cached"] + (["kd-moe"] if args.moe_experts else [])
    compiled = ["sft+compile", "teacher+compile", "kd+compile"]
    return [cases] + ([compiled] if args.compile else [])


def run_cases(args: argparse.Namespace) -> dict[str, dict] | None:
    """All cases (write-cache first makes (e)'s cache, in a process of its own, untimed), each
    group interleaved; None when one fails (its error printed)."""
    flags = ("batch_size", "seq_len", "chunk_size", "precision", "top_k")
    flags += ("prompt_fraction", "moe_experts")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    results = {}
    with tempfile.TemporaryDirectory() as cache_dir:

        def command(case: str) -> list[str]:
            line = [sys.executable, __file__, "--case", case, "--teacher", args.teacher]
            for flag in flags:
                line += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            line += ["--cache-dir", cache_dir]
            return line + (["--profile", args.profile] if args.profile else [])

        out = subprocess.run(command("write-cache"), capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            return None
        for group in case_groups(args):
            commands = {case: command(case) for case in group}
            try:
                results |= interleave(
                    commands, steps=args.steps, profile=bool(args.profile), env=env
                )
            except RuntimeError as e:
                print(e, file=sys.stderr)
                return None
    for r in results.values():
        r["tokens_per_s"] = args.batch_size * args.seq_len / r["seconds"]
    return results


def print_table(results: dict[str, dict], args: argparse.Namespace, peak: float) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"device: {device}, {torch.get_num_threads()} threads; batch {args.batch_size} x "
        f"{args.seq_len} tokens (first {args.prompt_fraction:.0%} of each row unlabelled); "
        f"{args.precision}; load average {os.getloadavg()[0]:.1f}"
    )
    source = "given (--peak-flops)" if args.peak_flops else "matmul 2048^3, measured"
    print(f"peak, {args.precision}: {peak / 1e9:.0f} GFLOP/s, {source}")
    header = ("case", "s/step", "spread", "CPU s", "first s", "tokens/s", "peak GB", "of peak")
    widths = (16, 8, 8, 8, 8, 10, 9, 9)
    print(header[0].ljust(widths[0]) + "".join(h.rjust(w) for h, w in zip(header[1:], widths[1:])))
    for name, r in results.items():
        # naive: the same model FLOPs as ours (kd's count)
        achieved = r.get("flops_per_token", results["kd"]["flops_per_token"]) * r["tokens_per_s"]
        r["achieved_flops"] = achieved
        cells = (
            f"{r['seconds']:.2f}",
            f"{r['spread']:.0%}",
            f"{r['cpu_seconds']:.2f}",
            f"{r['first_seconds']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['peak_memory_gb']:.2f}",
            f"{achieved / peak:.1%}",
        )
        print(name.ljust(widths[0]) + "".join(c.rjust(w) for c, w in zip(cells, widths[1:])))


def print_profiles(results: dict[str, dict]) -> None:
    """Self seconds per step by kind of work (kd.benchmark.KINDS), one column per case."""
    cases = [c for c, r in results.items() if "profile" in r]
    kinds = list(dict.fromkeys(k for c in cases for k in results[c]["profile"]))
    print("profile, self seconds per step by kind of work:")
    print("kind".ljust(12) + "".join(c.rjust(16) for c in cases))
    for kind in kinds:
        cells = (f"{results[c]['profile'].get(kind, 0.0):.3f}" for c in cases)
        print(kind.ljust(12) + "".join(cell.rjust(16) for cell in cells))


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """The ratios of the docstring (wall time), and with --compile the compiled ones."""
    a, b, c, d, e = (results[k] for k in ("sft", "teacher", "kd", "naive", "cached"))
    r = {
        "efficiency": (a["seconds"] + b["seconds"]) / c["seconds"],
        "speedup_vs_naive": c["tokens_per_s"] / d["tokens_per_s"],
        "memory_vs_naive": c["peak_memory_gb"] / d["peak_memory_gb"],
        "cached_vs_kd": e["tokens_per_s"] / c["tokens_per_s"],
        "cached_memory_vs_kd": e["peak_memory_gb"] / c["peak_memory_gb"],
    }
    if "kd-moe" in results:
        r["moe_vs_dense"] = results["kd-moe"]["tokens_per_s"] / c["tokens_per_s"]
        r["moe_memory_vs_dense"] = results["kd-moe"]["peak_memory_gb"] / c["peak_memory_gb"]
    if "kd+compile" in results:
        a, b, c = (results[f"{k}+compile"] for k in ("sft", "teacher", "kd"))
        r["efficiency_compiled"] = (a["seconds"] + b["seconds"]) / c["seconds"]
        r["compiled_vs_kd"] = c["tokens_per_s"] / results["kd"]["tokens_per_s"]
        r["compiled_vs_naive"] = c["tokens_per_s"] / d["tokens_per_s"]
    return r


def print_ratios(r: dict[str, float], args: argparse.Namespace) -> None:
    print(
        f"efficiency (a + b) / c = {r['efficiency']:.2f} (target >= 0.9); ours vs naive: "
        f"{r['speedup_vs_naive']:.2f}x tokens/s (target >= 1.5), "
        f"{r['memory_vs_naive']:.2f}x peak memory (target <= 0.7)"
    )
    print(
        f"from cache (k = {args.top_k}) vs online KD: {r['cached_vs_kd']:.2f}x tokens/s "
        f"(target >= 1.5), {r['cached_memory_vs_kd']:.2f}x peak memory"
    )
    if "moe_vs_dense" in r:
        print(
            f"MoE teacher ({args.moe_experts} experts, top-2, same active size) vs dense: "
            f"{r['moe_vs_dense']:.2f}x tokens/s, {r['moe_memory_vs_dense']:.2f}x peak memory"
        )
    if "compiled_vs_kd" in r:
        print(
            f"compile = true: kd {r['compiled_vs_kd']:.2f}x tokens/s of eager kd, "
            f"{r['compiled_vs_naive']:.2f}x naive; efficiency {r['efficiency_compiled']:.2f}"
        )


def main() -> int:
    args = parse_args()
    if not (Path(args.teacher) / "config.json").is_file():
        print(
            f"error: no teacher at {args.teacher}; run `make teacher` or pass --teacher",
            file=sys.stderr,
        )
        return 1
    global PROMPT_FRACTION
    PROMPT_FRACTION = args.prompt_fraction
    if args.case == "write-cache":
        print(json.dumps(write_batch_cache(args)))
        return 0
    if args.case == "naive":  # a case process, answering kd.benchmark.interleave
        run_naive(args)
        return 0
    if args.case:
        run_ours(args.case, args)
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.precision == "auto":
        args.precision = fast_precision(device)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    peak = args.peak_flops or matmul_peak(DTYPES[args.precision], device)
    runs, all_results = [], []
    for run in range(args.repeat):
        results = run_cases(args)
        if results is None:
            return 1
        print(f"run {run + 1} of {args.repeat}")
        print_table(results, args, peak)
        if args.profile and run == 0:
            print_profiles(results)
            print(f"per-op tables: {args.profile}/CASE.txt")
        runs.append(ratios(results))
        all_results.append(results)
        print_ratios(runs[-1], args)
        record = {"precision": args.precision, "peak": peak, "results": results, **runs[-1]}
        print(json.dumps(record))
    if args.repeat > 1:
        print(f"agreement of the {args.repeat} runs (target: every ratio within 10%):")
        lines, worst = agreement(runs)
        print("\n".join(lines) + f"\nworst: {worst:.0%}")
        keys = ("seconds", "tokens_per_s", "peak_memory_gb")
        combined = ratios(median_over_runs(all_results, keys))
        print(f"each case's median over the {args.repeat} runs:")
        print_ratios(combined, args)
        print(json.dumps({"precision": args.precision, "combined": combined}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
