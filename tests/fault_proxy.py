"""A fault-injecting HTTP proxy for tests of a client's retries against a real server.

`FaultProxy(upstream)` listens on 127.0.0.1 and passes every request through to `upstream`
(an OpenAI-compatible server on loopback, e.g. llama-cpp-python's), except that each POST to a
path under /v1/ first takes one fault from a queue filled by `inject` (first in, first out):

    "429"        answer 429 with `Retry-After: 1` and a JSON error; not forwarded
    "500"        answer 500 with a JSON error; not forwarded
    "drop"       forward, send the upstream's status line and headers (its Content-Length)
                 and half the body, then close: the client's read comes up short
    "slow"       sleep `slow_seconds`, then forward (the client's timeout should fire first)
    "malformed"  answer 200, application/json, with truncated JSON; not forwarded
    "refuse"     close the connection without a response

GETs, other paths and POSTs with the queue empty pass through untouched. An upstream that is
down (or fails mid-answer) gets 502, so a test can stop and restart the server behind the proxy.
`counts` tells how many of each fault were served, and "forwarded" how many POSTs reached the
upstream; `forwarded_bodies` holds those POSTs' bodies. Standard library only; responses are
read whole and sent with Content-Length (a streamed answer arrives in one piece).

    with FaultProxy("http://127.0.0.1:8123", slow_seconds=1.0) as proxy:
        proxy.inject("429", "drop")
        ...  # point the client at proxy.url; then check proxy.counts
"""

from __future__ import annotations

import collections
import http.client
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("429", "500", "drop", "slow", "malformed", "refuse")
# RFC 9110 7.6.1: meaningful only for one connection, so never passed on.
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
JSON = ("Content-Type", "application/json")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MALFORMED = b'{"id": "chatcmpl-fault", "object": "chat.completion", "choices": [{"message": {"con'


def _error(message: str, kind: str) -> bytes:
    """An OpenAI-style error body."""
    return json.dumps({"error": {"message": message, "type": kind}}).encode()


class FaultProxy:
    def __init__(
        self, upstream: str, *, slow_seconds: float = 3.0, upstream_timeout: float = 300.0
    ):
        parts = urllib.parse.urlsplit(upstream)
        host = parts.hostname or ""
        if parts.scheme != "http" or host not in LOOPBACK:
            raise ValueError(f"upstream must be http:// on loopback (127.0.0.1), got {upstream!r}")
        self.upstream, self.host, self.port = upstream, host, parts.port or 80
        self.netloc = parts.netloc  # the Host header the upstream expects
        self.slow_seconds = slow_seconds  # seconds a "slow" request waits before forwarding
        self.upstream_timeout = upstream_timeout  # seconds; generous, a CPU server is slow
        self.counts: collections.Counter = collections.Counter()
        self.forwarded_bodies: list[bytes] = []
        self._faults: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()  # guards the queue, counts and forwarded_bodies
        self._server: ThreadingHTTPServer | None = None
        self.url = ""  # "http://127.0.0.1:PORT" once started

    def start(self) -> FaultProxy:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # port 0: a free one
        self._server.proxy = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        kwargs = {"poll_interval": 0.05}  # so that stop() returns within ~50 ms
        threading.Thread(target=self._server.serve_forever, kwargs=kwargs, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def inject(self, *faults: str) -> None:
        unknown = [f for f in faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; choose from {list(FAULTS)}")
        with self._lock:
            self._faults.extend(faults)

    def _next_fault(self) -> str | None:
        with self._lock:
            if not self._faults:
                return None
            fault = self._faults.popleft()
            self.counts[fault] += 1
            return fault

    def _record(self, body: bytes) -> None:
        with self._lock:
            self.forwarded_bodies.append(body)
            self.counts["forwarded"] += 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, every response with a Content-Length
    # Headers and body go out in two writes: without TCP_NODELAY the second waits ~40 ms for
    # the client's delayed ACK on a keep-alive connection (Nagle's algorithm).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args) -> None:
        pass  # quiet: tests read counts, not an access log

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, TimeoutError):
            pass  # the client went away (its timeout fired, or a fault cut it off): expected

    def do_GET(self) -> None:
        self._forward(None)

    def do_POST(self) -> None:
        if "Transfer-Encoding" in self.headers:  # chunked uploads: not needed by JSON clients
            self.close_connection = True
            return self._send(411, [JSON], _error("send a Content-Length", "length_required"))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        proxy = self.server.proxy
        fault = proxy._next_fault() if self.path.startswith("/v1/") else None
        if fault == "429":
            body = _error("rate limited (injected by FaultProxy)", "rate_limit_error")
            self._send(429, [JSON, ("Retry-After", "1")], body)
        elif fault == "500":
            self._send(500, [JSON], _error("server error (injected by FaultProxy)", "server_error"))
        elif fault == "malformed":
            self._send(200, [JSON], MALFORMED)
        elif fault == "refuse":
            self.close_connection = True  # no response at all: the client sees EOF
        else:
            if fault == "slow":
                time.sleep(proxy.slow_seconds)
            self._forward(body, drop=fault == "drop")

    def _forward(self, body: bytes | None, *, drop: bool = False) -> None:
        proxy = self.server.proxy
        conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=proxy.upstream_timeout)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP | {"host", "content-length"}:
                    conn.putheader(name, value)
            conn.putheader("Host", proxy.netloc)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as err:  # refused, reset, cut short
            message = f"upstream {proxy.upstream} failed: {err!r}"
            return self._send(502, [JSON], _error(message, "bad_gateway"))
        finally:
            conn.close()
        if body is not None:
            proxy._record(body)
        self._send(response.status, response.getheaders(), data, reason=response.reason, drop=drop)

    def _send(
        self, status: int, headers: list, data: bytes, *, reason: str | None = None, drop=False
    ) -> None:
        """Status line, headers (less hop-by-hop ones), Content-Length, and the body or, with
        `drop`, its first half and then the end of the connection."""
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP | {"content-length"}:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if drop:
            self.close_connection = True  # then finish() shuts the socket: a short read
            data = data[: len(data) // 2]
        self.wfile.write(data)
