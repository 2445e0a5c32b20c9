"""tests/fault_proxy.py: each fault as a plain http.client client sees it, in front of a tiny
real upstream (http.server in a thread: POST to any path echoes the request as JSON,
GET /v1/models lists one model).

- with no fault queued, a proxied answer equals the direct one (status, body, headers), and the
  Authorization and Host headers reach the upstream;
- "429" (with Retry-After: 1), "500", "malformed" (invalid JSON) and "refuse" (no response)
  never reach the upstream; "drop" cuts the body short; "slow" outlasts a client's timeout and
  then still reaches the upstream, without a traceback from the proxy;
- faults go first in, first out, and only to POSTs under /v1/; unknown faults are refused;
- an upstream that is down gets 502, and the proxy recovers when it comes back.

Run: `.venv/bin/python -m pytest -q tests/test_fault_proxy.py` (about 2 s).
"""

from __future__ import annotations

import collections
import http.client
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.fault_proxy import FaultProxy

BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).encode()
AUTH = {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as the proxy: no ~40 ms stall per keep-alive request

    def log_message(self, format: str, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path != "/v1/models":
            return self.answer(404, {"error": "not found"})
        self.answer(200, {"object": "list", "data": [{"id": "tiny"}]})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        seen = {k: self.headers[k] for k in ("Authorization", "Host", "Connection")}
        self.answer(200, {"path": self.path, "body": body, "headers": seen})

    def answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Upstream", "echo")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Upstream:
    """The echo server in a thread; stop() and start() again keep the port."""

    def __init__(self) -> None:
        self.port = 0
        self.start()

    def start(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Echo)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        kwargs = {"poll_interval": 0.05}
        threading.Thread(target=self.server.serve_forever, kwargs=kwargs, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream():
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture
def proxy(upstream):
    # slow_seconds=1.0 against client timeouts of 0.3 s: a clear margin, a fast test.
    with FaultProxy(upstream.url, slow_seconds=1.0) as proxy:
        yield proxy


def connect(url: str, timeout: float = 5.0) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def request(conn, method: str = "POST", path: str = "/v1/echo", body: bytes | None = BODY):
    """(status, headers, body) of one request on an open connection."""
    conn.request(method, path, body=body, headers=AUTH if body is not None else {})
    response = conn.getresponse()
    return response.status, dict(response.getheaders()), response.read()


def test_pass_through_equals_direct(upstream, proxy):
    direct, proxied = connect(upstream.url), connect(proxy.url)
    for method, path, body in [("POST", "/v1/echo", BODY), ("GET", "/v1/models", None)]:
        want, got = request(direct, method, path, body), request(proxied, method, path, body)
        assert got[0] == want[0] == 200
        assert got[2] == want[2], (got[2], want[2])
        for name in ("Content-Type", "Content-Length", "X-Upstream", "Server"):
            assert got[1][name] == want[1][name], name
    echoed = json.loads(request(proxied)[2])
    assert echoed["body"] == BODY.decode()
    assert echoed["headers"]["Authorization"] == "Bearer sk-test"
    assert echoed["headers"]["Host"] == f"127.0.0.1:{upstream.port}"
    assert echoed["headers"]["Connection"] is None  # hop-by-hop: not passed on
    assert proxy.counts == collections.Counter(forwarded=2)  # POSTs only
    assert proxy.forwarded_bodies == [BODY, BODY]


@pytest.mark.parametrize("fault,status", [("429", 429), ("500", 500)])
def test_error_statuses_are_not_forwarded(proxy, fault, status):
    proxy.inject(fault)
    got_status, headers, body = request(connect(proxy.url))
    assert got_status == status
    assert "message" in json.loads(body)["error"]
    assert headers.get("Retry-After") == ("1" if fault == "429" else None)
    assert proxy.counts == collections.Counter({fault: 1})
    assert proxy.forwarded_bodies == []


def test_drop_cuts_the_body_short(proxy):
    proxy.inject("drop")
    conn = connect(proxy.url)
    conn.request("POST", "/v1/echo", body=BODY, headers=AUTH)
    response = conn.getresponse()
    assert response.status == 200 and int(response.getheader("Content-Length")) > 0
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        response.read()
    assert proxy.counts == collections.Counter({"drop": 1, "forwarded": 1})


def test_slow_outlasts_the_client_timeout_quietly(proxy, capfd):
    proxy.inject("slow")
    with pytest.raises(TimeoutError):
        request(connect(proxy.url, timeout=0.3))
    assert request(connect(proxy.url))[0] == 200  # meanwhile others pass
    deadline = time.monotonic() + 5.0
    while proxy.counts["forwarded"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # the slow request reaches the upstream after slow_seconds
    time.sleep(0.1)  # and then writes to the closed client socket
    assert proxy.counts == collections.Counter({"slow": 1, "forwarded": 2})
    assert "Traceback" not in capfd.readouterr().err


def test_malformed_is_invalid_json(proxy):
    proxy.inject("malformed")
    status, headers, body = request(connect(proxy.url))
    assert status == 200 and headers["Content-Type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
    assert proxy.forwarded_bodies == []


def test_refuse_closes_without_a_response(proxy):
    proxy.inject("refuse")
    with pytest.raises(ConnectionError):  # http.client.RemoteDisconnected, or a reset
        request(connect(proxy.url))
    assert proxy.counts == collections.Counter(refuse=1)


def test_faults_go_in_order_to_v1_posts_only(proxy):
    proxy.inject("500", "429")
    conn = connect(proxy.url)  # one keep-alive connection for all five requests
    assert request(conn, "GET", "/v1/models", None)[0] == 200  # GETs leave the queue
    assert json.loads(request(conn, path="/health")[2])["path"] == "/health"  # not /v1/
    assert [request(conn)[0] for _ in range(3)] == [500, 429, 200]
    assert proxy.counts == collections.Counter({"500": 1, "429": 1, "forwarded": 2})


def test_unknown_faults_are_refused_whole(proxy):
    with pytest.raises(ValueError, match="unknown faults"):
        proxy.inject("429", "timeout")
    assert request(connect(proxy.url))[0] == 200  # the valid "429" was not queued either
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("http://example.com:8123")


def test_upstream_down_gives_502_then_recovers(upstream, proxy):
    upstream.stop()
    status, _, body = request(connect(proxy.url))
    assert status == 502 and json.loads(body)["error"]["type"] == "bad_gateway"
    upstream.start()  # the same port again
    assert request(connect(proxy.url))[0] == 200
    assert proxy.forwarded_bodies == [BODY]
