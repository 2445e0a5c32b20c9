"""A served teacher answers a prompts file: response distillation from an API.

    export OPENAI_API_KEY=...     # only for servers that want a key
    .venv/bin/python generate.py --api-base http://127.0.0.1:8000/v1 --api-model NAME \\
        --api-key-env OPENAI_API_KEY --prompts-file prompts.jsonl --output answers.jsonl \\
        --chat --n 2 --temperature 0.7 --max-in-flight 16 [--top-logprobs 20]

OUT is what the local batch mode writes (each input record plus "response", `n` lines per
record, in input order), so train.py's SFT and response-KD configs take it unchanged. Records
with "messages", or "prompt" with --chat, go to /chat/completions (the server applies its own
chat template); other prompts go to /completions as raw text. Answer j of record i is request
i n + j, sampled with seed + i n + j: servers that honour a seed (vLLM, llama.cpp) give a
resumed run the answers an uninterrupted one would have.

With --top-logprobs K each line also holds "teacher_logprobs": per generated token
[token bytes (hex), log-prob, [[alternative bytes (hex), log-prob], ...]] for the K most
likely tokens the server reports, and "finish_reason". scripts/cache_api.py turns these into
a teacher cache for the student's tokenizer (kd/api_cache.py).

Resuming. Requests run in parallel and finish in any order, so answers are appended, one line
and fsync each, to OUT.partial as {"index": ..., "line": ...}; a kill leaves at most a torn
last line, which a rerun cuts off before skipping the answers already there. The finished
OUT is written in input order from the partial, then renamed into place (kd/outputs.py holds
the rules shared with the local mode: settings record, one writer, one-line OS errors).

Tests: `.venv/bin/python -m pytest -q tests/test_api_generate.py` (a real llama-cpp-python
server, behind a fault-injecting proxy).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

from kd.outputs import (
    append_lines,
    claim_output,
    output_error,
    output_files,
    remove_partial,
    write_jsonl_atomically,
)
from kd.remote import Answer, Client, Endpoint, FatalError, Request, RetryableError, key_from_env


def add_arguments(p: argparse.ArgumentParser) -> None:
    """generate.py's flags for a teacher behind an OpenAI-compatible API."""
    api = p.add_argument_group("teacher behind an API (instead of --model)")
    api.add_argument("--api-base", help="server URL, e.g. http://127.0.0.1:8000/v1")
    api.add_argument("--api-model", help="model name the server knows")
    api.add_argument("--api-key-env", help="environment variable holding the API key")
    api.add_argument("--n", type=int, default=1, help="answers per prompt")
    api.add_argument("--stop", action="append", help="stop string (repeat for several)")
    api.add_argument("--top-logprobs", type=int, default=0, help="K log-probs per token (0: none)")
    api.add_argument("--max-in-flight", type=int, default=4, help="requests open at once")
    api.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    api.add_argument("--retries", type=int, default=8, help="retries per request")
    api.add_argument("--backoff", type=float, default=1.0, help="first retry waits up to this (s)")


def check_arguments(args: argparse.Namespace) -> None:
    """One-line errors for API flags that cannot work."""
    if not args.api_model:
        raise ValueError("--api-base needs --api-model NAME (the model the server serves)")
    if args.prompts_file is None:
        raise ValueError("--api-base answers a --prompts-file (no streaming of one --prompt)")
    for flag, value, low in (
        ("--n", args.n, 1),
        ("--max-in-flight", args.max_in_flight, 1),
        ("--retries", args.retries, 0),
        ("--top-logprobs", args.top_logprobs, 0),
    ):
        if not value >= low:
            raise ValueError(f"{flag} {value} must be >= {low}")
    for flag, value in (("--timeout", args.timeout), ("--backoff", args.backoff)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} {value} must be a number of seconds > 0")


def build_request(record: dict, seed: int, args: argparse.Namespace) -> Request:
    """The API call of one answer: chat for messages (or --chat), else raw completion."""
    body = {
        "model": args.api_model,
        "max_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": seed,
        "n": 1,
    }
    if args.top_k:  # not OpenAI's, but vLLM, SGLang and llama.cpp take it
        body["top_k"] = args.top_k
    if args.stop:
        body["stop"] = args.stop
    if "messages" in record or args.chat:
        messages = record.get("messages") or [
            *([{"role": "system", "content": args.system}] if args.system else []),
            {"role": "user", "content": record["prompt"]},
        ]
        if args.top_logprobs:
            body.update(logprobs=True, top_logprobs=args.top_logprobs)
        return Request("chat/completions", {**body, "messages": messages})
    if args.top_logprobs:
        body["logprobs"] = args.top_logprobs
    return Request("completions", {**body, "prompt": record["prompt"]})


def api_settings(args: argparse.Namespace) -> dict:
    """Everything that decides the answers, as OUT.partial.json records it (the key: never).
    Not the server's address: the same model behind another one (a restarted server on a new
    port, a proxy, a load balancer) may finish a partial."""
    with open(args.prompts_file, "rb") as f:
        prompts = hashlib.file_digest(f, "sha256").hexdigest()
    names = ("api_model", "chat", "system", "n", "max_new_tokens", "temperature")
    more = ("top_k", "top_p", "stop", "seed", "top_logprobs")
    return {"prompts_sha256": prompts, **{k: getattr(args, k) for k in names + more}}


