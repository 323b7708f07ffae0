"""The service's endpoints. Each takes the `Service` its app holds and answers JSON (or a file); mistakes are
raised, as HTTPException here or as the layers' errors below, and worded by `engine.api.handlers`. Blocking work
(decoding, the model, searches, commits) runs on the server's worker threads.
(No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time.)"""
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi import Path as PathParameter
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from engine.api.middleware import upload_too_large
from engine.api.schemas import (BATCH_QUERIES, BATCH_QUERIES_SCHEMA, MAX_BATCH_QUERIES, MAX_ID,
                                PHOTO_SEARCH_PARAMETERS, SEARCH_PARAMETERS, Added, BatchQueryModel, BatchResponse,
                                Deleted, ErrorModel, Health, ItemModel, PhotoSearchParameters, SearchParameters,
                                SearchResponse, errors)
from engine.api.service import Service
from engine.batch import BatchQuery
from engine.fetch import FetchFailed, FetchTimeout
from engine.api.schemas import DUPLICATE_PARAMETERS, DuplicatesResponse
from engine.duplicates import DuplicateStats, find_duplicates
from engine.record import item_image
from engine.search import Timings

STATIC = Path(__file__).resolve().parents[1] / "static"
# The page's icon (a magnifier): browsers ask for /favicon.ico, and a 404 there is an error in the page's console
FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><circle cx="6.5" cy="6.5" r="4.5" '
           b'fill="none" stroke="#2a7" stroke-width="2"/><path d="M10 10l4.5 4.5" stroke="#2a7" stroke-width="2"/>'
           b'</svg>')

router = APIRouter(responses={"4XX": {"model": ErrorModel, "description": "a client mistake, in one line"}})


async def service_of(request: Request) -> Service:
    """The app's service (async: FastAPI runs it on the event loop, not on a worker thread)."""
    return request.app.state.service


SERVICE = Annotated[Service, Depends(service_of)]
ITEM_ID = PathParameter(..., ge=0, le=MAX_ID, description="a catalog item id")


async def may_write(service: SERVICE,
                    authorization: str | None = Header(None, description="Bearer TOKEN, when the server has one")):
    if service.token is not None and authorization != f"Bearer {service.token}":
        raise HTTPException(401, "this write needs the server's token as 'Authorization: Bearer TOKEN'")
    if service.read_only:
        raise HTTPException(403, "the server is read-only (--read-only)")


async def read_upload(image: UploadFile, max_upload: int) -> bytes:
    data = await image.read(max_upload + 1)
    if len(data) > max_upload:
        raise upload_too_large(max_upload)
    return data


def answer(service: Service, query: str, codes: np.ndarray, features: np.ndarray, parameters: SearchParameters,
           timings: Timings) -> JSONResponse:
    """The response as JSON directly: the shape is SearchResponse's (documented, and checked by the tests),
    and skipping FastAPI's re-validation of every result saves ~1 ms a request."""
    results = service.search(codes, features, parameters.k, parameters.pool, parameters.radius,
                             parameters.rerank, parameters.filter, parameters.nprobe, timings,
                             parameters.within_predicted)
    return JSONResponse({"query": query, "results": [vars(r) for r in results]})


def search_upload(service: Service, data: bytes, name: str, parameters: PhotoSearchParameters) -> JSONResponse:
    timings = Timings()
    codes, features = service.encode_photo(data, timings, crop=parameters.crop_box)
    return answer(service, name, codes, features, parameters, timings)


@router.post("/search", response_model=SearchResponse, summary="Search with a photo (or a region of it: crop)",
             responses=errors(400, 413))
async def search_photo(parameters: PHOTO_SEARCH_PARAMETERS, service: SERVICE,
                       image: UploadFile = File(..., description="the query photo")):
    data = await read_upload(image, service.max_upload)  # on the event loop; the rest on a worker thread
    return await run_in_threadpool(search_upload, service, data, image.filename or "upload", parameters)


