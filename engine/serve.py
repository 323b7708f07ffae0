"""Serve a catalog over HTTP: `python -m engine.serve --catalog DIR [--host 127.0.0.1] [--port 8000]`.

A thin layer over `engine.search.Searcher` (one query path for the CLI and the service): search by photo or by
item id with exact label and metadata filters, item lookup and images, crash-safe adds and deletes, health and
Prometheus metrics, and a web page at `/`. The model and catalog are loaded once; searches run concurrently in
the server's thread pool (Faiss and torch release the GIL), writes one at a time through the catalog's batches.
This module is the command; the application is `engine.api`, imported once the server starts.

Built for an open network: a request body stops being read at the upload limit, an image over the decode limit
is refused from its header and decodes in flight are bounded (training.images), metadata must be finite and
shallow (engine.metadata), a photo added by URL is fetched only from public addresses unless --allow-private-urls
(engine.fetch), a full disk answers 507 and leaves no partial photo, and SIGTERM waits at most
--shutdown-timeout for requests in flight. Every client mistake answers {"error": "one line"}.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import signal
import sys

from engine.cli import bounded_float, bounded_int, program_name, run_cli
from engine.fetch import add_url_flags, url_policy
from training.images import MAX_PIXELS

BATCH_WINDOW_MS = 5.0  # a few ms: small beside one photo's encode on a CPU (~30 ms at 224 px), enough to gather
MAX_BATCH = 16  # past ~16 photos a CPU batch gains little per photo and the last ones wait long
BATCH_WORKERS = min(4, os.cpu_count() or 1)  # one model call uses about one core (engine/api/batching.py)

EXAMPLES = """examples:
  python -m engine.serve --catalog catalogs/shop
  python -m engine.serve --catalog catalogs/shop --host 0.0.0.0 --port 8080 --token "$SECRET"
  python -m engine.serve --catalog catalogs/shop --read-only
  python -m engine.serve --catalog catalogs/shop --token "$SECRET" --allow-url-network 10.20.0.0/16
  curl -F image=@shoe.jpg 'http://127.0.0.1:8000/search?k=5&label=shoes&where=brand:acme'
  curl -H "Authorization: Bearer $SECRET" -F image_url=https://cdn.example.com/p/42.jpg -F label=shoes \
       http://127.0.0.1:8000/items
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("engine.serve"), description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", required=True, help="catalog directory made by build-index")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=bounded_int(1, 65535), default=8000, help="(default %(default)s)")
    parser.add_argument("--model", help="model directory (default: the one that built the catalog)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--read-only", action="store_true", help="refuse adds and deletes (403)")
    parser.add_argument("--token", default=os.environ.get("LATENTHASH_TOKEN"),
                        help="Bearer token every write must carry (default: $LATENTHASH_TOKEN; none: open)")
    parser.add_argument("--ray", metavar="ADDRESS", help="search the shards on Ray actors: 'local', 'auto' or "
                        "HOST:PORT (adds and deletes go through the actors too: each commits its own shards, and "
                        "searches see the change after the refresh that follows; uploaded photos are kept in "
                        "the catalog folder here)")
    parser.add_argument("--shards-per-actor", type=bounded_int(1), default=1, help="with --ray (default %(default)s)")
    parser.add_argument("--max-upload-mb", type=bounded_float(0.001), default=20,
                        help="largest upload; a longer request body is refused as it streams in (default "
                             "%(default)s)")
    parser.add_argument("--max-megapixels", type=bounded_float(0.001), default=MAX_PIXELS / 1e6,
                        help="largest image to decode, in millions of pixels (a JPEG counts at the reduced scale "
                             "it decodes at); bounds the memory of a search (default %(default)g)")
    parser.add_argument("--batch-window-ms", type=bounded_float(0), default=BATCH_WINDOW_MS,
                        metavar="MS", help="photo searches that arrive within this window are encoded as one "
                        "batch (more searches a second on a CPU; a photo alone never waits it); 0: each encodes "
                        "alone (default %(default)g)")
    parser.add_argument("--max-batch", type=bounded_int(1), default=MAX_BATCH,
                        help="most photos encoded in one batch (default %(default)s)")
    parser.add_argument("--batch-workers", type=bounded_int(1), default=BATCH_WORKERS,
                        help="threads that encode batches, one batch each at a time (default: the cores, at "
                             "most 4: %(default)s)")
    parser.add_argument("--shutdown-timeout", type=bounded_float(0), default=5, metavar="SECONDS",
                        help="on SIGTERM, how long requests in flight may finish (a stalled upload is then cut "
                             "off) before the catalog is closed (default %(default)g)")
    add_url_flags(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        from engine.api.app import create_app  # FastAPI, torch and Faiss: once serving, not for --help
        from engine.api.batching import BatchSettings
        from engine.api.service import Service

        hand_back_large_buffers()
        service = Service(args.catalog, args.model, args.read_only, args.token, args.max_upload_mb, args.device,
                          args.ray, args.shards_per_actor, max_pixels=int(args.max_megapixels * 1e6),
                          batching=BatchSettings(args.batch_window_ms, args.max_batch, args.batch_workers)
                          if args.batch_window_ms else None, urls=url_policy(args))
        return serve(create_app(service), args.host, args.port, args.shutdown_timeout)

    return run_cli(body)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def hand_back_large_buffers() -> bool:
    """Have glibc map each allocation of 8 MiB or more on its own, and unmap it when freed. By default its
    threshold rises to 32 MiB after the first such free; a decoded image's 16 MiB blocks then come from the
    decoding thread's own arena and stay there, so four worker threads that each decoded one large upload in
    turn held four of them (benchmarks/upload_memory.py: peak 2.1x idle RSS, 1.4x with this). Not lower: the
    model's activations, a few MiB each for a batch of photos, would then be mapped and faulted in afresh on
    every call (at 1 MiB, 8 concurrent batched searches took 1.4-1.5x the CPU per photo). Process-wide;
    returns whether it took effect (False off glibc)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 8 << 20))


def serve(app, host: str, port: int, shutdown_timeout: float) -> int:
    """Run uvicorn until SIGTERM or Ctrl-C; 0 after a clean SIGTERM shutdown. (uvicorn raises the signal again
    once it has shut down, which would end the process by signal, status 143: that one exits 0 here.)"""
    import uvicorn

    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=shutdown_timeout)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _exit_cleanly(signum: int, frame) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
