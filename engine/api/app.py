"""The FastAPI application over a `Service`: its routes, middlewares and error handlers put together."""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from engine.api.handlers import add_error_handlers
from engine.api.middleware import CountRequests, LimitBody
from engine.api.routes import router
from engine.api.service import Service

DESCRIPTION = ("Image search on learned binary hash codes: two-stage search (Hamming pool, Euclidean re-ranking) "
               "over a catalog, with exact label and metadata filters. Every client mistake answers a 4xx with "
               "{\"error\": \"one line\"}.")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.service.close()  # after in-flight requests finished (uvicorn's graceful shutdown on SIGTERM)


def create_app(service: Service) -> FastAPI:
    """The application serving `service`; it closes the service when it shuts down. The docs pages (/docs,
    /redoc) load their scripts from this server, not from a CDN: they work offline."""
    app = FastAPIOffline(title="latenthash", lifespan=lifespan, description=DESCRIPTION)
    app.state.service = service
    app.add_middleware(LimitBody, max_upload=service.max_upload)  # inside CountRequests: its 413s are counted
    app.add_middleware(CountRequests, requests=service.metrics.requests)
    add_error_handlers(app)
    app.include_router(router)
    return app
