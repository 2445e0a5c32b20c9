"""Distilling from a teacher behind an API, against a real server nobody here wrote:
llama-cpp-python's OpenAI-compatible server on 127.0.0.1, serving the SmolLM2 GGUF that
`make teacher` downloads (tests/llama_server.py).

Checks: generate.py --api-base writes what plain requests return (chat and raw completions);
the top-k log-probs it collects map to the SmolLM2 tokenizer and agree with kd's own forward
of the dequantized teacher on the same text; scripts/cache_api.py makes a cache a student
trains from; faults injected by a proxy in front of the server (429 with Retry-After, 500, a
dropped answer, a timeout, malformed JSON, a refused connection, the server killed and
restarted, generate.py itself killed) end with every prompt answered exactly once; a bad key
or an unknown model is one line and no retries; the key is never written.

Run: `.venv/bin/python -m pytest -q tests/test_api_generate.py` (~1 min; skipped, with the
reason, where llama-cpp-python is not installed or the GGUF not downloaded).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from fault_proxy import FaultProxy
from llama_server import KEY, MODEL, LlamaServer, skip_reason

import generate as cli
from kd.hf import load_model
from kd.remote import Client, Endpoint, Request, RetryableError, request_json
from kd.token_bytes import ByteVocab
from kd.tokenizer import load_tokenizer
from tests.tiny_models import make_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    {"prompt": "What is the capital of France?"},
    {"prompt": "Name a fruit."},
    {"prompt": "Say hi.", "id": 7},  # other fields pass through
    {"messages": [{"role": "user", "content": "Count to five."}]},
]
KEY_ENV = "KD_TEST_API_KEY"


@pytest.fixture(scope="module")
def server():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    server = LlamaServer().start()
    yield server
    server.stop()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def write_prompts(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def collect(base: str, prompts: Path, out: Path, *flags: str) -> int:
    """generate.py in this process (its stderr goes to capsys)."""
    return cli.main(
        [
            f"--api-base={base}/v1",
            f"--api-model={MODEL}",
            f"--api-key-env={KEY_ENV}",
            f"--prompts-file={prompts}",
            f"--output={out}",
            *flags,
        ]
    )


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def plain_request(base: str, path: str, body: dict) -> dict:
    """One request as the OpenAI API reference describes it, with no kd code involved."""
    request = urllib.request.Request(
        f"{base}/v1/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_answers_equal_plain_requests(server, key, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    flags = ["--temperature=0", "--max-new-tokens=12", "--seed=3", "--n=2"]
    assert collect(server.url, prompts, tmp_path / "chat.jsonl", "--chat", *flags) == 0
    got = lines(tmp_path / "chat.jsonl")
    assert [{k: v for k, v in g.items() if k != "response"} for g in got] == [
        r for r in PROMPTS for _ in range(2)
    ]
    for i, line in enumerate(got):
        record = PROMPTS[i // 2]
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        body = dict(model=MODEL, messages=messages, max_tokens=12, temperature=0, seed=3 + i)
        reply = plain_request(server.url, "chat/completions", body)
        assert line["response"] == reply["choices"][0]["message"]["content"], i
    # Without --chat a prompt is raw text for /completions.
    raw = write_prompts(tmp_path / "raw.jsonl", [{"prompt": "The capital of France is"}])
    assert collect(server.url, raw, tmp_path / "raw_out.jsonl", *flags[:3], "--stop=.") == 0
    body = dict(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    reply = plain_request(server.url, "completions", {**body, "seed": 3, "stop": ["."]})
    # The stop string was met (the answer ended there, not at max_tokens) and cut off.
    assert reply["choices"][0]["finish_reason"] == "stop" and "." not in reply["choices"][0]["text"]
    assert lines(tmp_path / "raw_out.jsonl")[0]["response"] == reply["choices"][0]["text"]
    for name in ("chat.jsonl", "raw_out.jsonl"):  # the key is never written
        assert KEY not in (tmp_path / name).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "chat.jsonl",
        "p.jsonl",
        "raw.jsonl",
        "raw_out.jsonl",
    ]


# ----------------------------------------------------------------------------- soft targets


@pytest.fixture(scope="module")
def answers(server, tmp_path_factory) -> Path:
    """Sampled chat answers (T = 0.8) with the server's top-8 log-probs per token."""
    path = tmp_path_factory.mktemp("api") / "answers.jsonl"
    prompts = write_prompts(path.with_name("p.jsonl"), PROMPTS[:3])
    os.environ[KEY_ENV] = KEY
    try:
        flags = ["--chat", "--temperature=0.8", "--max-new-tokens=16", "--top-logprobs=8"]
        assert collect(server.url, prompts, path, *flags, "--n=2") == 0
    finally:
        del os.environ[KEY_ENV]
    return path


