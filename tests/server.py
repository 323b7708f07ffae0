"""Start the real service (`python -m engine.serve`) on 127.0.0.1 and a free port, for the tests that need one."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(catalog: Path, env: dict, *options: str, timeout: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """(base URL, process) of a server that answers /healthz; it is stopped (SIGTERM, then SIGKILL) afterwards."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "engine.serve", "--catalog", str(catalog), "--port", str(port),
                               *options], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {server.stdout.read()}")
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2) as response:
                    json.loads(response.read())
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        yield base, server
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
