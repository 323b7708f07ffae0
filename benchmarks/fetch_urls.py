"""Photos by URL: how fast build-index fetches them, by the number of connections.

A local server on 127.0.0.1 answers every photo after `--latency` seconds (a CDN's round trip); `fetch_photos`
(what build-index runs for `image_url` rows) fetches `--photos` distinct URLs with each connection count in turn,
interleaved over `--rounds`, into a fresh cache folder each time. Prints photos/s per setting, the ratio to one
connection, and a JSON line last.

  python benchmarks/fetch_urls.py --photos 200 --latency 0.05 --connections 1 8 32 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common import machine

from engine.fetch import EVERY_NETWORK, FetchPolicy, cache_file, fetch_photos
from engine.synthetic import make_image_folder


def photo_server(body: bytes, latency: float) -> ThreadingHTTPServer:
    """A threaded server that answers any path with `body` after `latency` seconds (stopped by the caller)."""

    class Photos(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(latency)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Photos)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the server waits before each photo")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        body = make_image_folder(Path(work) / "images", per_class=1, size=224, seed=0)[0].read_bytes()
        server = photo_server(body, args.latency)
        base = f"http://127.0.0.1:{server.server_address[1]}"
        rates: dict[int, list[float]] = {c: [] for c in args.connections}
        try:
            for round_ in range(args.rounds):
                for connections in args.connections:
                    folder = Path(work) / f"fetched-{round_}-{connections}"
                    urls = [f"{base}/{round_}/{connections}/{n}.png" for n in range(args.photos)]
                    policy = FetchPolicy(connections=connections, allowed_networks=EVERY_NETWORK)
                    start = time.perf_counter()
                    report = fetch_photos(folder, {cache_file(folder, url): url for url in urls}, policy)
                    if report.fetched != args.photos or report.failures:
                        raise SystemExit(f"fetched {report.fetched} of {args.photos}: {report.failures[:3]}")
                    rates[connections].append(args.photos / (time.perf_counter() - start))
        finally:
            server.shutdown()
    print(machine())
    print(f"{args.photos} photos of {len(body):,} bytes, {args.latency * 1000:.0f} ms a photo at the server, "
          f"{args.rounds} rounds interleaved")
    best = {c: max(r) for c, r in rates.items()}
    for connections, samples in rates.items():
        print(f"connections {connections:>3}: {', '.join(f'{r:.1f}' for r in samples)} photos/s; best "
              f"{best[connections]:.1f} = {best[connections] / best[args.connections[0]]:.1f}x")
    print(json.dumps({f"photos_per_s_{c}": round(b, 1) for c, b in best.items()}))


if __name__ == "__main__":
    main()
