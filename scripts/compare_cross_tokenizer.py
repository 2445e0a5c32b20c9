"""Cross-tokenizer distillation on a real pair: Gemma 3 270M (base) teaches a SmolLM2 student.

    make gemma3 && make demo        # the teacher, and the demo's pruned student (or --student)
    .venv/bin/python scripts/compare_cross_tokenizer.py [--out runs/cross] [--steps 100]

Data: the Python language reference that ships with Python (`pydoc_data.topics`: 79 topics,
~465k characters of English prose about Python, with code), in records of about 1200
characters. 16 topics, picked by a seeded shuffle, are held out: no run here trains on them.
Three runs with equal steps, data order and settings (alpha 0.5, T = 1): SFT on the text
(the baseline), ULD and the GOLD-style hybrid (kd/cross_tokenizer.py). Then, on the held-out
topics: each student's perplexity per token of its own tokenizer, and teacher's and
students' bits per byte of text (comparable across tokenizers). Writes OUT/results.md.
Stages are skipped when their output exists; a rerun resumes. train.py settings may follow
as --key=value (e.g. --uld_top_k=0 for exact ULD).
"""

from __future__ import annotations

import argparse
import json
import math
import pydoc_data.topics
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: import kd

from kd.data import IGNORE, collate, load_examples  # noqa: E402
from kd.hf import load_model  # noqa: E402
from kd.pipeline import REPO, run_script, run_train, train_overrides, write_text  # noqa: E402
from kd.tokenizer import load_tokenizer  # noqa: E402

HELD_OUT_TOPICS = 16
LOSSES = ("sft", "uld", "gold")


def records(text: str, size: int = 1200) -> list[dict]:
    """{"text"} records of whole paragraphs, about `size` characters each."""
    out, current = [], ""
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if not paragraph:
            continue
        if current and len(current) + len(paragraph) > size:
            out.append({"text": current})
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    return out + ([{"text": current}] if current else [])


def write_data(data: Path) -> None:
    """data/train.jsonl and data/heldout.jsonl from the Python reference, split by topic."""
    names = sorted(pydoc_data.topics.topics)
    random.Random(0).shuffle(names)
    held = set(names[:HELD_OUT_TOPICS])
    split: dict[str, list[dict]] = {"train": [], "heldout": []}
    for name in names:
        split["heldout" if name in held else "train"] += records(pydoc_data.topics.topics[name])
    data.mkdir(parents=True, exist_ok=True)
    for part, rows in split.items():
        write_text(data / f"{part}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


@torch.no_grad()
def held_out_nll(model_dir: Path, data: Path, seq_len: int) -> dict:
    """Summed NLL (nats) of a model over the trained tokens of data/heldout.jsonl in its own
    tokenizer, their count, and the UTF-8 bytes of those records' texts."""
    tokenizer = load_tokenizer(model_dir)
    examples, _ = load_examples(data / "heldout.jsonl", tokenizer, seq_len=seq_len)
    model = load_model(model_dir, dtype=torch.float32).eval()
    nll, tokens = 0.0, 0
    for example in examples:
        batch = collate([example], pad_id=tokenizer.pad_id)
        logits = model(batch["input_ids"])[0]  # (T, V)
        labels = batch["labels"][0]
        nll += F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum").item()
        tokens += int((labels != IGNORE).sum())
    texts = [json.loads(x)["text"] for x in (data / "heldout.jsonl").read_text().splitlines()]
    return {"nll": nll, "tokens": tokens, "bytes": sum(len(t.encode()) for t in texts)}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "cross")
    p.add_argument("--teacher", type=Path, default=REPO / "models" / "gemma3-270m")
    p.add_argument("--student", type=Path, default=REPO / "runs" / "demo" / "student")
    p.add_argument("--steps", type=int, default=100)
    args, rest = p.parse_known_args(argv)
    extra = train_overrides(rest)
    for model in (args.teacher, args.student):
        if not (model / "config.json").is_file():
            raise FileNotFoundError(f"{model}: no model there; `make gemma3` / `make demo` first")
    data = args.out / "data"
    if not (data / "heldout.jsonl").is_file():
        write_data(data)
    common = [f"--student={args.student}", f"--data={data / 'train.jsonl'}", "--eval_data="]
    common += [f"--max_steps={args.steps}", "--batch_size=4", "--seq_len=256", "--lr=5e-4"]
    common += ["--warmup_steps=10", "--alpha=0.5", "--log_every=10", "--save_every=50"]
    common += ["--uld_top_k=256"]
    seconds = {}
    for loss in LOSSES:
        out = args.out / loss
        # SFT runs no teacher; train.py still wants one of the data's tokenizer: the student.
        teacher = args.student if loss == "sft" else args.teacher
        if not (out / "final").is_dir():
            t0 = time.perf_counter()
            run_train(
                [*common, f"--teacher={teacher}", f"--loss={loss}", f"--out={out}", *extra], out
            )
            seconds[loss] = time.perf_counter() - t0
    scores = {"teacher": held_out_nll(args.teacher, data, 256)}
    scores["student before"] = held_out_nll(args.student, data, 256)
    for loss in LOSSES:
        scores[loss] = held_out_nll(args.out / loss / "final", data, 256)
    write_text(args.out / "results.md", report(scores, seconds, args))
    print((args.out / "results.md").read_text())


def report(scores: dict, seconds: dict, args: argparse.Namespace) -> str:
    rows = ["| model | held-out perplexity per token | bits per byte | training s |"]
    rows.append("| --- | ---: | ---: | ---: |")
    for name, s in scores.items():
        ppl = math.exp(s["nll"] / s["tokens"])
        bpb = s["nll"] / math.log(2) / s["bytes"]
        took = f"{seconds[name]:.0f}" if name in seconds else ""
        rows.append(f"| {name} | {ppl:.2f} | {bpb:.3f} | {took} |")
    head = (
        f"Teacher {args.teacher}, student {args.student}, {args.steps} steps of 4 x 256 tokens; "
        "perplexity per token of the model's own tokenizer (the teacher's is not comparable), "
        "bits per byte of the held-out text (comparable).\n\n"
    )
    return head + "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(run_script(main, sys.argv[1:]))