def batch_queries(text: str, names: list[str], uploads: list[bytes]) -> list[BatchQuery]:
    """The `queries` field as the batch's queries, each image reference resolved to its upload; 422 (the one
    error shape) for anything malformed: JSON, a parameter, a reference to no upload."""
    try:
        models = BATCH_QUERIES.validate_json(text)
    except ValidationError as error:
        raise RequestValidationError([{**problem, "loc": ("queries", *problem["loc"])}
                                      for problem in error.errors(include_url=False, include_context=False)]) from None
    return [BatchQuery(name, model.options(), image, model.id, model.crop_box)
            for name, image, model in (upload_of(n, model, names, uploads) for n, model in enumerate(models))]


def upload_of(position: int, model: BatchQueryModel, names: list[str],
              uploads: list[bytes]) -> tuple[str, bytes | None, BatchQueryModel]:
    """(the query's name, its photo's bytes or None for an id, the query) for the query at `position`."""
    if model.image is None:
        return f"id:{model.id}", None, model
    if isinstance(model.image, int):
        index = model.image
    else:
        index = names.index(model.image) if names.count(model.image) == 1 else -1
    if not 0 <= index < len(uploads):
        raise HTTPException(422, f"queries {position} image: {model.image!r} names none of the {len(uploads)} "
                            "uploaded images (a 0-based position, or a file name that one of them has alone)")
    return names[index] or f"upload {index}", uploads[index], model


QUERIES_FIELD = Form(..., description=f"a JSON list of 1 to {MAX_BATCH_QUERIES} queries, each an object: `image` "
                     "(position or file name of an upload) or `id`, plus its own parameters (those of GET /search, "
                     "and crop for an image), e.g. [{\"image\": 0, \"k\": 5, \"crop\": \"10,10,64,64\"}, {\"id\": 42, "
                     "\"label\": [\"shoes\"], \"within\": \"predicted\"}]",
                     json_schema_extra={"contentMediaType": "application/json",
                                        "contentSchema": BATCH_QUERIES_SCHEMA})


@router.post("/search/batch", response_model=BatchResponse, summary="Many searches in one request: photos "
             "(encoded in batches) and catalog items, each with its own parameters; a query that cannot be "
             "answered gets its own error", responses=errors(413, 422))
async def search_batch(service: SERVICE, queries: str = QUERIES_FIELD,
                       images: list[UploadFile] = File([], description=f"the photos the queries name (at most "
                                                        f"{MAX_BATCH_QUERIES})")):
    if len(images) > MAX_BATCH_QUERIES:
        raise HTTPException(422, f"{len(images)} images: at most {MAX_BATCH_QUERIES} in one batch")
    uploads = [await read_upload(image, service.max_upload) for image in images]
    batch = batch_queries(queries, [image.filename or "" for image in images], uploads)
    answers = await run_in_threadpool(service.search_batch, batch, Timings())
    return JSONResponse({"answers": [{"query": a.query, "error": a.error,
                                      "results": None if a.results is None else [vars(r) for r in a.results]}
                                     for a in answers]})


@router.get("/search", response_model=SearchResponse, summary="More like this: search with a catalog item",
            responses=errors(400, 404))
def search_item(parameters: SEARCH_PARAMETERS, service: SERVICE,
                id: int = Query(..., ge=0, le=MAX_ID, description="a catalog item id")):
    with service.lock.reading():
        item = service.searcher.catalog.get([id])[0]
    if item is None:
        raise HTTPException(404, f"no item {id} in the catalog")
    return answer(service, f"id:{id}", item.code[None], item.features[None], parameters, Timings())


def stored_item(service: Service, item_id: int) -> dict:
    item = service.item(item_id)
    if item is None:
        raise HTTPException(404, f"no item {item_id} in the catalog")
    return item


@router.get("/items/{item_id}", response_model=ItemModel, summary="An item's path, label and metadata",
            responses=errors(404))
def get_item(service: SERVICE, item_id: int = ITEM_ID):
    return stored_item(service, item_id)


@router.get("/items/{item_id}/image", summary="An item's image (only files that belong to catalog items)",
            response_class=Response, responses={200: {"content": {"image/*": {}}}, **errors(404)})
