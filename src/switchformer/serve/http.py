"""HTTP conventions of the server that load balancers, uptime probes and browsers rely on (RFC
9110), and the plumbing every route shares: errors as OpenAI's error object with their headers (a
405's ``Allow`` names every method the resource answers), ``OPTIONS`` answered on every route, CORS
for the origins configured, bodies read within a limit, server-sent events."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from switchformer.serve.protocol import APIError


def allowed_methods(app: FastAPI, scope: dict) -> list[str]:
    """The methods the routes at ``scope``'s path answer (OPTIONS included); none for no route."""
    methods = set()
    for route in app.router.routes:
        if route.matches(dict(scope, method="GET"))[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods | {"OPTIONS"}) if methods else []


class AnswerOptions:
    """``OPTIONS`` on any route: 204 with ``Allow`` (404 where no route is). A plain ASGI middleware:
    Starlette's ``BaseHTTPMiddleware`` would wrap every request's ``receive`` and hide a client's
    disconnect from the handlers that watch for it."""

    def __init__(self, inner, app: FastAPI):
        self.inner, self.app = inner, app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "OPTIONS":
            return await self.inner(scope, receive, send)
        methods = allowed_methods(self.app, scope)
        if methods:
            response = Response(status_code=204, headers={"Allow": ", ".join(methods)})
        else:
            response = JSONResponse(APIError(404, f"OPTIONS {scope['path']}: Not Found").body(), status_code=404)
        await response(scope, receive, send)


def install_conventions(app: FastAPI, cors_origins: list[str] | None) -> None:
    """Error handlers, ``OPTIONS`` and (for ``cors_origins``) CORS on ``app``; call it after the routes
    are added, so that CORS is the outermost layer (a preflight is answered before authorization,
    which browsers do not send with it)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {err.detail}"
        headers = dict(getattr(err, "headers", None) or {})  # part of the answer
        if err.status_code == 405:  # every method the resource answers, as OPTIONS names them
            headers["Allow"] = ", ".join(allowed_methods(app, request.scope))
        return JSONResponse(APIError(err.status_code, message).body(), status_code=err.status_code, headers=headers)

    app.add_middleware(AnswerOptions, app=app)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"], max_age=600,
        )  # fmt: skip


async def read_body(http: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 past ``max_bytes`` (read in chunks: a client that says
    nothing of its length, or lies about it, cannot make the server hold more)."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"the request body is {int(declared):,} bytes; the limit is {max_bytes:,}")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"the request body exceeds the limit of {max_bytes:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def event_stream(chunks) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
