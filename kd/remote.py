"""Teachers behind an API: a client for OpenAI-compatible HTTP servers.

vLLM, SGLang, llama.cpp's server, llama-cpp-python's server and hosted APIs all answer
`POST {base}/chat/completions` (a conversation; the server applies its chat template) and
`POST {base}/completions` (raw text). A teacher there is often far larger than anything that
fits beside the student, so kd collects its answers (and, where the server returns them, its
top-k log-probs) over HTTP, then trains from the files (generate.py --api-base; README).

    endpoint = Endpoint("http://127.0.0.1:8000/v1", "Qwen/Qwen3-32B", api_key=key)
    client = Client(endpoint, max_in_flight=16)
    client.check_model()                       # a bad key or an unknown model: one line, now
    for index, answer in client.map(requests):  # answers in the order they finish
        ...

Failures. A request is retried on 408, 429 and 5xx, on a refused, reset or dropped
connection, on a timeout and on a body that is not the JSON an answer needs; attempt a waits
the server's Retry-After when it sends one, else a uniform draw from [0, min(cap, base 2^a)]
seconds ("full jitter": clients that failed together do not retry together). Any other status
(400 a bad request, 401/403 a bad key, 404 an unknown model or path, 422) is the caller's
mistake: `FatalError`, one line, never retried. `timeout` bounds the whole request: each
socket operation (connecting, each read) waits at most that long, and a reply still arriving
after it, a trickle from an overloaded server, is abandoned as a timeout too.

The key: from an environment variable the user names (`key_from_env`), sent as
`Authorization: Bearer ...`; it is never printed, logged or written to a file (`Endpoint`'s
repr hides it, and error messages quote only the server's reply).

Tests: `.venv/bin/python -m pytest -q tests/test_remote.py` (a real llama-cpp-python server).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

RETRIED_STATUS = {408, 429}  # and every 5xx


class FatalError(ValueError):
    """A request the server refuses for good (bad key, unknown model, bad request): no retry."""


class RetryableError(Exception):
    """One failed attempt that may succeed later; `kind` names it in the error counts."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


@dataclass(frozen=True)
class Endpoint:
    """Where the teacher is: base URL (ending in /v1 for most servers), model name, key."""

    base: str
    model: str
    api_key: str | None = field(default=None, repr=False)  # never shown
    timeout: float = 120.0  # seconds per request

    def url(self, path: str) -> str:
        return self.base.rstrip("/") + "/" + path.lstrip("/")


def key_from_env(name: str | None) -> str | None:
    """The API key held by environment variable `name` (None: no key); one line if it is unset."""
    if not name:
        return None
    key = os.environ.get(name)
    if not key:
        raise ValueError(f"--api-key-env {name}: the environment variable is unset or empty")
    return key


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _server_message(body: bytes) -> str:
    """The error message a server put in its body (OpenAI: {"error": {"message": ...}})."""
    try:
        error = json.loads(body).get("error", {})
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    text = str(message) if message else body.decode("utf-8", "replace")
    return " ".join(text.split())[:300]  # one line, bounded


def request_json(endpoint: Endpoint, path: str, body: dict | None = None) -> dict:
    """One HTTP attempt: POST `body` (GET without one) and return the JSON reply.
    Raises RetryableError or FatalError; never retries itself."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(endpoint.url(path), data=data, headers=headers)
    try:
        deadline = time.monotonic() + endpoint.timeout
        with urllib.request.urlopen(request, timeout=endpoint.timeout) as response:
            raw = _read_until(response, deadline)
    except urllib.error.HTTPError as e:
        status, message = e.code, _server_message(e.read())
        where = f"{endpoint.url(path)}: HTTP {status}"
        if status in RETRIED_STATUS or status >= 500:
            after = _retry_after(e.headers.get("Retry-After"))
            raise RetryableError(f"http {status}", f"{where}: {message}", after) from None
        raise FatalError(f"{where}: {message}") from None
    except (TimeoutError, http.client.IncompleteRead, ConnectionError) as e:
        raise RetryableError(_kind(e), f"{endpoint.url(path)}: {e!r}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError):
            raise RetryableError("timeout", f"{endpoint.url(path)}: timed out") from None
        raise RetryableError("connection", f"{endpoint.url(path)}: {reason}") from None
    try:
        reply = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RetryableError("bad json", f"{endpoint.url(path)}: reply is not JSON") from None
    if not isinstance(reply, dict):
        raise RetryableError("bad json", f"{endpoint.url(path)}: reply is not a JSON object")
    return reply


def _read_until(response: http.client.HTTPResponse, deadline: float) -> bytes:
    """The whole body, read in pieces; TimeoutError once the deadline has passed, IncompleteRead
    if the connection ends before the body does."""
    parts = []
    while piece := response.read1(1 << 16):  # what one socket read brings
        parts.append(piece)
        if time.monotonic() > deadline:
            raise TimeoutError("the reply took longer than the timeout")
    if response.length:  # Content-Length promised more: the connection dropped mid-reply
        raise http.client.IncompleteRead(b"".join(parts), response.length)
    return b"".join(parts)


def _kind(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, http.client.IncompleteRead):
        return "dropped"
    return "connection"


# ----------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class Token:
    """One generated token: its bytes, its log-prob, and the top-k alternatives (bytes, log-prob)
    as the server ranked them (the sampled token may be among them, or not)."""

    data: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...]


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str  # "stop" (an end of turn or stop string), "length" (max_tokens), ...
    prompt_tokens: int
    completion_tokens: int
    tokens: tuple[Token, ...] | None  # with log-probs asked for, else None


def _token_bytes(entry: dict) -> bytes:
    """A token's bytes: the "bytes" field (OpenAI chat format) where given, else its text."""
    data = entry.get("bytes")
    return bytes(data) if data is not None else entry["token"].encode("utf-8")


