"""Serve a catalog over HTTP: `python -m engine.serve --catalog DIR [--host 127.0.0.1] [--port 8000]`.

A thin layer over `engine.search.Searcher` (one query path for the CLI and the service): search by photo or by
item id with exact label and metadata filters, item lookup and images, crash-safe adds and deletes, health and
Prometheus metrics, and a web page at `/`. The model and catalog are loaded once; searches run concurrently in
the server's thread pool (Faiss and torch release the GIL), writes one at a time through the catalog's batches.

Built for an open network: a request body stops being read at the upload limit, an image over the decode limit
is refused from its header and decodes in flight are bounded (training.images), metadata must be finite and
shallow (engine.metadata), a full disk answers 507 and leaves no partial photo, and SIGTERM waits at most
--shutdown-timeout for requests in flight. Every client mistake answers {"error": "one line"}.
"""
import argparse
import ctypes
import errno
import json
import os
import platform
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

from engine.cli import STORAGE_ERRORS, bounded_float, bounded_int, program_name, run_cli
from engine.errors import InputError
from training.errors import TrainingError
from engine.uploads import is_upload, keep_upload, orphan_uploads, remove_uploads, upload_file
from training.images import MAX_PIXELS

STATIC = Path(__file__).with_name("static")
MAX_K, MAX_POOL = 1000, 100_000
FORM_SLACK = 1 << 20  # a request body may pass the upload limit by this much: the form's other fields and headers
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# The page's icon (a magnifier): browsers ask for /favicon.ico, and a 404 there is an error in the page's console
FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><circle cx="6.5" cy="6.5" r="4.5" '
           b'fill="none" stroke="#2a7" stroke-width="2"/><path d="M10 10l4.5 4.5" stroke="#2a7" stroke-width="2"/>'
           b'</svg>')


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
                 device: str = "auto", ray: str | None = None, shards_per_actor: int = 1,
                 max_pixels: int = MAX_PIXELS):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from engine.search import Searcher
        from shards import Catalog

        from engine.record import read_record

        self.catalog_dir = Path(catalog_dir)
        self.read_only, self.token = read_only, token
        record = read_record(self.catalog_dir)
        self.image_roots = record.image_roots if record is not None else []  # extended by add_photo
        self.max_upload = int(max_upload_mb * (1 << 20))
        self.max_pixels = max_pixels
        self.writer = None if read_only or ray is not None else Catalog.open(self.catalog_dir, readonly=False)
        if self.writer is not None:  # holding the writer lock: no add is half done
            remove_orphan_uploads(self.catalog_dir, self.writer)
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
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
    from fastapi_offline import FastAPIOffline
    from prometheus_client import generate_latest
    from pydantic import BaseModel, Field, field_validator
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from engine.metadata import parse_product_metadata
    from engine.record import item_image
    from engine.search import Timings
    from shards.codes import MAX_BITS
    from shards.errors import CatalogError, DamagedError
    from shards.filters import Filter, stored_label
    from training.images import BadImage, load_image_bytes

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

    class ExistsModel(ErrorModel):
        id: int = Field(description="the item that holds this photo")

    def errors(*codes: int) -> dict:
        return {code: {"model": ExistsModel if code == 409 else ErrorModel} for code in codes}

    class Health(BaseModel):
        status: str
        items: int
        bits: int
        model: str | None = Field(description="fingerprint of the model that made the catalog's codes")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()  # after in-flight requests finished (uvicorn's graceful shutdown on SIGTERM)

    # The docs pages (/docs, /redoc) load their scripts from this server, not from a CDN: they work offline.
    app = FastAPIOffline(title="latenthash", lifespan=lifespan,
                         description="Image search on learned binary hash codes: two-stage search (Hamming pool, "
                                     "Euclidean re-ranking) over a catalog, with exact label and metadata filters. "
                                     "Every client mistake answers a 4xx with {\"error\": \"one line\"}.",
                         responses={"4XX": {"model": ErrorModel, "description": "a client mistake, in one line"}})

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

    class LimitBody:
        """Stop reading a request body at the upload limit, 413: a Content-Length over it is refused before any
        byte is read, and a body that streams past it (chunked, or longer than it said) as soon as it does, so
        nothing past the limit is stored (the form parser spools files to the temp folder)."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            limit = service.max_upload + FORM_SLACK
            declared = dict(scope["headers"]).get(b"content-length", b"")
            received = 0

            async def limited():
                nonlocal received
                if declared.isdigit() and int(declared) > limit:
                    raise too_large()
                message = await receive()
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large()
                return message

            await self.inner(scope, limited, send)

    def too_large() -> HTTPException:
        return HTTPException(413, f"upload over the {service.max_upload / (1 << 20):g} MiB limit (--max-upload-mb)")

    app.add_middleware(LimitBody)  # inside CountRequests: its 413s are counted
    app.add_middleware(CountRequests)

    @contextmanager
    def full_disk_as_507(outcome: str) -> Iterator[None]:
        """A full disk is the server's lack of room (507, one line), not a bug (500) or the client's mistake."""
        try:
            yield
        except Exception as problem:
            lack = storage_failure(problem)
            if lack is None:
                raise
            raise HTTPException(507, f"insufficient storage: {lack}; {outcome}") from None

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def may_write(authorization: str | None = Header(None, description="Bearer TOKEN, when the server has one")):
        if service.token is not None and authorization != f"Bearer {service.token}":
            raise HTTPException(401, "this write needs the server's token as 'Authorization: Bearer TOKEN'")
        if service.read_only:
            raise HTTPException(403, "the server is read-only (--read-only)")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        response = JSONResponse(exc.detail if isinstance(exc.detail, dict) else {"error": str(exc.detail)},
                                status_code=exc.status_code)
        if exc.status_code == 405:  # every method of the path (Starlette names only the first route's)
            allowed = {m for route in app.routes if getattr(route, "methods", None)
                       and route.path_regex.match(request.url.path) for m in route.methods}
            response.headers["Allow"] = ", ".join(sorted(allowed))
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        """FastAPI's list of problems as the one error shape: `query k: Input should be ...; ...`."""
        problems = (f"{' '.join(str(part) for part in problem['loc'])}: {problem['msg']}" for problem in exc.errors())
        return error(422, "; ".join(problems).replace("\n", " "))

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
            raise too_large()
        return data

    def encode_upload(data: bytes, timings: Timings):
        start = time.perf_counter()
        try:
            images = load_image_bytes(data, service.searcher.encoder.input_size, service.max_pixels)[None]
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
        except (InputError, TrainingError) as problem:  # e.g. the catalog records no model
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

    @app.post("/items", response_model=Added, summary="Add a photo to the catalog (the same photo again: 200 with "
              "its id if the label and metadata are the same, else 409)",
              dependencies=[Depends(may_write)], responses=errors(400, 401, 403, 409, 413, 507))
    async def add_item(image: UploadFile = File(...), label: str | None = Form(None),
                       metadata: str | None = Form(None, description="a JSON object: SKU, title, price, ... "
                                                   "(finite numbers, at most 32 levels deep and 64 KiB)")):
        data = await read_upload(image)

        def add() -> int:  # on a worker thread: the model, the commit and waiting for the write lock
            try:
                product = parse_product_metadata(metadata)
                with service.write_lock, full_disk_as_507("nothing was added"):
                    item = add_photo(service, data, label, product, encode_upload)
                    service.refresh()
            except (InputError, TrainingError) as problem:
                raise HTTPException(400, str(problem)) from None
            except ItemExists as exists:
                raise HTTPException(409, {"error": str(exists), "id": exists.item}) from None
            return item

        return {"id": await run_in_threadpool(add)}

    @app.delete("/items/{item_id}", summary="Delete an item (and its photo, if it was added here)",
                dependencies=[Depends(may_write)], responses=errors(401, 403, 404, 507))
    def delete_item(item_id: int = ITEM_ID):
        with service.write_lock, full_disk_as_507("nothing was deleted"):
            removed = delete_photo(service, item_id)
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

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,  # errors are JSON all the same
             responses={200: {"content": {"text/plain": {}}}})
    def metrics():
        return PlainTextResponse(generate_latest(service.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @app.exception_handler(CatalogError)
    async def catalog_error(request: Request, exc: CatalogError):
        return error(500 if isinstance(exc, DamagedError) else 400, str(exc))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):  # a bug of ours: answered (and logged)
        return error(500, f"internal error: {type(exc).__name__}")

    return app


class ItemExists(Exception):
    """The photo is already an item, with another label or metadata than the add names."""

    def __init__(self, item: int):
        super().__init__(f"item {item} already holds this photo, with another label or metadata; delete it "
                         "first to add it again")
        self.item = item


def add_photo(service: Service, data: bytes, label: str | None, product: dict | None, encode_upload) -> int:
    """Keep the upload inside the catalog folder, encode it and add it in one crash-safe batch; returns its id.
    The same photo again is the same item: fine with the same label and metadata, ItemExists otherwise."""
    from engine.record import item_id, item_metadata, read_record, write_record
    from engine.search import Timings

    codes, features = encode_upload(data, Timings())
    file = upload_file(service.catalog_dir, data)
    item = item_id(file)
    if service.writer.present([item])[0]:
        stored = service.writer.metadata([item])[0] or {}
        if (stored.get("label"), stored.get("metadata")) != (label, product):
            raise ItemExists(item)
        return item
    file.parent.mkdir(exist_ok=True)
    record = read_record(service.catalog_dir)
    if record is not None and str(file.parent) not in record.image_roots:
        record.image_roots.append(str(file.parent))
        write_record(service.catalog_dir, record)
        service.image_roots = record.image_roots
    keep_upload(file, data)
    try:
        service.writer.add([item], codes, features, [item_metadata(file, label, file.stat(), product)])
    except BaseException:
        file.unlink(missing_ok=True)  # no item refers to it
        raise
    return item


def delete_photo(service: Service, item: int) -> bool:
    """Delete an item and then the photo it was added with (a kill in between leaves an orphan, removed when a
    writer next opens the catalog); whether the item was there."""
    meta = service.writer.metadata([item])[0]
    if not service.writer.delete([item]):
        return False
    path = (meta or {}).get("path")
    if is_upload(service.catalog_dir, path):
        Path(path).unlink(missing_ok=True)
    return True


def remove_orphan_uploads(catalog_dir: Path, writer) -> None:
    orphans = orphan_uploads(catalog_dir, writer)
    if orphans:
        print(remove_uploads(orphans), file=sys.stderr)


def storage_failure(problem: BaseException) -> str | None:
    """What ran out, if a full disk, quota or file-size limit caused `problem` (the catalog wraps the OS's and
    LMDB's errors in its own: the causes are followed)."""
    import lmdb

    while problem is not None:
        if isinstance(problem, OSError) and problem.errno in FULL_DISK:
            return STORAGE_ERRORS[problem.errno]
        if isinstance(problem, lmdb.DiskError):
            return "the disk is full"
        if isinstance(problem, lmdb.MapFullError):
            return "the catalog's file is full and could not grow"
        problem = problem.__cause__ or problem.__context__
    return None


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
    parser.add_argument("--shutdown-timeout", type=bounded_float(0), default=5, metavar="SECONDS",
                        help="on SIGTERM, how long requests in flight may finish (a stalled upload is then cut "
                             "off) before the catalog is closed (default %(default)g)")
    args = parser.parse_args(argv)

    def body() -> int:
        hand_back_large_buffers()
        service = Service(args.catalog, args.model, args.read_only, args.token, args.max_upload_mb, args.device,
                          args.ray, args.shards_per_actor, max_pixels=int(args.max_megapixels * 1e6))
        return serve(create_app(service), args.host, args.port, args.shutdown_timeout)

    return run_cli(body)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def hand_back_large_buffers() -> bool:
    """Have glibc map each allocation of 1 MiB or more on its own, and unmap it when freed. By default its
    threshold rises to 32 MiB after the first such free; a decoded image's 16 MiB blocks then come from the
    decoding thread's own arena and stay there, so four worker threads that each decoded one large upload in
    turn held four of them (benchmarks/upload_memory.py: peak 2.1x idle RSS, 1.4x with this). Process-wide;
    returns whether it took effect (False off glibc)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20))


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
