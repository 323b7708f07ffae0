"""Errors worded as HTTP answers, in one shape ({"error": "one line"}): the layers raise facts, this edge picks
the status. Bad input from any layer is the client's (400), damage is the catalog's (500), a lack of room the
server's (507); anything else is a bug of ours (500, logged)."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.api.service import ItemExists, OutOfRoom
from engine.errors import BadCropBox, EngineError
from shards.errors import CatalogError, DamagedError
from training.errors import TrainingError


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    response = JSONResponse(exc.detail if isinstance(exc.detail, dict) else {"error": str(exc.detail)},
                            status_code=exc.status_code)
    if exc.status_code == 405:  # every method of the path (Starlette names only the first route's)
        allowed = {method for route in request.app.routes if getattr(route, "methods", None)
                   and route.path_regex.match(request.url.path) for method in route.methods}
        response.headers["Allow"] = ", ".join(sorted(allowed))
    return response


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's list of problems as the one error shape: `query k: Input should be ...; ...`."""
    problems = (f"{' '.join(str(part) for part in problem['loc'])}: {problem['msg']}" for problem in exc.errors())
    return error(422, "; ".join(problems).replace("\n", " "))


async def item_exists(request: Request, exc: ItemExists) -> JSONResponse:
    return JSONResponse({"error": str(exc), "id": exc.item}, status_code=409)


async def out_of_room(request: Request, exc: OutOfRoom) -> JSONResponse:
    return error(507, str(exc))


async def bad_crop(request: Request, exc: BadCropBox) -> JSONResponse:
    """A crop box outside its photo: the request's parameter is invalid for this photo, as a malformed box is."""
    return error(422, str(exc))


async def bad_input(request: Request, exc: Exception) -> JSONResponse:
    """An engine, training or catalog error: the request's to fix (an unusable image, metadata, an argument);
    a damaged catalog is the server's."""
    return error(500 if isinstance(exc, DamagedError) else 400, str(exc))


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug of ours: answered in the one shape (and logged)."""
    return error(500, f"internal error: {type(exc).__name__}")


def add_error_handlers(app: FastAPI) -> None:
    """Starlette picks the handler of the most specific class: ItemExists and OutOfRoom before EngineError."""
    for kind, handler in ((StarletteHTTPException, http_error), (RequestValidationError, invalid_request),
                          (ItemExists, item_exists), (OutOfRoom, out_of_room), (BadCropBox, bad_crop),
                          (EngineError, bad_input),
                          (TrainingError, bad_input), (CatalogError, bad_input), (Exception, server_error)):
        app.add_exception_handler(kind, handler)
