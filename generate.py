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
OUT.partial.json records what made the partial (model and tokenizer fingerprints, the prompts,
every sampling setting): a rerun with anything else is refused, never mixed in. One process
writes an output at a time (OUT.partial.lock); a second one is refused, naming the first.
A teacher behind an OpenAI-compatible server (vLLM, SGLang, llama.cpp, a hosted model) writes
the same file: --api-base URL --api-model NAME instead of --model (kd/collect.py).
With --dtype bf16 and one row at a time (--prompt, or --batch-size 1) oneDNN is turned off
for the process: its bf16 matrix-vector product is the slower one (see main).
"""

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from kd import collect
from kd.data import read_jsonl
from kd.dtypes import DTYPES
from kd.hf import fingerprint, load_model
from kd.model import Transformer
from kd.outputs import append_lines, claim_output, finish_output, output_error, output_files
from kd.sampling import generate
from kd.tokenizer import Tokenizer, load_tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF model directory (config.json, safetensors, tokenizer)")
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
    collect.add_arguments(p)
    args = p.parse_args(argv)
    if (args.model is None) == (args.api_base is None):
        raise ValueError("give exactly one teacher: --model DIR or --api-base URL")
    if args.api_base is not None:
        collect.check_arguments(args)
    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompts-file FILE")
    if args.prompts_file is not None and args.output is None:
        raise ValueError("--prompts-file needs --output FILE")
    check_numbers(args)
    return args


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric flag in its range, or a one-line error naming it. argparse's float() takes
    'nan' and 'inf', and NaN fails every comparison: so each check is written `not (ok)`."""
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--max-new-tokens", args.max_new_tokens),
    ):
        if not value >= 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    if not args.top_k >= 0:
        raise ValueError(f"--top-k {args.top_k} must be >= 0 (0 turns top-k off)")
    if not abs(args.seed) < 2**63:  # torch seeds are 64-bit
        raise ValueError(f"--seed {args.seed} is too large: use a seed below 2**63")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(
            f"--temperature {args.temperature} is not a finite number >= 0: "
            "use 0 for greedy, or e.g. 0.7"
        )
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(
            f"--top-p {args.top_p} is outside (0, 1]: use 1 to turn nucleus sampling off"
        )


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


def read_partial(partial: Path, records: list[dict], *, batch_size: int) -> int:
    """How many records a previous run finished, in whole batches: drops a torn last line from a
    crash and the records of a batch it did not finish (a batch is sampled as a whole, from
    seed + its first index, so resuming mid-batch would change the answers)."""
    if not partial.exists():
        return 0
    lines = partial.read_bytes().split(b"\n")
    ends = [0]  # ends[n]: bytes of the first n records
    for line in lines[:-1]:  # the part after the last newline is torn (or empty)
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        # An input record may carry its own "response" (a reference answer); ours replaces it.
        done = len(ends) - 1
        expected = records[done] if done < len(records) else None
        if expected is None or _without_response(record) != _without_response(expected):
            raise ValueError(
                f"{partial}: record {done + 1} does not match the prompts file: "
                "delete it to start over"
            )
        ends.append(ends[-1] + len(line) + 1)
    done = len(ends) - 1
    if done < len(records):
        done -= done % batch_size
    if ends[done] < partial.stat().st_size:
        with open(partial, "r+b") as f:
            f.truncate(ends[done])
    return done


def answer_settings(args: argparse.Namespace, tokenizer: Tokenizer, ids: list[list[int]]) -> dict:
    """Everything that decides the answers, as OUT.partial.json records it: a partial output is
    finished only by a run with all of these equal. The batch size is one: it decides which
    records share a batch and so the seed each answer is sampled with."""
    with open(args.prompts_file, "rb") as f:
        prompts = hashlib.file_digest(f, "sha256").hexdigest()
    return {
        "model_fingerprint": fingerprint(args.model),  # config + sampled weights, kd/hf.py
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "prompts_sha256": prompts,
        # The ids the model reads: they also change with the chat template, which neither
        # fingerprint covers (it lives in tokenizer_config.json).
        "prompt_ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
        "chat": args.chat,
        "system": args.system,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
    }


def run_file(
    model: Transformer, tokenizer: Tokenizer, args: argparse.Namespace, eos: set[int], pad_id: int
) -> None:
    records, places = read_records(args.prompts_file)
    ids = [prompt_ids(tokenizer, r, chat=args.chat, system=args.system) for r in records]
    for where, prompt in zip(places, ids):
        if not prompt:
            raise ValueError(f"{where}: the prompt is empty")
    settings = answer_settings(args, tokenizer, ids)
    partial = output_files(args.output)[0]
    try:
        lock, start = claim_output(
            args.output,
            settings,
            source=str(args.model),
            resume=lambda partial: read_partial(partial, records, batch_size=args.batch_size),
        )
        try:
            write_batches(model, tokenizer, args, sampling(args, eos, pad_id), records, ids, start)
            finish_output(args.output)
        finally:
            lock.release()
    except OSError as e:  # a read-only or full folder, ...: one line, finished batches kept
        raise ValueError(output_error(e, partial)) from None


def write_batches(
    model: Transformer,
    tokenizer: Tokenizer,
    args: argparse.Namespace,
    options: dict,
    records: list[dict],
    ids: list[list[int]],
    start: int,
) -> None:
    """Answer records[start:] a batch at a time (`options`: generate's sampling keywords),
    appending each finished batch to OUT.partial, with progress on stderr."""
    partial = output_files(args.output)[0]
    t0, new_tokens, done = time.perf_counter(), 0, start
    try:
        with open(partial, "ab", buffering=0) as f:
            for first in range(start, len(records), args.batch_size):
                batch = range(first, min(first + args.batch_size, len(records)))
                prompts = [ids[i] for i in batch]
                out = generate(model, prompts, **options, seed=args.seed + first)
                lines = []
                for i, tokens in zip(batch, out):
                    response = tokenizer.decode(tokens, skip_special_tokens=True)
                    record = {**records[i], "response": response}
                    lines.append(json.dumps(record, ensure_ascii=False) + "\n")
                append_lines(f, "".join(lines).encode("utf-8"))
                done, new_tokens = batch.stop, new_tokens + sum(len(t) for t in out)
                elapsed = time.perf_counter() - t0
                eta = elapsed / (done - start) * (len(records) - done)
                rate = f"{new_tokens / elapsed:.1f} tokens/s"
                line = f"\r{done}/{len(records)} records, {rate}, ETA {eta:.0f} s"
                print(line, end="", file=sys.stderr, flush=True)
    finally:
        if done > start:  # end the progress line, so that an error is a line of its own
            print(file=sys.stderr)


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
        if args.api_base is not None:  # a served teacher: no model in this process
            records, _ = read_records(args.prompts_file)
            collect.collect(args, records)
            return 0
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
