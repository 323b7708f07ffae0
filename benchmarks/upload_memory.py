"""The service's memory under hostile uploads (issue 34 item 2): four concurrent searches with a 9400x9400 RGBA PNG.

  python benchmarks/upload_memory.py [--images 200] [--max-megapixels 100]

Starts `engine.serve` (over a catalog a small, randomly initialised model builds from generated images) on
127.0.0.1, warms it with one ordinary search, records its idle RSS, then fires the four uploads at once and
reports the server's peak RSS over them (VmHWM, reset just before; VmRSS sampled every 5 ms as a check). The bar
is peak < 1.5 x idle. Runs once with the default decode limit (the image is refused from its header) and, with
--max-megapixels, once more with a limit that lets it decode (in strips, one such image at a time). The last line
printed is JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common  # noqa: F401  (puts the project on sys.path)
from common import machine
from serve_load import multipart, photo_catalog

BAR = 1.5


def huge_png() -> bytes:
    """The issue's upload: 9400x9400 RGBA of one colour, ~0.4 MB as a PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGBA", (9400, 9400), (200, 30, 30, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def memory(pid: int, key: str) -> int:
    """VmRSS or VmHWM of a process, in bytes."""
    return int(re.search(rf"{key}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) * 1024


def search(base: str, data: bytes) -> int:
    body, kind = multipart({"image": ("upload.png", data, "image/png")})
    request = urllib.request.Request(f"{base}/search?k=5", data=body, headers={"Content-Type": kind})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def attack(catalog: Path, query: bytes, upload: bytes, clients: int, *options: str) -> dict:
    """Idle and peak RSS of a server while `clients` searches with `upload` run at once."""
    from tests.server_harness import running_server

    with running_server(catalog, None, *options) as (base, server):
        assert search(base, query) == 200  # the model's first inference is part of idling, not of the attack
        time.sleep(1)
        idle = memory(server.pid, "VmRSS")
        Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # VmHWM from here on
        sampled, done = [idle], threading.Event()

        def sample() -> None:
            while not done.is_set():
                sampled.append(memory(server.pid, "VmRSS"))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            statuses = list(pool.map(lambda _: search(base, upload), range(clients)))
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        peak = max(memory(server.pid, "VmHWM"), max(sampled))
    return dict(options=" ".join(options) or "defaults", clients=clients, statuses=statuses,
                seconds=round(seconds, 2), idle_rss_mib=round(idle / 2**20), peak_rss_mib=round(peak / 2**20),
                ratio=round(peak / idle, 3), passed=peak < BAR * idle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="catalog size (default %(default)s)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent uploads (default %(default)s)")
    parser.add_argument("--max-megapixels", type=float, help="a second run with this decode limit")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    upload = huge_png()
    print(f"upload: 9400x9400 RGBA PNG, {len(upload) / 1000:.0f} KB")
    with tempfile.TemporaryDirectory(prefix="latenthash-upload-memory-") as work:
        catalog, queries = photo_catalog(Path(work), args.images)
        runs = [attack(catalog, queries[0], upload, args.clients)]
        print(json.dumps(runs[-1]), flush=True)
        if args.max_megapixels is not None:
            runs.append(attack(catalog, queries[0], upload, args.clients, "--max-megapixels",
                               f"{args.max_megapixels:g}"))
            print(json.dumps(runs[-1]), flush=True)
    print(json.dumps(dict(benchmark="upload_memory", bar=f"peak < {BAR} x idle", machine=machine(), runs=runs)))


if __name__ == "__main__":
    main()