def test_top_logprobs_agree_with_kd_teacher(answers, teacher_dir):
    """The server's log-probs, mapped to SmolLM2's ids, against kd's fp32 forward of the same
    tokens. The server runs the Q4_1 weights with 8-bit activations; kd the dequantized weights
    in fp32: close, not equal. Measured here: top-1 agreement 0.93, mean |log-prob diff| of
    the sampled token 0.06 (max 0.33) over 96 tokens; at T = 0.8, the sampling temperature,
    the mean diff is larger (0.22): the server reports log-probs at T = 1."""
    tokenizer = load_tokenizer(teacher_dir)
    vocab = ByteVocab.of(tokenizer)
    model = load_model(teacher_dir, dtype=torch.float32)
    same_top1, diffs, diffs_at_sampling_t = [], [], []
    for line in lines(answers):
        assert line["finish_reason"] in ("stop", "length")
        messages = [{"role": "user", "content": line["prompt"]}]  # the server's template adds
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)  # the system
        prompt = tokenizer.encode(text, add_special_tokens=False)
        tokens = line["teacher_logprobs"]
        ids = [vocab.id_of(bytes.fromhex(t[0])) for t in tokens]
        assert None not in ids and b"".join(bytes.fromhex(t[0]) for t in tokens) == line[
            "response"
        ].encode("utf-8")
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids]))[0, len(prompt) - 1 : -1]
        kd_logprobs = torch.log_softmax(logits.double(), -1)  # (n, V) at T = 1
        kd_sampling = torch.log_softmax(logits.double() / 0.8, -1)  # at the sampling T
        for t, (data, logprob, alternatives) in enumerate(tokens):
            best = max((a for a in alternatives if a[0]), key=lambda a: a[1])
            same_top1.append(vocab.id_of(bytes.fromhex(best[0])) == kd_logprobs[t].argmax())
            diffs.append(abs(logprob - kd_logprobs[t, ids[t]].item()))
            diffs_at_sampling_t.append(abs(logprob - kd_sampling[t, ids[t]].item()))
    agreement, mean_diff = sum(same_top1) / len(same_top1), sum(diffs) / len(diffs)
    at_sampling_t = sum(diffs_at_sampling_t) / len(diffs)
    print(f"top-1 agreement {agreement:.3f}, |diff| mean {mean_diff:.3f} max {max(diffs):.3f}")
    print(f"|diff| mean against kd at T = 0.8: {at_sampling_t:.3f}")
    # Bounds with room over the measured 0.93 / 0.06: another CPU's SIMD rounds differently.
    assert agreement >= 0.85, f"top-1 agreement {agreement:.3f} over {len(diffs)} tokens"
    assert mean_diff < 0.12, f"mean |log-prob diff| {mean_diff:.3f}"
    assert mean_diff < at_sampling_t / 2, (mean_diff, at_sampling_t)


