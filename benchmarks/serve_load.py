"""Load on the search service, over loopback: QPS and latency at 1, 4 and 16 concurrent clients.

  python benchmarks/serve_load.py --items 1000000 --seconds 10 --photo-images 2000
  python benchmarks/serve_load.py --batching --clients 1 4 8 16 --seconds 8 --rounds 2

1. Search by id on a synthetic catalog of `--items` (scale.py's clustered 64-bit codes, 512-d features): the
   HTTP p50 at one client beside the in-process `Searcher.search_ids` time for the same queries.
2. Search by photo on a catalog a real (small, randomly initialised) model built over `--photo-images`
   generated images, alone and with one more client adding items all the while.
Each level runs for a fixed time with keep-alive connections (http.client, one per client thread); every
request is counted, failures included. Traffic goes to 127.0.0.1 only.

`--batching` measures instead photo searches (issue 37) on three servers up at once over the same photos: today's
(a catalog encoded eager, `--batch-window-ms 0`: each photo encoded alone), the inference path build-index's `auto`
picks on this host, alone, and that path batched (`--window-ms`); a randomly initialised 224-px efficientnet_b0
over `--photo-images` JPEGs, 1600x1200 JPEG queries. At each client count the servers are loaded in turn,
`--rounds` times (A B C A B C ...), so the shared host's swings hit all; latencies are pooled over the rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
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
    every, failures, writes = run_clients(port, make_request, clients, seconds, background)
    return dict(summary(every, failures, clients, seconds),
                writes=len(writes), write_p50_ms=1000 * statistics.median(writes) if writes else None)


def summary(latencies: list[float], failures: list, clients: int, seconds: float) -> dict:
    return dict(clients=clients, requests=len(latencies), failures=len(failures),
                failure_kinds=sorted({str(f) for f in failures}), qps=len(latencies) / seconds,
                p50_ms=1000 * statistics.median(latencies), p99_ms=1000 * float(np.percentile(latencies, 99)))


def run_clients(port: int, make_request, clients: int, seconds: float, background=None
                ) -> tuple[list[float], list, list[float]]:
    """Every request's seconds, the failures, and the background requests' seconds."""
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
    return [t for per_client in latencies for t in per_client], failures, writes


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


def photo_catalogs_224(root: Path, images: int, queries: int) -> tuple[dict[str, Path], list[bytes]]:
    """Two catalogs of the same `images` 400x300 JPEGs by one randomly initialised 224-px efficientnet_b0 (speed
    only), one encoded eager and one by the inference path `auto` picks here, and `queries` 1600x1200 JPEGs to
    search with (indexing.py's photo-like scenes)."""
    from indexing import write_photos

    from engine.build_index import build_index
    from engine.synthetic import CLASSES
    from training.model import create_model, save_model

    catalogs = {path: root / f"catalog-{path}" for path in ("eager", "auto")}
    if not (root / "queries").exists():
        save_model(create_model("efficientnet_b0", 48, list(CLASSES), 224), root / "model")
        write_photos(root / "images", images, 400, 300)
        for path, catalog in catalogs.items():
            build_index(root / "images", root / "model", catalog, shards=2, progress=False, workers=0,
                        inference_path=path)
        write_photos(root / "queries", queries, 1600, 1200)
    return catalogs, [q.read_bytes() for q in sorted((root / "queries").rglob("*.jpg"))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc): what a request costs, whatever else the shared host
    runs (QPS there also measures the scheduler's share, which grows with a process's runnable threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def photos_encoded(base: str) -> tuple[float, float]:
    """(batches, photos) the server's model has encoded in batches so far (its /metrics)."""
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    metric = "latenthash_encode_batch_size"
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith(metric))
    return float(values.get(f"{metric}_count", 0)), float(values.get(f"{metric}_sum", 0))


def compare_batching(work: Path, images: int, clients: list[int], seconds: float, rounds: int,
                     window_ms: float) -> list[dict]:
    """Photo searches on three servers over the same photos, loaded in turn: today's (eager, each photo encoded
    alone), the inference path `auto` picks here alone, and that path batched."""
    from tests.server_harness import running_server

    catalogs, photos = photo_catalogs_224(work / "photos224", images, 16)
    rng = random.Random(1)

    def by_photo():
        body, kind = multipart({"image": ("q.jpg", rng.choice(photos), "image/jpeg")})
        return "POST", "/search?k=10", body, {"Content-Type": kind}

    setups = {"eager, alone": (catalogs["eager"], 0), "auto path, alone": (catalogs["auto"], 0),
              f"auto path, window {window_ms:g} ms": (catalogs["auto"], window_ms)}
    rows = []
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(running_server(catalog, None, "--read-only", "--batch-window-ms",
                                                            str(window)))
                   for name, (catalog, window) in setups.items()}
        ports = {name: int(base.rsplit(":", 1)[1]) for name, (base, _) in servers.items()}
        paths = {name: json.load(urllib.request.urlopen(f"{base}/healthz", timeout=10))["inference_path"]
                 for name, (base, _) in servers.items()}
        for port in ports.values():
            load(port, by_photo, 2, 2)  # warm-up: first calls set up the model's kernels
        for count in clients:
            pooled = {name: ([], [], [0.0], [0.0, 0.0]) for name in servers}
            for _ in range(rounds):
                for name, (base, process) in servers.items():
                    latencies, failures, cpu, batches = pooled[name]
                    cpu_before, encoded_before = cpu_seconds(process.pid), photos_encoded(base)
                    found, failed, _ = run_clients(ports[name], by_photo, count, seconds)
                    cpu[0] += cpu_seconds(process.pid) - cpu_before
                    batches[:] = [total + now - before for total, now, before in
                                  zip(batches, photos_encoded(base), encoded_before)]
                    latencies.extend(found)
                    failures.extend(failed)
            for name, (latencies, failures, cpu, batches) in pooled.items():
                rows.append(dict(workload=f"search by photo, 224 px, {name}", setup=name, path=paths[name],
                                 **summary(latencies, failures, count, seconds * rounds),
                                 server_cpu_ms_per_request=1000 * cpu[0] / max(1, len(latencies)),
                                 mean_batch=batches[1] / batches[0] if batches[0] else 1.0))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def print_batching(rows: list[dict]) -> None:
    """One line per client count and set-up; QPS and server CPU against today's (the first set-up)."""
    print("\n| clients | set-up | inference path | QPS | x today | p50 ms | p99 ms | server CPU ms per search | "
          "x today | mean batch | failed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    today = {}
    for row in rows:
        base = today.setdefault(row["clients"], row)
        print(f"| {row['clients']} | {row['setup']} | {row['path']} | {row['qps']:.1f} | "
              f"{row['qps'] / base['qps']:.2f}x | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
              f"{row['server_cpu_ms_per_request']:.1f} | "
              f"{base['server_cpu_ms_per_request'] / row['server_cpu_ms_per_request']:.2f}x | "
              f"{row['mean_batch']:.2f} | {row['failures']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--photo-images", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--workdir", help="default: a temporary folder, removed at the end")
    parser.add_argument("--batching", action="store_true",
                        help="only photo searches, batched against alone, on a 224-px model (see above)")
    parser.add_argument("--window-ms", type=float, default=5, help="the batched server's --batch-window-ms")
    parser.add_argument("--rounds", type=int, default=2, help="with --batching: turns per client count")
    args = parser.parse_args()
    from engine.search import Searcher
    from tests.server_harness import running_server

    work = Path(args.workdir or tempfile.mkdtemp(prefix="latenthash-load-"))
    print(f"machine: {machine()}")
    if args.batching:
        print_batching(compare_batching(work, args.photo_images, args.clients, args.seconds, args.rounds,
                                        args.window_ms))
        if not args.workdir:
            shutil.rmtree(work)
        return
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
