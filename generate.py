"""Generate text with a kd model: stream one completion, or answer a JSONL file of prompts.

One prompt, streamed to stdout (tokens/s on stderr):
    .venv/bin/python generate.py --model models/smollm2-135m-instruct --chat \
        --prompt "What is the capital of France?" --temperature 0
Batch mode, how response distillation (Kim & Rush 2016, sequence-level KD) has the teacher
write its training data:
    .venv/bin/python generate.py --model DIR --prompts-file in.jsonl --output out.jsonl --chat
Each input line is a JSON object with "prompt" (a string; wrapped in the chat template with
--chat, and --system then adds a system message) or "messages" (a chat, always templated);
each output line is the same object plus "response". Records are answered in order, in
batches appended to OUT.partial; a rerun resumes after the last complete batch and the file
is renamed to OUT only at the end, so OUT never exists half-written. Batch b is sampled with
seed + index of its first record, so a resumed run writes what an uninterrupted one would.
With --dtype bf16 and one row at a time (--prompt, or --batch-size 1) oneDNN is turned off
for the process: its bf16 matrix-vector product is the slower one (see main).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from kd.data import read_jsonl
from kd.dtypes import DTYPES
from kd.hf import load_model
from kd.model import Transformer
from kd.sampling import generate
from kd.tokenizer import Tokenizer, load_tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", required=True, help="HF model directory (config.json, safetensors, tokenizer)"
    )
    p.add_argument("--prompt", help="one prompt, streamed to stdout")
    p.add_argument(
        "--prompts-file", type=Path, help="JSONL of {'prompt': ...} or {'messages': [...]}"
    )
    p.add_argument("--output", type=Path, help="JSONL to write in batch mode")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward in batch mode")
    p.add_argument("--chat", action="store_true", help="wrap 'prompt' in the chat template")
    p.add_argument("--system", help="system message for --chat prompts")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = p.parse_args(argv)
    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompts-file FILE")
    if args.prompts_file is not None and args.output is None:
        raise ValueError("--prompts-file needs --output FILE")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--batch-size and --max-new-tokens must be >= 1")
    return args


def prompt_ids(tokenizer: Tokenizer, record: dict, *, chat: bool, system: str | None) -> list[int]:
    """Token ids of one record: chat-templated ('messages', or 'prompt' with --chat) or raw."""
    if "messages" in record:
        text = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True)
    elif chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": record["prompt"]}
        ]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        return tokenizer.encode(record["prompt"])
    # The template writes any BOS itself; adding special tokens again would double it.
    return tokenizer.encode(text, add_special_tokens=False)


def _is_chat(messages: object) -> bool:
    return isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )


def read_records(path: Path) -> tuple[list[dict], list[str]]:
    """Records of a JSONL file and where each is ("file:line", for errors)."""
    records, places = [], []
    for where, record in read_jsonl(path, what="prompts file"):
        if "messages" in record and not _is_chat(record["messages"]):
            raise ValueError(
                f"{where}: 'messages' must be a list of {{'role': str, 'content': str}}"
            )
        if "messages" not in record and not isinstance(record.get("prompt"), str):
            raise ValueError(f"{where}: needs a string 'prompt' or a list 'messages'")
        records.append(record)
        places.append(where)
    return records, places


def _without_response(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "response"}


def read_partial(partial: Path, records: list[dict]) -> int:
    """How many records a previous run finished; drops a torn last line from a crash."""
    if not partial.exists():
        return 0
    lines = partial.read_bytes().split(b"\n")
    done, keep = 0, 0
    for line in lines[:-1]:  # the part after the last newline is torn (or empty)
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        # An input record may carry its own "response" (a reference answer); ours replaces it.
        expected = records[done] if done < len(records) else None
        if expected is None or _without_response(record) != _without_response(expected):
            raise ValueError(
                f"{partial}: record {done + 1} does not match the prompts file: "
                "delete it to start over"
            )
        done, keep = done + 1, keep + len(line) + 1
    with open(partial, "r+b") as f:
        f.truncate(keep)
    return done


def sampling(args: argparse.Namespace, eos: set[int], pad_id: int) -> dict:
    """The keyword arguments of `generate` that the command line sets."""
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_ids=eos,
        pad_id=pad_id,
    )


def run_file(
    model: Transformer, tokenizer: Tokenizer, args: argparse.Namespace, eos: set[int], pad_id: int
) -> None:
    records, places = read_records(args.prompts_file)
    if args.output.exists():
        raise ValueError(f"{args.output} exists: delete it or choose another --output")
    if not args.output.parent.is_dir():
        raise FileNotFoundError(f"{args.output.parent}: output directory not found")
    ids = [prompt_ids(tokenizer, r, chat=args.chat, system=args.system) for r in records]
    for where, prompt in zip(places, ids):
        if not prompt:
            raise ValueError(f"{where}: the prompt is empty")
    partial = args.output.with_name(args.output.name + ".partial")
    done = start = read_partial(partial, records)
    t0, new_tokens = time.perf_counter(), 0
    with open(partial, "a", encoding="utf-8") as f:
        for first in range(start, len(records), args.batch_size):
            batch = range(first, min(first + args.batch_size, len(records)))
            prompts = [ids[i] for i in batch]
            out = generate(model, prompts, **sampling(args, eos, pad_id), seed=args.seed + first)
            for i, tokens in zip(batch, out):
                response = tokenizer.decode(tokens, skip_special_tokens=True)
                f.write(json.dumps({**records[i], "response": response}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            done, new_tokens = batch.stop, new_tokens + sum(len(t) for t in out)
            elapsed = time.perf_counter() - t0
            eta = elapsed / (done - start) * (len(records) - done)
            rate = f"{new_tokens / elapsed:.1f} tokens/s"
            line = f"\r{done}/{len(records)} records, {rate}, ETA {eta:.0f} s"
            print(line, end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    os.replace(partial, args.output)


def run_one(
    model: Transformer, tokenizer: Tokenizer, args: argparse.Namespace, eos: set[int], pad_id: int
) -> None:
    record = {"prompt": args.prompt}
    ids = prompt_ids(tokenizer, record, chat=args.chat, system=args.system)
    new: list[int] = []
    printed, stopped = "", False

    def on_token(tokens: torch.Tensor) -> None:
        nonlocal printed, stopped
        token = int(tokens[0])  # host-device sync, once per token: we print it right away
        stopped = stopped or token in eos  # after EOS the row only holds padding
        if stopped:
            return
        new.append(token)
        # Decode the whole answer and print what is new: a token can end mid-character, and
        # byte-level BPE then decodes to U+FFFD until the rest of the character arrives.
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            print(text[len(printed) :], end="", flush=True)
            printed = text

    t0 = time.perf_counter()
    out = generate(model, [ids], **sampling(args, eos, pad_id), seed=args.seed, on_token=on_token)
    elapsed = time.perf_counter() - t0
    print(tokenizer.decode(new, skip_special_tokens=True)[len(printed) :], flush=True)
    n = len(out[0])
    print(
        f"{n} tokens in {elapsed:.2f} s: {n / elapsed:.1f} tokens/s (prompt {len(ids)} tokens)",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if not Path(args.model).is_dir():
            raise FileNotFoundError(f"{args.model}: model directory not found")
        tokenizer = load_tokenizer(args.model)
        model = load_model(args.model, dtype=DTYPES[args.dtype]).decode_layout()
        eos = set(tokenizer.eos_token_ids)
        if not eos:
            raise ValueError(f"{args.model}: the tokenizer defines no EOS token")
        if args.dtype == "bf16" and (args.prompt is not None or args.batch_size == 1):
            # A bf16 decode step of one row on a CPU multiplies one vector by every weight
            # matrix. There PyTorch's own bf16 kernel streams the weights ~2x faster than
            # oneDNN's matmul (measured, 1 thread: ~14 vs ~6.5 GB/s of weights); from a few
            # rows on oneDNN is ~3x faster. So one row at a time runs with oneDNN off.
            torch.backends.mkldnn.enabled = False
        pad_id = tokenizer.pad_id
        (run_file if args.prompts_file is not None else run_one)(
            model, tokenizer, args, eos, pad_id
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
