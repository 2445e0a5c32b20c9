"""Generation speed: kd's `generate` against `transformers.generate` on the same model, in one run.

Greedy decoding of --new-tokens tokens (EOS ignored, so every run makes exactly that many) at
batch 1 and 8, fp32 and bf16; then our cached decoding against uncached decoding (a full
forward over the whole sequence for every token); then the memory-bandwidth bound: a decode
step must read every weight once, so tokens/s <= batch * copy bandwidth / weight bytes, with
the bandwidth measured here by copying a 1 GiB tensor (read + write bytes per second).
tokens/s = new tokens of all rows / wall time of the generate call, prefill included. The
ratios are given in wall time and in process CPU time (on a shared machine the CPU time
counts only the time this process ran, so it moves less with the load). kd's model is loaded
as generate.py loads it, `load_model(...).decode_layout()` (kd/linear.py), and at bf16 batch 1
runs with oneDNN off, as generate.py runs one row in bf16; for reference, transformers is timed
at bf16 batch 1 both ways.

    .venv/bin/python scripts/bench_generate.py [--model DIR] [--new-tokens 256] [--repeats 2]

Prints a markdown table (docs/benchmarks.md, "## Generation", has the recorded one).
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kd.dtypes import DTYPES, fast_dtype  # noqa: E402
from kd.hf import load_model  # noqa: E402
from kd.sampling import generate  # noqa: E402
from kd.tokenizer import load_tokenizer  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Write a short story about a robot who learns to paint.",
    "Explain how a rainbow forms.",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Describe the water cycle in simple terms.",
    "What are the benefits of regular exercise?",
    "Summarize the plot of Romeo and Juliet.",
]


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by the best of `repeats` copies of a 1 GiB tensor."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def ours(
    model, prompts: list[list[int]], new_tokens: int, pad_id: int, *, onednn: bool = True
) -> tuple[float, float, list[list[int]]]:
    """(tokens/s of wall time, tokens/s of process CPU time, new tokens) of kd's generate."""
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.backends.mkldnn.flags(enabled=onednn):
        out = generate(
            model,
            prompts,
            max_new_tokens=new_tokens,
            temperature=0.0,
            eos_token_ids=None,
            pad_id=pad_id,
        )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert all(len(r) == new_tokens for r in out)
    return len(prompts) * new_tokens / wall, len(prompts) * new_tokens / cpu, out


