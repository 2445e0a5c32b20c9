"""A real OpenAI-compatible server for tests: llama-cpp-python's, serving the teacher's GGUF.

`LlamaServer(gguf).start()` runs `python -m llama_cpp.server` on 127.0.0.1 (a free port, two
threads, model alias "smollm2", API key `KEY`) and waits until /v1/models answers; `stop()`
kills it and `start()` brings it back on the same port (a server killed mid-run, restarted).
`skip_reason()` says why no server can run here (llama-cpp-python not installed, or the GGUF
not downloaded), for pytest.skip; `make test` installs the one and downloads the other.

    server = LlamaServer(GGUF).start()
    ...  # http://127.0.0.1:{server.port}/v1, header "Authorization: Bearer " + KEY
    server.stop()
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GGUF = REPO / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # scripts/fetch_teacher.sh
KEY = "kd-test-key"  # the key tests send; never a real one
MODEL = "smollm2"


def skip_reason() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (scripts/setup_env.sh builds it)"
    if not GGUF.is_file():
        return f"{GGUF} is missing: run `make teacher`"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, gguf: Path = GGUF) -> None:
        self.gguf = gguf
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> LlamaServer:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf)]
        command += ["--model_alias", MODEL, "--api_key", KEY, "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--n_ctx", "2048", "--n_threads", "2"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.process.returncode}")
            try:
                request = urllib.request.Request(
                    f"{self.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}
                )
                with urllib.request.urlopen(request, timeout=2) as response:
                    json.loads(response.read())
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer within {timeout} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