def run_script(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def test_a_student_trains_from_the_api_cache(answers, teacher_dir, tmp_path):
    """scripts/cache_api.py keeps the answers (one tokenizer on both sides: only a sampled
    tokenization SmolLM2's tokenizer would not produce is refused), then train.py distills a
    tiny student from the cache with no teacher model: the divergence to the API teacher falls."""
    student = make_tiny_checkpoint(tmp_path / "student", "llama", vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(teacher_dir / name, student / name)
    data, cache = tmp_path / "train.jsonl", tmp_path / "cache"
    args = ["scripts/cache_api.py", f"--answers={answers}", f"--student={student}"]
    args += [f"--data-out={data}", f"--out={cache}", "--seq-len=128", "--teacher-name=smollm2"]
    result = run_script(*args)
    assert result.returncode == 0, result.stderr
    kept = int(result.stdout.split()[0])
    assert kept >= 4 and len(lines(data)) == kept, result.stdout
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["teacher_kind"] == "api" and manifest["k"] >= 7

    train = ["train.py", f"--student={student}", f"--teacher_cache={cache}", f"--data={data}"]
    train += [f"--out={tmp_path / 'run'}", "--max_steps=8", "--seq_len=128", "--batch_size=2"]
    train += ["--lr=1e-2", "--warmup_steps=1", "--precision=fp32", "--log_every=1"]
    train += ["--loss=forward_kl", "--alpha=0.5"]
    result = run_script(*train)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n") if x
    ]
    div = [m["divergence"] for m in metrics if "divergence" in m]
    assert len(div) == 8 and all(map(math.isfinite, div)), div
    # Measured: 6.87 -> 5.40 in 8 steps (a random student of hidden 64 against a 135M teacher).
    assert div[-1] < 0.85 * div[0], f"divergence {div[0]:.3f} -> {div[-1]:.3f}"


# ----------------------------------------------------------------------------- faults


def error_counts(err: str) -> dict[str, int]:
    """The summary line's "failed attempts retried: http 429 1, timeout 2" as a dict."""
    text = err.rsplit("failed attempts retried:", 1)[1].splitlines()[0].strip()
    if text == "none":
        return {}
    return {kind: int(n) for kind, n in (part.rsplit(" ", 1) for part in text.split(", "))}


def test_faults_end_with_every_prompt_answered_once(server, key, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out.jsonl"
    flags = ["--chat", "--n=2", "--temperature=0", "--max-new-tokens=8", "--max-in-flight=2"]
    with FaultProxy(server.url, slow_seconds=7.0) as proxy:
        proxy.inject("429", "500", "drop", "slow", "malformed", "refuse")
        assert collect(proxy.url, prompts, out, *flags, "--timeout=5", "--backoff=0.05") == 0
        served = dict(proxy.counts)
    assert all(served[f] == 1 for f in ("429", "500", "drop", "slow", "malformed", "refuse"))
    got = lines(out)
    assert [{k: v for k, v in g.items() if k != "response"} for g in got] == [
        r for r in PROMPTS for _ in range(2)
    ]
    assert all(g["response"] for g in got)
    counts = error_counts(capsys.readouterr().err)
    for kind in ("http 429", "http 500", "timeout", "bad json", "connection"):
        assert kind in counts, counts
    # The dropped reply is cut after the server answered; on a loaded machine the client's
    # timeout can fire before that, so it may count as a second timeout instead.
    assert counts.get("dropped", 0) + counts["timeout"] >= 2, counts


def test_retry_after_is_honoured_and_mistakes_are_not_retried(server):
    sleeps: list[float] = []
    request = Request("chat/completions", {"model": MODEL, "max_tokens": 2, "temperature": 0})
    request.body["messages"] = [{"role": "user", "content": "Hi"}]
    with FaultProxy(server.url) as proxy:
        client = Client(Endpoint(proxy.url + "/v1", MODEL, KEY), sleep=sleeps.append, backoff=0.5)
        proxy.inject("429", "500")
        assert client.call(request).completion_tokens >= 1
        assert sleeps[0] == 1.0 and 0.0 <= sleeps[1] <= 1.0, sleeps  # Retry-After: 1; 0.5 * 2
        bad_key = Client(Endpoint(proxy.url + "/v1", MODEL, "wrong"), sleep=sleeps.append)
        with pytest.raises(ValueError, match="HTTP 401"):
            bad_key.call(request)
        assert len(sleeps) == 2 and proxy.counts["forwarded"] == 2  # one try, no sleep


def test_bad_key_and_unknown_model_are_one_line(server, tmp_path, capsys, monkeypatch):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:1])
    with FaultProxy(server.url) as proxy:
        monkeypatch.setenv(KEY_ENV, "not-the-key")
        assert collect(proxy.url, prompts, tmp_path / "a.jsonl") == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "HTTP 401" in err and "not-the-key" not in err, err
        monkeypatch.setenv(KEY_ENV, KEY)
        assert collect(proxy.url, prompts, tmp_path / "a.jsonl", "--api-model=nope") == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"does not serve model 'nope'; it serves: {MODEL}" in err
        assert proxy.counts["forwarded"] == 0  # refused before any answer was asked for
        monkeypatch.delenv(KEY_ENV)
        assert collect(proxy.url, prompts, tmp_path / "a.jsonl") == 1
        assert (
            f"--api-key-env {KEY_ENV}: the environment variable is unset" in capsys.readouterr().err
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]  # nothing written