def theirs(
    model, prompts: list[list[int]], new_tokens: int, pad_id: int, *, onednn: bool = True
) -> tuple[float, float, list[list[int]]]:
    """The same for transformers.generate on the same left-padded batch (default dynamic cache)."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=onednn):
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_id,
        )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert out.shape[1] == P + new_tokens
    return len(prompts) * new_tokens / wall, len(prompts) * new_tokens / cpu, out[:, P:].tolist()


@torch.inference_mode()
def uncached(model, prompt: list[int], new_tokens: int) -> float:
    """Greedy decoding with a full forward over the whole sequence for every new token."""
    seq = torch.tensor([prompt])
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        next_id = model(seq, output_fn=lambda h, head: head(h[:, -1])).argmax(-1)  # (1,)
        seq = torch.cat([seq, next_id[:, None]], dim=1)
    return new_tokens / (time.perf_counter() - t0)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="runs of each; the best counts")
    p.add_argument(
        "--dtypes",
        help="comma-separated from fp32, bf16; default fp32, plus bf16 where this CPU is "
        "faster in it (on an AVX2-only CPU bf16 is ~70x slower: kd.dtypes.fast_dtype)",
    )
    return p.parse_args()


def compare(
    model, hf, prompts: list[list[int]], args: argparse.Namespace, pad_id: int, what: str
) -> list[tuple]:
    """Rows (what, ours tokens/s, theirs tokens/s, ours / theirs in CPU time, same tokens)
    of one batch. The two alternate and each keeps its best run: other processes on a shared
    machine only ever slow a run down, so the best is the least disturbed. One row in bf16:
    kd with oneDNN off, as generate.py runs it; transformers with it on, then off too."""
    one_row_bf16 = what.startswith("bf16") and len(prompts) == 1
    rows = []
    for label, onednn in [("", True)] + [(" (transformers with oneDNN off too)", False)] * (
        one_row_bf16
    ):
        ours_tps = ours_cpu = theirs_tps = theirs_cpu = 0.0
        for _ in range(args.repeats):
            tps, cpu, ours_out = ours(
                model, prompts, args.new_tokens, pad_id, onednn=not one_row_bf16
            )
            ours_tps, ours_cpu = max(ours_tps, tps), max(ours_cpu, cpu)
            tps, cpu, theirs_out = theirs(hf, prompts, args.new_tokens, pad_id, onednn=onednn)
            theirs_tps, theirs_cpu = max(theirs_tps, tps), max(theirs_cpu, cpu)
        same = sum(a == b for a, b in zip(ours_out, theirs_out))
        rows.append(
            (what + label, ours_tps, theirs_tps, ours_cpu / theirs_cpu, f"{same}/{len(prompts)}")
        )
        print(f"{rows[-1][0]}: ours {ours_tps:.1f}, transformers {theirs_tps:.1f} tokens/s")
    return rows


def print_tables(
    rows: list[tuple], cached: float, uncached_tps: float, weight_bytes: dict[str, int]
) -> None:
    bandwidth = copy_bandwidth()
    print(f"\n# load average at the end {os.getloadavg()[0]:.1f}")
    print(
        "\n| greedy, batch | kd tokens/s | transformers tokens/s | kd / transformers "
        "| same, CPU time | same tokens |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for what, a, b, cpu_ratio, same in rows:
        print(f"| {what} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {cpu_ratio:.2f}x | {same} |")
    print("\n| fp32, batch 1 | tokens/s | ratio |")
    print("| --- | ---: | ---: |")
    print(f"| cached (kd generate) | {cached:.1f} | {cached / uncached_tps:.1f}x |")
    print(f"| uncached (full forward per token) | {uncached_tps:.1f} | 1.0x |")
    print(f"\nCopy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write of a 1 GiB tensor).")
    print("| batch 1 | weight bytes per step | bound tokens/s | kd tokens/s | kd / bound |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for what, a, _, _, _ in rows:
        if what.endswith("batch 1"):
            name = what.split(",")[0]
            bound = bandwidth / weight_bytes[name]
            mb = weight_bytes[name] / 1e6
            print(f"| {name} | {mb:.0f} MB | {bound:.1f} | {a:.1f} | {a / bound:.0%} |")


def main() -> None:
    args = parse_args()
    fast_bf16 = fast_dtype(torch.device("cpu")) == torch.bfloat16
    default = ["fp32", *(["bf16"] if fast_bf16 else [])]
    dtype_names = args.dtypes.split(",") if args.dtypes else default
    hf_logging.disable_progress_bar()
    tok = load_tokenizer(args.model)
    pad_id = tok.pad_id
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    texts = [tok.apply_chat_template(c, add_generation_prompt=True) for c in chats]
    prompts = [tok.encode(text, add_special_tokens=False) for text in texts]
    lengths = f"{min(map(len, prompts))}-{max(map(len, prompts))}"
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), load average "
        f"{os.getloadavg()[0]:.1f}; prompts {lengths} tokens, {args.new_tokens} new tokens, "
        f"greedy, best of {args.repeats}",
        flush=True,
    )
    rows, cached, uncached_tps, weight_bytes = [], None, None, {}
    for name in dtype_names:
        dtype = DTYPES[name]
        model = load_model(args.model, dtype=dtype).decode_layout().eval()
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        hf.generation_config.eos_token_id = None  # run exactly n tokens, as ours does
        weight_bytes[name] = sum(t.numel() * t.element_size() for t in model.parameters())
        ours(model, prompts[:1], 8, pad_id), theirs(hf, prompts[:1], 8, pad_id)  # warm-up
        for batch in (1, 8):
            rows += compare(model, hf, prompts[:batch], args, pad_id, f"{name}, batch {batch}")
            if (name, batch) == ("fp32", 1):
                cached = rows[-1][1]
                runs = [uncached(model, prompts[0], args.new_tokens) for _ in range(args.repeats)]
                uncached_tps = max(runs)
                print(f"fp32, batch 1, uncached: {uncached_tps:.1f} tokens/s", flush=True)
        del model, hf
    print_tables(rows, cached, uncached_tps, weight_bytes)


if __name__ == "__main__":
    main()