def output_line(record: dict, answer: Answer, *, logprobs: bool) -> dict:
    """One line of OUT: the input record, the answer, and the log-probs if asked for."""
    line = {**record, "response": answer.text}
    if logprobs:
        line["finish_reason"] = answer.finish_reason
        line["teacher_logprobs"] = [
            [t.data.hex(), t.logprob, [[b.hex(), lp] for b, lp in t.top]]
            for t in answer.tokens or ()
        ]
    return line


ADDED = ("response", "finish_reason", "teacher_logprobs")  # keys an answer adds to its record


def _input(record: dict) -> dict:
    """A record without the keys an answer adds (an input may carry a reference response)."""
    return {k: v for k, v in record.items() if k not in ADDED}


def read_answers(partial: Path, records: list[dict], n: int) -> dict[int, dict]:
    """The answers a previous run appended, by request index; cuts a torn last line off the
    file. A damaged line, or an answer to another prompt than the file's, is a one-line error
    (never a silent truncation: the answers cost API calls)."""
    data = partial.read_bytes()
    done: dict[int, dict] = {}
    end = 0  # bytes of whole lines
    # Each answer is appended as one write: only the part after the last newline can be torn.
    for number, raw in enumerate(data.split(b"\n")[:-1], 1):
        try:
            entry = json.loads(raw)
            index, line = int(entry["index"]), entry["line"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"{partial}: line {number} is not an answer record; delete the file to start over"
            ) from None
        if not 0 <= index < len(records) * n or _input(line) != _input(records[index // n]):
            raise ValueError(
                f"{partial}: answer {index} does not belong to the prompts file: "
                "delete it to start over"
            )
        done[index] = line
        end += len(raw) + 1
    if end < len(data):
        with open(partial, "r+b") as f:
            f.truncate(end)
    return done


class Progress:
    """One line on stderr: answers, requests/s, tokens/s, errors, time left."""

    def __init__(self, total: int, done: int, client: Client) -> None:
        self.total, self.start_done, self.client = total, done, client
        self.t0 = time.perf_counter()

    def show(self, done: int) -> None:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = (done - self.start_done) / elapsed
        tokens = self.client.usage["completion_tokens"] / elapsed
        errors = sum(self.client.errors.values())
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        print(
            f"\r{done}/{self.total} answers, {rate:.2f} requests/s, {tokens:.0f} tokens/s, "
            f"{errors} errors, ETA {eta:.0f} s",
            end="",
            file=sys.stderr,
            flush=True,
        )


def summary(client: Client, answered: int, seconds: float) -> str:
    usage, errors = client.usage, client.errors
    retried = ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none"
    return (
        f"{answered} answers in {seconds:.1f} s: {usage['prompt_tokens']} prompt tokens, "
        f"{usage['completion_tokens']} completion tokens; failed attempts retried: {retried}"
    )


def finish(out: Path, answers: dict[int, dict]) -> None:
    """Write OUT in input order from the answers, then remove the partial's files: the
    partial stays until OUT is whole."""
    write_jsonl_atomically(out, [answers[index] for index in sorted(answers)])
    remove_partial(out)


def collect(args: argparse.Namespace, records: list[dict]) -> None:
    """Answer every record `args.n` times through the API into args.output."""
    endpoint = Endpoint(
        args.api_base, args.api_model, key_from_env(args.api_key_env), timeout=args.timeout
    )
    client = Client(
        endpoint, max_in_flight=args.max_in_flight, retries=args.retries, backoff=args.backoff
    )
    client.check_model()  # a bad key or model: one line before any work
    partial = output_files(args.output)[0]
    settings = api_settings(args)
    answers: dict[int, dict] = {}

    def resume(path: Path) -> int:
        answers.update(read_answers(path, records, args.n))
        return len(answers)

    try:
        lock, _ = claim_output(args.output, settings, source=args.api_base, resume=resume)
        try:
            _run(client, args, records, answers)
            finish(args.output, answers)
        finally:
            lock.release()
    except OSError as e:
        raise ValueError(output_error(e, partial)) from None
    except (RetryableError, FatalError) as e:
        kept = f"; the {len(answers)} answers so far are kept in {partial}, a rerun resumes"
        raise ValueError(f"{e}{kept}") from None


def _run(client: Client, args: argparse.Namespace, records: list[dict], answers: dict) -> None:
    total = len(records) * args.n
    todo = (
        (i, build_request(records[i // args.n], args.seed + i, args))
        for i in range(total)
        if i not in answers
    )
    progress, t0, start = Progress(total, len(answers), client), time.perf_counter(), len(answers)
    try:
        with open(output_files(args.output)[0], "ab", buffering=0) as f:
            for index, answer in client.map(todo):
                line = output_line(records[index // args.n], answer, logprobs=args.top_logprobs > 0)
                entry = {"index": index, "line": line}
                append_lines(f, (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
                answers[index] = line
                progress.show(len(answers))
    finally:
        if len(answers) > start:
            print(file=sys.stderr)
        print(summary(client, len(answers) - start, time.perf_counter() - t0), file=sys.stderr)
