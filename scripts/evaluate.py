"""Evaluate any student against its teacher on held-out prompts with the teacher's answers.

    .venv/bin/python scripts/evaluate.py --model runs/demo/train/final \
        --teacher models/smollm2-135m-instruct --data runs/demo/data/heldout.jsonl

--data is JSONL of {"prompt", "response"} records whose responses are the teacher's (make them
with `generate.py --model TEACHER --prompts-file prompts.jsonl --output FILE --chat
--temperature 0`), or {"messages"} ending with the teacher's assistant turn. Prints the demo's
table (kd/evaluate.py): token-level KL to the teacher and perplexity on the teacher's
responses, top-1 agreement, Rouge-L F1 of the model's greedy answer against the teacher's,
generation tokens/s. --output FILE.json also saves the numbers and the model's answers.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kd.dtypes import DTYPES, fast_dtype  # noqa: E402
from kd.evaluate import describe_machine, evaluate, format_table, load_eval_set  # noqa: E402
from kd.hf import load_model  # noqa: E402
from kd.tokenizer import load_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", required=True, type=Path, help="HF directory of the model to evaluate"
    )
    p.add_argument(
        "--teacher",
        required=True,
        type=Path,
        help="HF directory of the teacher (its tokenizer is used)",
    )
    p.add_argument(
        "--data", required=True, type=Path, help="JSONL of prompts with the teacher's responses"
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest greedy answer")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch")
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="auto: bf16 on a GPU or where this CPU is faster in it, else fp32",
    )
    p.add_argument(
        "--output", type=Path, help="also write the metrics and answers to this JSON file"
    )
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise ValueError("--max-new-tokens and --batch-size must be >= 1")
    for name in ("model", "teacher"):
        if not (getattr(args, name) / "config.json").is_file():
            raise FileNotFoundError(
                f"--{name} {getattr(args, name)}: no config.json there; give an HF model directory"
            )
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = fast_dtype(device) if args.dtype == "auto" else DTYPES[args.dtype]
        tokenizer = load_tokenizer(args.teacher)
        own_tokenizer = (args.model / "tokenizer.json").is_file()
        if own_tokenizer and load_tokenizer(args.model).fingerprint() != tokenizer.fingerprint():
            raise ValueError(
                f"the tokenizer of {args.model} differs from the teacher's: token-level metrics "
                "need one vocabulary"
            )
        eval_set = load_eval_set(args.data, tokenizer)

        def load(path: Path) -> torch.nn.Module:
            model = load_model(path, dtype=dtype).to(device)
            return model.decode_layout().eval().requires_grad_(False)

        teacher = load(args.teacher)
        model = teacher if args.model.resolve() == args.teacher.resolve() else load(args.model)
        print(
            f"evaluating {args.model} against {args.teacher} "
            f"on {len(eval_set.prompts)} prompts of {args.data} "
            f"({describe_machine(device)}, {str(dtype).removeprefix('torch.')})",
            file=sys.stderr,
        )
        metrics = evaluate(
            model,
            tokenizer,
            eval_set,
            teacher=teacher,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(format_table({str(args.model): metrics}))
    if args.output is not None:
        args.output.write_text(
            json.dumps(metrics, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