def test_server_killed_mid_run_then_restarted(server, key, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": f"Say {i}."} for i in range(6)])
    out = tmp_path / "out.jsonl"
    partial = out.with_name("out.jsonl.partial")
    flags = ["--chat", "--temperature=0", "--max-new-tokens=16", "--max-in-flight=1"]
    flags += ["--backoff=0.2", "--retries=12", "--timeout=10"]
    with FaultProxy(server.url) as proxy:
        result: list[int] = []
        run = threading.Thread(
            target=lambda: result.append(collect(proxy.url, prompts, out, *flags))
        )
        run.start()
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.read_bytes().count(b"\n") >= 1):
            assert time.monotonic() < deadline and run.is_alive(), "no answer arrived"
            time.sleep(0.05)
        server.stop()
        time.sleep(1.0)
        server.start()
        run.join(timeout=180)
    assert result == [0]
    got = lines(out)
    assert [g["prompt"] for g in got] == [f"Say {i}." for i in range(6)]
    assert "http 502" in error_counts(capsys.readouterr().err)  # the proxy's "server down"


def test_a_killed_run_resumes_without_asking_again(server, tmp_path):
    prompts = write_prompts(
        tmp_path / "p.jsonl", [{"prompt": f"Name {i} colours."} for i in range(6)]
    )
    out = tmp_path / "out.jsonl"
    partial = out.with_name("out.jsonl.partial")
    flags = ["--chat", "--temperature=1", "--max-new-tokens=24", "--max-in-flight=1"]
    command = [sys.executable, "generate.py", f"--api-base={server.url}/v1", f"--api-model={MODEL}"]
    command += [f"--api-key-env={KEY_ENV}", f"--prompts-file={prompts}", f"--output={out}", *flags]
    env = {**os.environ, KEY_ENV: KEY}
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.read_bytes().count(b"\n") >= 2):
        assert time.monotonic() < deadline and process.poll() is None, "no answers arrived"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {
        json.loads(x)["index"]: json.loads(x)["line"] for x in partial.read_text().splitlines()
    }
    with open(partial, "a") as f:
        f.write('{"index": 5, "line": {"prom')  # a line torn by the kill
    with FaultProxy(server.url) as proxy:
        result = subprocess.run(
            [*command[:2], f"--api-base={proxy.url}/v1", *command[3:]], cwd=REPO, env=env
        )
        assert result.returncode == 0
        assert proxy.counts["forwarded"] == 6 - len(before)  # the finished ones are not asked again
    got = lines(out)
    assert [g["prompt"] for g in got] == [f"Name {i} colours." for i in range(6)]
    assert all(got[i] == line for i, line in before.items())
    assert not partial.exists()


def test_a_trickling_reply_times_out():
    """`timeout` bounds the whole request: a server sending a byte every 0.1 s (each read well
    within the timeout) is abandoned once the request has taken longer. No llama server needed."""

    class Trickle(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            with contextlib.suppress(OSError):  # the client hangs up first
                for _ in range(100):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.1)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = Endpoint(f"http://127.0.0.1:{server.server_address[1]}/v1", MODEL, timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(RetryableError) as error:
            request_json(endpoint, "completions", {"prompt": "x"})
        assert error.value.kind == "timeout" and time.monotonic() - t0 < 2.0
    finally:
        server.shutdown()
        server.server_close()
