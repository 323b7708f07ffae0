"""The service's two middlewares, as plain ASGI (Starlette's BaseHTTPMiddleware costs ~1 ms a request)."""
from __future__ import annotations

from fastapi import HTTPException
from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

FORM_SLACK = 1 << 20  # a request body may pass the upload limit by this much: the form's other fields and headers


def upload_too_large(max_upload: int) -> HTTPException:
    return HTTPException(413, f"upload over the {max_upload / (1 << 20):g} MiB limit (--max-upload-mb)")


class CountRequests:
    """Requests by route and status."""

    def __init__(self, inner: ASGIApp, requests: Counter):
        self.inner, self.requests = inner, requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")
                self.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.inner(scope, receive, counted)


class LimitBody:
    """Stop reading a request body at the upload limit, 413: a Content-Length over it is refused before any
    byte is read, and a body that streams past it (chunked, or longer than it said) as soon as it does, so
    nothing past the limit is stored (the form parser spools files to the temp folder)."""

    def __init__(self, inner: ASGIApp, max_upload: int):
        self.inner, self.max_upload = inner, max_upload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        limit = self.max_upload + FORM_SLACK
        declared = dict(scope["headers"]).get(b"content-length", b"")
        received = 0

        async def limited() -> Message:
            nonlocal received
            if declared.isdigit() and int(declared) > limit:
                raise upload_too_large(self.max_upload)
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise upload_too_large(self.max_upload)
            return message

        await self.inner(scope, limited, send)
