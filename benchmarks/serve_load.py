"""Load on the search service, over loopback: QPS and latency at 1, 4 and 16 concurrent clients.

  python benchmarks/serve_load.py --items 1000000 --seconds 10 --photo-images 2000

1. Search by id on a synthetic catalog of `--items` (scale.py's clustered 64-bit codes, 512-d features): the
   HTTP p50 at one client beside the in-process `Searcher.search_ids` time for the same queries.
2. Search by photo on a catalog a real (small, randomly initialised) model built over `--photo-images`
   generated images, alone and with one more client adding items all the while.
Each level runs for a fixed time with keep-alive connections (http.client, one per client thread); every
request is counted, failures included. Traffic goes to 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

import common  # noqa: F401  (puts the project on sys.path)
from common import machine


def multipart(fields: dict[str, tuple[str, bytes, str] | str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            filename, data, kind = value
            head = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\nContent-Type: {kind}'
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"', value.encode()
        parts.append(f"--{boundary}\r\n{head}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def client(port: int, make_request, stop: float, latencies: list, failures: list) -> None:
    """Send requests one after another until `stop`, on one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while time.perf_counter() < stop:
        method, path, body, headers = make_request()
        start = time.perf_counter()
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                failures.append(response.status)
        except OSError as error:
            failures.append(str(error))
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        latencies.append(time.perf_counter() - start)
    connection.close()


def load(port: int, make_request, clients: int, seconds: float, background=None) -> dict:
    """`clients` threads for `seconds` (plus, if given, one `background` request maker measured apart)."""
    stop = time.perf_counter() + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list = []
    threads = [threading.Thread(target=client, args=(port, make_request, stop, latencies[c], failures))
               for c in range(clients)]
    writes: list[float] = []
    if background is not None:
        threads.append(threading.Thread(target=client, args=(port, background, stop, writes, failures)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [t for per_client in latencies for t in per_client]
    return dict(clients=clients, requests=len(every), failures=len(failures),
                failure_kinds=sorted({str(f) for f in failures}), qps=len(every) / seconds,
                p50_ms=1000 * statistics.median(every), p99_ms=1000 * float(np.percentile(every, 99)),
                writes=len(writes), write_p50_ms=1000 * statistics.median(writes) if writes else None)


def synthetic_catalog(path: Path, items: int) -> None:
    from scale import build

    build(path, items, 64, 512, 2, "flat")


def photo_catalog(root: Path, images: int) -> tuple[Path, list[bytes]]:
    from engine.build_index import build_index
    from engine.synthetic import make_image_folder
    from training.model import create_model, save_model

    folder = root / "images"
    make_image_folder(folder, per_class=images // 10, size=64, seed=2)
    model = create_model("cifar_convnet", 48, [str(i) for i in range(10)], 64)  # random weights: speed only
    save_model(model, root / "model")
    build_index(folder, root / "model", root / "catalog", shards=2, progress=False)
    queries = make_image_folder(root / "queries", per_class=5, size=64, seed=3, start=10**6)
    return root / "catalog", [q.read_bytes() for q in queries]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--photo-images", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--workdir", help="default: a temporary folder, removed at the end")
    args = parser.parse_args()
    from engine.search import Searcher
    from tests.server_harness import running_server

    work = Path(args.workdir or tempfile.mkdtemp(prefix="latenthash-load-"))
    print(f"machine: {machine()}")
    rows = []
    synthetic = work / "synthetic"
    if not (synthetic / "manifest.json").exists():
        synthetic_catalog(synthetic, args.items)
    rng = random.Random(0)
    query_ids = [rng.randrange(args.items) for _ in range(2000)]
    with Searcher(synthetic, threads=1) as searcher:  # as the server searches
        searcher.search_ids(query_ids[:1], k=10)  # the first search builds the merged index and feature table
        timings = []
        for q in query_ids[:300]:
            start = time.perf_counter()
            searcher.search_ids([q], k=10)
            timings.append(time.perf_counter() - start)
    in_process_ms = 1000 * statistics.median(timings)
    print(f"in-process Searcher.search_ids, k 10, pool 1,000, {args.items:,} items: p50 {in_process_ms:.2f} ms")
    with running_server(synthetic, None, "--read-only") as (base, _):
        port = int(base.rsplit(":", 1)[1])

        def by_id():
            return "GET", f"/search?id={rng.choice(query_ids)}&k=10", None, {}

        load(port, by_id, 1, 2)  # warm-up: the server's first search builds its tables
        for clients in args.clients:
            rows.append(dict(workload=f"search by id, {args.items:,} items", **load(port, by_id, clients, args.seconds)))
            print(json.dumps(rows[-1]), flush=True)
    catalog, photos = photo_catalog(work / "photos", args.photo_images) if not (
        work / "photos" / "catalog" / "manifest.json").exists() else (work / "photos" / "catalog", [
            q.read_bytes() for q in sorted((work / "photos" / "queries").rglob("*.png"))])
    fresh = [0]

    def by_photo():
        body, kind = multipart({"image": ("q.png", rng.choice(photos), "image/png")})
        return "POST", "/search?k=10", body, {"Content-Type": kind}

    def add():
        fresh[0] += 1
        noise = np.random.default_rng(fresh[0]).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        import io

        from PIL import Image
        buffer = io.BytesIO()
        Image.fromarray(noise).save(buffer, format="PNG")
        body, kind = multipart({"image": ("new.png", buffer.getvalue(), "image/png"), "label": "new"})
        return "POST", "/items", body, {"Content-Type": kind}

    copy = work / "photos" / "serving"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(catalog, copy)
    with running_server(copy, None) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        load(port, by_photo, 1, 2)
        for clients in args.clients:
            rows.append(dict(workload="search by photo", **load(port, by_photo, clients, args.seconds)))
            print(json.dumps(rows[-1]), flush=True)
        for clients in args.clients:
            rows.append(dict(workload="search by photo + 1 client adding",
                             **load(port, by_photo, clients, args.seconds, background=add)))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| workload | clients | requests | failed | QPS | p50 ms | p99 ms | adds (p50 ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        adds = f"{r['writes']} ({r['write_p50_ms']:.0f})" if r["writes"] else "-"
        print(f"| {r['workload']} | {r['clients']} | {r['requests']:,} | {r['failures']} | {r['qps']:.1f} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {adds} |")
    print(f"\nin-process search_ids p50: {in_process_ms:.2f} ms; bar for HTTP p50 at 1 client: "
          f"{1.5 * in_process_ms + 1:.2f} ms")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
