"""A real `python -m engine.serve` for tests and benchmarks: started on 127.0.0.1 and a free port, stopped after."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(base: str, server: subprocess.Popen, timeout: float) -> None:
    """Poll /healthz until it answers; RuntimeError if the server exits first, the OSError after `timeout`."""
    deadline = time.time() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2) as response:
                json.loads(response.read())
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.3)


@contextmanager
def running_server(catalog: str | os.PathLike, env: dict | None, *options: str, log: str | os.PathLike | None = None,
                   timeout: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """(base URL, process) of `python -m engine.serve` once it answers /healthz; stopped (SIGTERM, then SIGKILL)
    afterwards. Its output goes to `log` (default: nowhere), never to a pipe nobody reads, which would stop the
    server once the pipe is full."""
    port = free_port()
    with open(log or os.devnull, "w") as output:
        server = subprocess.Popen([sys.executable, "-m", "engine.serve", "--catalog", str(catalog), "--port",
                                   str(port), *options], env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(base, server, timeout)
            yield base, server
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
