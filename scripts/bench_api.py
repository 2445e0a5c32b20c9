"""Throughput of collecting a served teacher's answers (generate.py --api-base) at 1, 4 and 16
requests in flight, without and with top-k log-probs, against a local llama-cpp-python server.

    .venv/bin/python scripts/bench_api.py [--gguf downloads/SmolLM2-135M-Instruct.Q4_1.gguf]
        [--prompts 32] [--max-new-tokens 32] [--threads 2]

It starts `python -m llama_cpp.server` on 127.0.0.1 (a free port), answers the same prompts
greedily once per row, each into a fresh file, and prints a table: seconds, answers/s,
completion tokens/s and the ratio to one request in flight. Server and client share the
machine's cores, as they would on a laptop; a remote server's numbers depend on it alone.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TOPICS = ["rivers", "bread", "the moon", "chess", "volcanoes", "bees", "trains", "music"]


def start_server(gguf: Path, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf)]
    command += ["--model_alias", "teacher", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--n_ctx", "2048", "--n_threads", str(threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("error: llama_cpp.server did not start (is llama-cpp-python installed?)")


def run_row(url: str, prompts: Path, out: Path, in_flight: int, top_logprobs: int, args) -> dict:
    """generate.py as a child process; its summary line gives the collection's own seconds
    (without Python's start-up) and the server's count of completion tokens."""
    command = [sys.executable, str(REPO / "generate.py"), f"--api-base={url}/v1"]
    command += ["--api-model=teacher", f"--prompts-file={prompts}", f"--output={out}", "--chat"]
    command += ["--temperature=0", f"--max-in-flight={in_flight}"]
    command += [f"--max-new-tokens={args.max_new_tokens}", f"--top-logprobs={top_logprobs}"]
    result = subprocess.run(command, capture_output=True, text=True)
    # "N answers in S s: P prompt tokens, C completion tokens; ..."
    summary = re.search(
        r"(\d+) answers in ([\d.]+) s: \d+ prompt tokens, (\d+) completion", result.stderr
    )
    if result.returncode != 0 or summary is None:
        raise SystemExit(f"error: generate.py failed for in_flight={in_flight}: {result.stderr}")
    return dict(answers=int(summary[1]), seconds=float(summary[2]), tokens=int(summary[3]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, default=Path("downloads/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="the server's threads")
    args = p.parse_args()
    if not args.gguf.is_file():
        raise SystemExit(f"error: {args.gguf} not found: run `make teacher`")
    server, url = start_server(args.gguf, args.threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prompts = Path(tmp) / "prompts.jsonl"
            lines = [
                json.dumps({"prompt": f"Tell me one fact about {TOPICS[i % 8]} (#{i})."})
                for i in range(args.prompts)
            ]
            prompts.write_text("\n".join(lines) + "\n")
            print(f"{args.prompts} chat prompts, greedy, max {args.max_new_tokens} new tokens")
            print("| top-k log-probs | in flight | s | answers/s | tokens/s | vs 1 in flight |")
            print("| ---: | ---: | ---: | ---: | ---: | ---: |")
            for top_logprobs in (0, 20):
                base = None
                for in_flight in (1, 4, 16):
                    out = Path(tmp) / f"out_{top_logprobs}_{in_flight}.jsonl"
                    row = run_row(url, prompts, out, in_flight, top_logprobs, args)
                    rate = row["answers"] / row["seconds"]
                    base = base or rate
                    tokens = row["tokens"] / row["seconds"]
                    print(
                        f"| {top_logprobs} | {in_flight} | {row['seconds']:.1f} | {rate:.2f} "
                        f"| {tokens:.0f} | {rate / base:.2f}x |",
                        flush=True,
                    )
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
