"""Serve a catalog over HTTP: `python -m engine.serve --catalog DIR [--host 127.0.0.1] [--port 8000]`.

A thin layer over `engine.search.Searcher` (one query path for the CLI and the service): search by photo or by
item id with exact label and metadata filters, item lookup and images, crash-safe adds and deletes, health and
Prometheus metrics, and a web page at `/`. The model and catalog are loaded once; searches run concurrently in
the server's thread pool (Faiss and torch release the GIL), writes one at a time through the catalog's batches.
"""
import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import asynccontextmanager, contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Iterator

from engine.errors import run_cli
from training.errors import UserError, program_name

STATIC = Path(__file__).with_name("static")
UPLOADS = "uploads"  # where images added through the API are kept, inside the catalog folder
MAX_K, MAX_POOL = 1000, 100_000


class ReadWriteLock:
    """Many searches at once, or one writer (refreshing the reader's snapshot frees memory searches may read)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writing = False

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._writing)
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._writing and self._readers == 0)
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()


class Service:
    """What the endpoints share: the searcher (reader), the writer when writes are allowed, locks and metrics."""

    def __init__(self, catalog_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                 read_only: bool = False, token: str | None = None, max_upload_mb: float = 20,
                 device: str = "auto", ray: str | None = None, shards_per_actor: int = 1):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from engine.search import Searcher
        from shards import Catalog

        from engine.record import read_record

        self.catalog_dir = Path(catalog_dir)
        self.read_only, self.token = read_only, token
        record = read_record(self.catalog_dir)
        self.image_roots = record.image_roots if record is not None else []  # extended by add_photo
        self.max_upload = int(max_upload_mb * (1 << 20))
        self.writer = None if read_only or ray is not None else Catalog.open(self.catalog_dir, readonly=False)
        # One Faiss thread per search: concurrent requests fill the cores (a second thread never speeds up one
        # query on these machines, DESIGN.md), and no OpenMP teams are started from many threads at once.
        self.searcher = Searcher(self.catalog_dir, model_dir, device, threads=1, ray=ray,
                                 shards_per_actor=shards_per_actor)
        if ray is not None and not read_only:  # writes go to the actors that own the items' shards
            self.writer = self.searcher.catalog
        self.lock = ReadWriteLock()
        self.write_lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.requests = Counter("latenthash_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.stages = Histogram("latenthash_stage_seconds", "Seconds per search stage", ["stage"],
                                registry=self.registry,
                                buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
        self.items = Gauge("latenthash_catalog_items", "Items in the catalog", registry=self.registry)
        self.items.set(len(self.searcher.catalog))

    def close(self) -> None:
        with self.lock.writing():
            self.searcher.close()
            if self.writer is not None and self.writer is not self.searcher.catalog:
                self.writer.close()

    def observe(self, timings) -> None:
        for stage in fields(timings):
            if getattr(timings, stage.name):
                self.stages.labels(stage.name).observe(getattr(timings, stage.name))

    def refresh(self) -> None:
        """Make a committed write visible to searches (callers hold the write lock)."""
        with self.lock.writing():
            self.searcher.refresh()
        self.items.set(len(self.searcher.catalog))


def create_app(service: Service):
    """The FastAPI application over `service`. (No `from __future__ import annotations` in this module: FastAPI
    reads the endpoints' annotations, and the models below are local to keep FastAPI out of `--help`.)"""
    from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
    from fastapi import Path as PathParameter
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
    from prometheus_client import generate_latest
    from pydantic import BaseModel, Field, field_validator
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from engine.record import item_image, product_metadata
    from engine.search import Timings
    from shards.codes import MAX_BITS
    from shards.errors import CatalogError, DamagedError
    from shards.filters import Filter, stored_label
    from training.images import BadImage

    class ResultModel(BaseModel):
        rank: int = Field(description="1 for the best match")
        id: int = Field(description="the item's catalog id")
        path: str | None = Field(description="the image file the item was indexed from")
        label: str | None = Field(description="the item's label (its class folder), if any")
        hamming: int = Field(description="Hamming distance between the codes (coarse stage)")
        distance: float | None = Field(description="Euclidean distance between the features (re-ranking stage)")
        metadata: dict | None = Field(description="the item's product metadata (SKU, title, price, ...)")

    class SearchResponse(BaseModel):
        query: str = Field(description="the uploaded file's name, or id:ID")
        results: list[ResultModel]

    class ItemModel(BaseModel):
        id: int
        path: str | None
        label: str | None
        metadata: dict | None

    class Added(BaseModel):
        id: int

    class ErrorModel(BaseModel):
        error: str = Field(description="what was wrong, in one line")

    def errors(*codes: int) -> dict:
        return {code: {"model": ErrorModel} for code in codes}

    class Health(BaseModel):
        status: str
        items: int
        bits: int
        model: str | None = Field(description="fingerprint of the model that made the catalog's codes")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()  # after in-flight requests finished (uvicorn's graceful shutdown on SIGTERM)

    app = FastAPI(title="latenthash", lifespan=lifespan,
                  description="Image search on learned binary hash codes: two-stage search (Hamming pool, "
                              "Euclidean re-ranking) over a catalog, with exact label and metadata filters.")

    class CountRequests:
        """Requests by route and status, as plain ASGI (Starlette's BaseHTTPMiddleware costs ~1 ms a request)."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)

            async def record(message):
                if message["type"] == "http.response.start":
                    route = getattr(scope.get("route"), "path", "unmatched")
                    service.requests.labels(route, str(message["status"])).inc()
                await send(message)

            await self.inner(scope, receive, record)

    app.add_middleware(CountRequests)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def may_write(authorization: str | None = Header(None, description="Bearer TOKEN, when the server has one")):
        if service.token is not None and authorization != f"Bearer {service.token}":
            raise HTTPException(401, "this write needs the server's token as 'Authorization: Bearer TOKEN'")
        if service.read_only:
            raise HTTPException(403, "the server is read-only (--read-only)")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        response = error(exc.status_code, str(exc.detail))
        if exc.status_code == 405:  # every method of the path (Starlette names only the first route's)
            allowed = {m for route in app.routes if getattr(route, "methods", None)
                       and route.path_regex.match(request.url.path) for m in route.methods}
            response.headers["Allow"] = ", ".join(sorted(allowed))
        return response

    class SearchParameters(BaseModel):
        """The query string of both searches, validated in one pydantic call (FastAPI's path per parameter
        costs ~0.3 ms a request)."""
        k: int = Field(10, ge=1, le=MAX_K, description="results to return")
        pool: int | None = Field(None, ge=1, le=MAX_POOL, description="Hamming candidates (default 100*k)")
        radius: int | None = Field(None, ge=0, le=MAX_BITS, description="pool = every code within this radius")
        nprobe: int | None = Field(None, ge=1, le=1 << 20, description="ivf catalogs: inverted lists each shard "
                                   "visits (default: 1/64 of them, at least 16, more for a pool that spans many lists)")
        rerank: bool = Field(True, description="re-rank the pool by Euclidean distance")
        label: list[str] = Field([], description="only items with any of these labels")
        where: list[str] = Field([], description="only items whose metadata has field:value (repeatable)")

        @field_validator("where")
        @classmethod
        def _conditions(cls, where: list[str]) -> list[str]:
            try:
                Filter.parse((), where)
            except CatalogError as problem:
                raise ValueError(str(problem)) from None
            return where

        @property
        def filter(self) -> Filter:
            return Filter.parse(self.label, self.where)

    SEARCH_PARAMETERS = Annotated[SearchParameters, Query()]

    def answer(query: str, codes, features, parameters: SearchParameters, timings: Timings) -> JSONResponse:
        """The response as JSON directly: the shape is SearchResponse's (documented, and checked by the tests),
        and skipping FastAPI's re-validation of every result saves ~1 ms a request."""
        with service.lock.reading():
            results = service.searcher.search_codes(codes, features, parameters.k, parameters.pool,
                                                    parameters.radius, parameters.rerank, parameters.filter,
                                                    timings, parameters.nprobe)[0]
        service.observe(timings)
        return JSONResponse({"query": query, "results": [vars(r) for r in results]})

    async def read_upload(image: UploadFile) -> bytes:
        data = await image.read(service.max_upload + 1)
        if len(data) > service.max_upload:
            raise HTTPException(413, f"upload over the {service.max_upload >> 20} MiB limit (--max-upload-mb)")
        return data

    def encode_upload(data: bytes, timings: Timings):
        start = time.perf_counter()
        try:
            images = service.searcher.decode_bytes([data])
        except BadImage as problem:
            raise HTTPException(400, f"not a usable image: {problem}") from None
        decoded = time.perf_counter()
        codes, features = service.searcher.encoder.encode(images)
        timings.decode += decoded - start
        timings.encode += time.perf_counter() - decoded
        return codes, features

    def search_upload(data: bytes, name: str, parameters: SearchParameters) -> JSONResponse:
        timings = Timings()
        try:
            codes, features = encode_upload(data, timings)
        except UserError as problem:  # e.g. the catalog records no model
            raise HTTPException(400, str(problem)) from None
        return answer(name, codes, features, parameters, timings)

    @app.post("/search", response_model=SearchResponse, summary="Search with a photo", responses=errors(400, 413))
    async def search_photo(parameters: SEARCH_PARAMETERS,
                           image: UploadFile = File(..., description="the query photo")):
        data = await read_upload(image)  # on the event loop; decoding, the model and the search on a worker thread
        return await run_in_threadpool(search_upload, data, image.filename or "upload", parameters)

    @app.get("/search", response_model=SearchResponse, summary="More like this: search with a catalog item",
             responses=errors(400, 404))
    def search_item(parameters: SEARCH_PARAMETERS,
                    id: int = Query(..., ge=0, le=2**63 - 1, description="a catalog item id")):
        with service.lock.reading():
            item = service.searcher.catalog.get([id])[0]
        if item is None:
            raise HTTPException(404, f"no item {id} in the catalog")
        return answer(f"id:{id}", item.code[None], item.features[None], parameters, Timings())

    ITEM_ID = PathParameter(..., ge=0, le=2**63 - 1, description="a catalog item id")

    def stored_item(item_id: int) -> dict:
        with service.lock.reading():
            meta = service.searcher.catalog.metadata([item_id])[0]
            present = service.searcher.catalog.present([item_id])[0]
        if not present:
            raise HTTPException(404, f"no item {item_id} in the catalog")
        return {"id": item_id, "path": (meta or {}).get("path"), "label": stored_label(meta),
                "metadata": (meta or {}).get("metadata")}

    @app.get("/items/{item_id}", response_model=ItemModel, summary="An item's path, label and metadata",
             responses=errors(404))
    def get_item(item_id: int = ITEM_ID):
        return stored_item(item_id)

    @app.get("/items/{item_id}/image", summary="An item's image (only files that belong to catalog items)",
             response_class=Response, responses={200: {"content": {"image/*": {}}}, **errors(404)})
    def get_image(item_id: int = ITEM_ID):
        file = item_image(stored_item(item_id)["path"], service.image_roots)
        if file is None:
            raise HTTPException(404, f"item {item_id} has no image this server may show")
        return FileResponse(file)

    @app.post("/items", response_model=Added, summary="Add a photo to the catalog",
              dependencies=[Depends(may_write)], responses=errors(400, 401, 403, 413))
    async def add_item(image: UploadFile = File(...), label: str | None = Form(None),
                       metadata: str | None = Form(None, description="a JSON object: SKU, title, price, ...")):
        data = await read_upload(image)

        def add() -> int:  # on a worker thread: the model, the commit and waiting for the write lock
            try:
                product = product_metadata(metadata)
                with service.write_lock:
                    item = add_photo(service, data, label, product, encode_upload)
                    service.refresh()
            except UserError as problem:
                raise HTTPException(400, str(problem)) from None
            return item

        return {"id": await run_in_threadpool(add)}

    @app.delete("/items/{item_id}", summary="Delete an item", dependencies=[Depends(may_write)],
                responses=errors(401, 403, 404))
    def delete_item(item_id: int = ITEM_ID):
        with service.write_lock:
            removed = service.writer.delete([item_id])
            if removed:
                service.refresh()
        if not removed:
            raise HTTPException(404, f"no item {item_id} in the catalog")
        return {"deleted": item_id}

    @app.get("/healthz", response_model=Health)
    def healthz():
        catalog = service.searcher.catalog
        return {"status": "ok", "items": len(catalog), "bits": catalog.bits,
                "model": catalog.manifest.model_fingerprint}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    def metrics():
        return PlainTextResponse(generate_latest(service.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.exception_handler(CatalogError)
    async def catalog_error(request: Request, exc: CatalogError):
        return error(500 if isinstance(exc, DamagedError) else 400, str(exc))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):  # a bug of ours: answered (and logged)
        return error(500, f"internal error: {type(exc).__name__}")

    return app


def add_photo(service: Service, data: bytes, label: str | None, product: dict | None, encode_upload) -> int:
    """Keep the upload inside the catalog folder, encode it and add it in one crash-safe batch; returns its id."""
    from engine.record import item_id, item_metadata, read_record, write_record
    from engine.search import Timings

    codes, features = encode_upload(data, Timings())
    folder = service.catalog_dir / UPLOADS
    folder.mkdir(exist_ok=True)
    record = read_record(service.catalog_dir)
    if record is not None and str(folder.resolve()) not in record.image_roots:
        record.image_roots.append(str(folder.resolve()))
        write_record(service.catalog_dir, record)
        service.image_roots = record.image_roots
    file = (folder / hashlib.sha256(data).hexdigest()[:24]).resolve()
    item = item_id(file)
    if not service.writer.present([item])[0]:
        file.write_bytes(data)
        service.writer.add([item], codes, features, [item_metadata(file, label, file.stat(), product)])
    return item


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(catalog: str | os.PathLike, env: dict | None, *options: str, log: str | os.PathLike | None = None,
                   timeout: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """(base URL, process) of `python -m engine.serve` on 127.0.0.1 and a free port, once it answers /healthz;
    stopped (SIGTERM, then SIGKILL) afterwards. Its output goes to `log` (default: nowhere), never to a pipe
    nobody reads, which would stop the server once the pipe is full. For tests and benchmarks."""
    port = free_port()
    with open(log or os.devnull, "w") as output:
        server = subprocess.Popen([sys.executable, "-m", "engine.serve", "--catalog", str(catalog), "--port",
                                   str(port), *options], env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + timeout
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited with status {server.returncode}")
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


EXAMPLES = """examples:
  python -m engine.serve --catalog catalogs/shop
  python -m engine.serve --catalog catalogs/shop --host 0.0.0.0 --port 8080 --token "$SECRET"
  python -m engine.serve --catalog catalogs/shop --read-only
  curl -F image=@shoe.jpg 'http://127.0.0.1:8000/search?k=5&label=shoes&where=brand:acme'
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("engine.serve"), description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", required=True, help="catalog directory made by build-index")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="(default %(default)s)")
    parser.add_argument("--model", help="model directory (default: the one that built the catalog)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--read-only", action="store_true", help="refuse adds and deletes (403)")
    parser.add_argument("--token", default=os.environ.get("LATENTHASH_TOKEN"),
                        help="Bearer token every write must carry (default: $LATENTHASH_TOKEN; none: open)")
    parser.add_argument("--ray", metavar="ADDRESS", help="search the shards on Ray actors: 'local', 'auto' or "
                        "HOST:PORT (adds and deletes still commit here; searches see them after the refresh)")
    parser.add_argument("--shards-per-actor", type=int, default=1, help="with --ray (default %(default)s)")
    parser.add_argument("--max-upload-mb", type=float, default=20, help="largest upload (default %(default)s)")
    args = parser.parse_args(argv)

    def body() -> int:
        if not 0 < args.port < 65536:
            raise UserError(f"--port must be in 1..65535, got {args.port}")
        import uvicorn

        if args.shards_per_actor < 1:
            raise UserError(f"--shards-per-actor must be at least 1, got {args.shards_per_actor}")
        service = Service(args.catalog, args.model, args.read_only, args.token, args.max_upload_mb, args.device,
                          args.ray, args.shards_per_actor)
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
