"""Start a real `vbatch serve` process on a free loopback port for tests, and stop it."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(args: list[str], log_path: Path, *, startup_timeout: float = 120
                   ) -> Iterator[str]:
    """Run `python -m vbatch.entrypoints.openai.api_server ARGS --port P` and yield its base
    URL once /health answers 200; the process is stopped (SIGTERM, then SIGKILL) after."""
    port = free_port()
    command = [sys.executable, "-m", "vbatch.entrypoints.openai.api_server", *args,
               "--port", str(port), "--log-level", "warning"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited ({process.returncode}):\n"
                                   + log_path.read_text(errors="replace")[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start:\n"
                                   + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def metric(base_url: str, name: str) -> float:
    """The value of an unlabelled sample `name` in the server's /metrics."""
    for line in httpx.get(f"{base_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)