def _chat_tokens(logprobs: dict) -> tuple[Token, ...]:
    """Chat format: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}."""
    return tuple(
        Token(
            _token_bytes(t),
            float(t["logprob"]),
            tuple((_token_bytes(a), float(a["logprob"])) for a in t.get("top_logprobs") or ()),
        )
        for t in logprobs.get("content") or ()
    )


def _completion_tokens(logprobs: dict) -> tuple[Token, ...]:
    """Completions format: {"tokens": [...], "token_logprobs": [...], "top_logprobs":
    [{text: logprob}, ...]}: texts only, no bytes."""
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
    return tuple(
        Token(
            text.encode("utf-8"),
            float(lp),
            tuple((a.encode("utf-8"), float(b)) for a, b in (top or {}).items()),
        )
        for text, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops)
    )


def parse_answer(reply: dict, *, chat: bool, logprobs: bool) -> Answer:
    """The first choice of a chat or completions reply; RetryableError("bad json") if the reply
    lacks what an answer needs (a server mid-crash can send a well-formed but empty body)."""
    try:
        choice = reply["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        tokens = None
        if logprobs:
            parse = _chat_tokens if chat else _completion_tokens
            tokens = parse(choice["logprobs"])
        usage = reply.get("usage") or {}
        return Answer(
            text=text or "",
            finish_reason=str(choice.get("finish_reason")),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            tokens=tokens,
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise RetryableError("bad json", f"reply without an answer ({e!r})") from None


# ----------------------------------------------------------------------------- the client


@dataclass(frozen=True)
class Request:
    """One API call: `path` ("chat/completions" or "completions") and its JSON body."""

    path: str
    body: dict

    @property
    def chat(self) -> bool:
        return self.path == "chat/completions"


class Client:
    """Bounded parallel requests with retries; counts errors and sums usage (thread-safe)."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        max_in_flight: int = 4,
        retries: int = 8,
        backoff: float = 1.0,
        backoff_cap: float = 60.0,
        seed: int = 0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.endpoint = endpoint
        self.max_in_flight = max_in_flight
        self.retries, self.backoff, self.backoff_cap = retries, backoff, backoff_cap
        self.errors: Counter[str] = Counter()  # failed attempts by kind ("http 429", "timeout")
        self.usage: Counter[str] = Counter()  # prompt_tokens, completion_tokens, requests
        self._rng = random.Random(seed)
        self._sleep = sleep
        self._lock = threading.Lock()

    def _delay(self, attempt: int, error: RetryableError) -> float:
        if error.retry_after is not None:
            return min(error.retry_after, self.backoff_cap)
        with self._lock:
            return self._rng.uniform(0.0, min(self.backoff_cap, self.backoff * 2**attempt))

    def call(self, request: Request) -> Answer:
        """One answer, retried as the module docstring says; the last failure is raised as a
        RetryableError once `retries` retries are spent."""
        logprobs = bool(request.body.get("logprobs"))
        for attempt in range(self.retries + 1):
            try:
                reply = request_json(self.endpoint, request.path, request.body)
                answer = parse_answer(reply, chat=request.chat, logprobs=logprobs)
            except RetryableError as e:
                with self._lock:
                    self.errors[e.kind] += 1
                if attempt == self.retries:
                    raise
                self._sleep(self._delay(attempt, e))
                continue
            with self._lock:
                self.usage["requests"] += 1
                self.usage["prompt_tokens"] += answer.prompt_tokens
                self.usage["completion_tokens"] += answer.completion_tokens
            return answer
        raise AssertionError("unreachable")

    def check_model(self) -> None:
        """GET /models once: a bad key or a model the server does not serve is a FatalError
        before any work. Servers without the route (404) or an unreadable list pass."""
        try:
            reply = request_json(self.endpoint, "models")
        except FatalError as e:
            if "HTTP 404" in str(e):
                return
            raise
        except RetryableError as e:
            raise FatalError(f"cannot reach the server: {e}") from None
        served = [m.get("id") for m in reply.get("data") or () if isinstance(m, dict)]
        if served and self.endpoint.model not in served:
            shown = ", ".join(map(str, served[:10])) + (" ..." if len(served) > 10 else "")
            raise FatalError(
                f"{self.endpoint.url('models')}: the server does not serve model "
                f"{self.endpoint.model!r}; it serves: {shown}"
            )

    def map(self, requests: Iterable[tuple[int, Request]]) -> Iterator[tuple[int, Answer]]:
        """(index, answer) for each (index, request), in the order answers finish, with at most
        `max_in_flight` requests open. On an error no new request starts; the answers of those
        in flight are still yielded, then the first error is raised."""
        todo = iter(requests)
        with ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="api") as pool:
            running: dict[Future, int] = {}
            failure: BaseException | None = None
            while True:
                while failure is None and len(running) < self.max_in_flight:
                    item = next(todo, None)
                    if item is None:
                        break
                    running[pool.submit(self.call, item[1])] = item[0]
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = running.pop(future)
                    if future.exception() is not None:
                        failure = failure or future.exception()
                    else:
                        yield index, future.result()
            if failure is not None:
                raise failure