def get_image(service: SERVICE, item_id: int = ITEM_ID):
    file = item_image(stored_item(service, item_id)["path"], service.image_roots)
    if file is None:
        raise HTTPException(404, f"item {item_id} has no image this server may show")
    return FileResponse(file)


async def photo_to_add(service: Service, image: UploadFile | None, image_url: str | None) -> bytes:
    """The uploaded photo, or the one at `image_url` fetched by this server: 400 for a URL it may not fetch, 502
    when the server there fails (an error status, a photo over the upload limit), 504 when it does not answer."""
    if (image is None) == (image_url is None):
        raise HTTPException(422, "send the photo as image (a file) or as image_url (an http or https URL): one of them")
    if image is not None:
        return await read_upload(image, service.max_upload)
    try:
        return await run_in_threadpool(service.fetch_photo, image_url)
    except FetchFailed as failure:
        raise HTTPException(504 if isinstance(failure, FetchTimeout) else 502, str(failure)) from None


@router.post("/items", response_model=Added, summary="Add a photo to the catalog, uploaded or by URL (the same "
             "photo again: 200 with its id if the label and metadata are the same, else 409)",
             dependencies=[Depends(may_write)], responses=errors(400, 401, 403, 409, 413, 502, 504, 507))
async def add_item(service: SERVICE, image: UploadFile | None = File(None, description="the photo (or image_url)"),
                   image_url: str | None = Form(None, description="or the photo's http(s) URL, fetched by the "
                                                "server (no loopback or private address unless its operator "
                                                "allows them; at most the upload limit)"),
                   label: str | None = Form(None),
                   metadata: str | None = Form(None, description="a JSON object: SKU, title, price, ... "
                                               "(finite numbers, at most 32 levels deep and 64 KiB)")):
    data = await photo_to_add(service, image, image_url)
    return {"id": await run_in_threadpool(service.add_photo, data, label, metadata)}


@router.delete("/items/{item_id}", response_model=Deleted, summary="Delete an item (and its photo, if it was "
               "added here)", dependencies=[Depends(may_write)], responses=errors(401, 403, 404, 507))
def delete_item(service: SERVICE, item_id: int = ITEM_ID):
    if not service.delete_photo(item_id):
        raise HTTPException(404, f"no item {item_id} in the catalog")
    return {"deleted": item_id}


@router.get("/duplicates", response_model=DuplicatesResponse, summary="Groups of near-identical items (duplicate "
            "listings): codes within `radius`, features within `max_distance`; one at a time",
            responses=errors(400, 429))
def duplicates(parameters: DUPLICATE_PARAMETERS, service: SERVICE):
    stats = DuplicateStats()
    if not service.duplicate_search.acquire(blocking=False):  # each holds the catalog for seconds to a minute
        raise HTTPException(429, "a duplicate search is running; ask again when it has finished")
    try:
        with service.lock.reading():
            groups = find_duplicates(service.searcher.catalog, parameters.radius, parameters.max_distance,
                                     parameters.filter, stats)
    finally:
        service.duplicate_search.release()
    return {"groups": [[vars(item) for item in group] for group in groups], "items": stats.items,
            "radius": stats.radius, "max_distance": stats.max_distance, "hamming_pairs": stats.hamming_pairs,
            "confirmed_pairs": stats.confirmed_pairs}


@router.get("/healthz", response_model=Health)
def healthz(service: SERVICE):
    catalog = service.searcher.catalog
    return {"status": "ok", "items": len(catalog), "bits": catalog.bits, "model": catalog.manifest.model_fingerprint,
            "inference_path": service.searcher.inference_path, "model_ready": service.model_ready}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,  # errors are JSON all the same
            responses={200: {"content": {"text/plain": {}}}})
def metrics(service: SERVICE):
    return PlainTextResponse(generate_latest(service.metrics.registry).decode(),
                             media_type="text/plain; version=0.0.4")


@router.get("/", include_in_schema=False)
def page():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/favicon.ico", include_in_schema=False)
def favicon():
    return Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})
