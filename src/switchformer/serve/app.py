"""The HTTP layer: a FastAPI application over one :class:`~switchformer.serve.engine.Engine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as server-sent
events of OpenAI's chunks, ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus) and ``GET /`` (the chat page). With an API key, the ``/v1/`` routes
need ``Authorization: Bearer KEY`` (401 otherwise); the page, health and metrics stay open.

Each request's tokens come from the scheduler thread through an ``asyncio.Queue``; a client that
disconnects (a stream's task is cancelled, or a non-streamed request sees the disconnect while it
waits) cancels its request, which leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import json
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from switchformer.data.token_bytes import TokenBytes
from switchformer.serve import protocol
from switchformer.serve.engine import Engine, EngineStopped, QueueFull
from switchformer.serve.engine import Request as EngineRequest
from switchformer.serve.metrics import ServerMetrics
from switchformer.serve.prompts import PromptFormatter
from switchformer.serve.protocol import APIError, Limits


class _Handoff:
    """Events from the scheduler thread to the event loop: the events of one decoding step (one
    per running request) cross with one wake-up of the loop, not one each."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue, tuple]] = []
        self.lock = threading.Lock()
        self.scheduled = False

    def put(self, queue: asyncio.Queue, item: tuple) -> None:
        with self.lock:
            self.pending.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for queue, item in items:
            queue.put_nowait(item)


class _Events:
    """The scheduler thread's events for one request, handed to the event loop."""

    def __init__(self, handoff: _Handoff):
        self.handoff, self.queue = handoff, asyncio.Queue()

    def emit(self, kind: str, payload: dict) -> None:
        self.handoff.put(self.queue, (kind, payload))


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(
    engine: Engine,
    formatter: PromptFormatter,
    *,
    model_name: str,
    limits: Limits,
    api_key: str | None = None,
    request_timeout: float = 600.0,
    shutdown_timeout: float = 10.0,
    default_completion_tokens: int = 16,
    max_body_bytes: int = 4 << 20,
    cors_origins: list[str] | None = None,
) -> FastAPI:
    """The application. It starts ``engine`` at startup and stops it at shutdown (running
    requests get ``shutdown_timeout`` seconds to finish). ``request_timeout``: seconds from
    arrival after which a request is ended with a 408 error; ``max_body_bytes``: the largest
    request body (413 beyond; 4 MiB by default, far more than any prompt the model takes);
    ``cors_origins``: browser origins allowed to call the API from their pages (CORS; ``["*"]`` for
    any), none by default.

    HTTP conventions that load balancers, probes and browsers rely on (RFC 9110): every GET route
    answers HEAD (same status and headers, no body), a 405 names the allowed methods in ``Allow``,
    and ``OPTIONS`` on a route answers 204 with ``Allow`` (a CORS preflight from an allowed origin
    gets the CORS headers instead)."""
    metrics = ServerMetrics(engine)
    vocab_size = engine.model.config.vocab_size
    token_bytes = TokenBytes(formatter.tokenizer)  # what each token writes, for exact logprobs fields

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, shutdown_timeout)

    app = FastAPI(title="switchformer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {err.detail}"
        headers = dict(getattr(err, "headers", None) or {})  # part of the answer
        if err.status_code == 405:  # every method the resource answers, as OPTIONS names them
            headers["Allow"] = ", ".join(allowed_methods(dict(request.scope, method="GET")))
        return JSONResponse(APIError(err.status_code, message).body(), status_code=err.status_code, headers=headers)

    def allowed_methods(scope) -> list[str]:
        """The methods the routes at ``scope``'s path answer (OPTIONS included); none for no route."""
        methods = set()
        for route in app.router.routes:
            if route.matches(scope)[0] != Match.NONE:
                methods |= getattr(route, "methods", None) or set()
        return sorted(methods | {"OPTIONS"}) if methods else []

    class AnswerOptions:
        """``OPTIONS`` on any route: 204 with ``Allow``. A plain ASGI middleware: Starlette's
        ``BaseHTTPMiddleware`` would wrap every request's ``receive`` and hide a client's
        disconnect from the handlers that watch for it."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http" or scope["method"] != "OPTIONS":
                return await self.inner(scope, receive, send)
            methods = allowed_methods(dict(scope, method="GET"))
            if methods:
                response = Response(status_code=204, headers={"Allow": ", ".join(methods)})
            else:
                response = JSONResponse(APIError(404, f"OPTIONS {scope['path']}: Not Found").body(), status_code=404)
            await response(scope, receive, send)

    app.add_middleware(AnswerOptions)

    async def read_body(http: Request) -> bytes:
        """The request body, refused with 413 past ``max_body_bytes`` (read in chunks: a client
        that says nothing of its length, or lies about it, cannot make the server hold more)."""
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(413, f"the request body is {int(declared):,} bytes; the limit is {max_body_bytes:,}")
        chunks, size = [], 0
        async for chunk in http.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"the request body exceeds the limit of {max_body_bytes:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    def check_model(body: dict) -> None:
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise APIError(400, f"model: expected a string, got {json.dumps(name)}", "model")
        if name is not None and name != model_name:
            raise APIError(404, f"model: {name!r} is not served here; this server serves {model_name!r}", "model",
                           code="model_not_found")  # fmt: skip

    handoffs: dict[asyncio.AbstractEventLoop, _Handoff] = {}

    def submit(ids: list[int], params) -> tuple[EngineRequest, _Events]:
        loop = asyncio.get_running_loop()
        events = _Events(handoffs.setdefault(loop, _Handoff(loop)))
        request = EngineRequest(ids, params, events.emit, deadline=time.monotonic() + request_timeout)
        try:
            engine.submit(request)
        except QueueFull as err:
            raise APIError(429, f"the server is busy: {err}; retry later", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None  # fmt: skip
        except EngineStopped as err:
            raise APIError(503, str(err), kind="server_error") from None
        except ValueError as err:  # past the limits already checked; the engine's own guard
            raise APIError(400, str(err), code="context_length_exceeded") from None
        return request, events

    async def collect(http: Request, request: EngineRequest, events: _Events, logprobs) -> tuple[str, dict]:
        """The whole text and the final event of a non-streamed request."""
        text = []
        checked = time.monotonic()
        while True:
            try:
                kind, payload = await asyncio.wait_for(events.queue.get(), timeout=0.5)
            except TimeoutError:
                kind = None
            if time.monotonic() - checked >= 0.5:  # tokens may come faster than the wait times out
                checked = time.monotonic()
                if await http.is_disconnected():
                    request.cancel()
                    raise APIError(499, "the client closed the connection")
            if kind is None:
                continue
            if kind == "token":
                text.append(payload["text"])
                if logprobs is not None:
                    logprobs.add(payload["choice"])
            elif kind == "done":
                text.append(payload["text"])
                metrics.request_duration.observe(time.monotonic() - request.arrival)
                return "".join(text), payload
            else:
                raise _engine_error(payload)

    def _engine_error(payload: dict) -> APIError:
        status = payload["status"]
        kind = "timeout" if status == 408 else "server_error"
        return APIError(status, payload["message"], kind=kind)

    async def stream(request: EngineRequest, events: _Events, first, piece, last, usage_object, include_usage,
                     logprobs):  # fmt: skip
        """Server-sent events: ``first`` (or nothing), a ``piece(text, logprobs)`` chunk per token
        with text or log-probabilities, ``last(finish_reason)``, the usage chunk when asked, then
        ``[DONE]``. An engine error is sent as an ``error`` event."""
        try:
            if first is not None:
                yield _sse(first)
            while True:
                ready = [await events.queue.get()]
                while not events.queue.empty():  # a client that lags gets what piled up in one write
                    ready.append(events.queue.get_nowait())
                out = []
                for kind, payload in ready:
                    if kind == "token":
                        lp = logprobs.add(payload["choice"]) if logprobs is not None else None
                        if payload["text"] or lp is not None:
                            out.append(_sse(piece(payload["text"], lp)))
                    elif kind == "done":
                        if payload["text"]:
                            out.append(_sse(piece(payload["text"], None)))
                        out.append(_sse(last(payload["finish_reason"])))
                        if include_usage:
                            use = protocol.usage(payload["prompt_tokens"], payload["completion_tokens"])
                            out.append(_sse(usage_object(use)))
                        metrics.request_duration.observe(time.monotonic() - request.arrival)
                        yield "".join(out) + _sse("[DONE]")
                        return
                    else:  # the status line has gone: the error is an event, then the stream ends
                        yield "".join(out) + _sse(_engine_error(payload).body()) + _sse("[DONE]")
                        return
                if out:
                    yield "".join(out)
        finally:
            request.cancel()  # a client gone mid-stream frees its slot; a finished request ignores it

    def counted(endpoint: str):
        def wrap(handler):
            async def run(http: Request):
                status = 500
                try:
                    response = await handler(http)
                    status = response.status_code
                    return response
                except APIError as err:
                    status = err.status
                    raise
                finally:
                    metrics.requests.labels(endpoint, str(status)).inc()

            run.__name__ = handler.__name__
            return run

        return wrap

    @app.post("/v1/completions")
    @counted("/v1/completions")
    async def completions(http: Request):
        authorize(http)
        body = protocol.parse_body(await read_body(http))
        check_model(body)
        prompt = protocol.completion_prompt(body, vocab_size)
        streamed = protocol._boolean(body, "stream", False)
        include_usage = protocol.stream_options(body)
        echo = protocol._boolean(body, "echo", False)
        if echo and formatter.family == "t5":
            raise APIError(400, "echo: a text-to-text model's answer does not continue its prompt", "echo")
        # a text-to-text answer is a whole translation: by default as long as the server allows
        default = default_completion_tokens if formatter.family == "lm" else None
        params = protocol.sampling_params(body, "completions", default, limits)
        languages = {k: _optional_string(body, k) for k in ("source_lang", "target_lang")}
        ids = await asyncio.to_thread(formatter.completion_ids, prompt, **languages)  # off the event loop
        protocol.fit_max_tokens(params, len(ids), limits, "prompt", body.get("max_tokens") is not None)
        if echo and isinstance(prompt, list):
            prompt = formatter.tokenizer.decode(prompt, skip_special_tokens=False)
        prefix = prompt if echo else ""
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        request, events = submit(ids, params)
        logprobs = None
        if params.logprobs is not None:  # the generated tokens' (an echoed prompt's are not computed)
            logprobs = protocol.LogprobsBuilder(token_bytes, "completions", offset=len(prefix))
        if streamed:

            def piece(text, lp):
                return protocol.completion_object(rid, model_name, text, None, lp, None)

            def last(reason):
                return protocol.completion_object(rid, model_name, "", reason, None, None)

            def usage_object(use):
                return protocol.usage_chunk(rid, model_name, "text_completion", use)

            first = protocol.completion_object(rid, model_name, prefix, None, None, None) if prefix else None
            return _event_stream(stream(request, events, first, piece, last, usage_object, include_usage, logprobs))
        text, done = await collect(http, request, events, logprobs)
        use = protocol.usage(done["prompt_tokens"], done["completion_tokens"])
        result = logprobs.result() if logprobs is not None else None
        return JSONResponse(
            protocol.completion_object(rid, model_name, prefix + text, done["finish_reason"], result, use)
        )

    @app.post("/v1/chat/completions")
    @counted("/v1/chat/completions")
    async def chat_completions(http: Request):
        authorize(http)
        body = protocol.parse_body(await read_body(http))
        check_model(body)
        messages = protocol.chat_messages(body)
        streamed = protocol._boolean(body, "stream", False)
        include_usage = protocol.stream_options(body)
        params = protocol.sampling_params(body, "chat", None, limits)
        languages = {k: _optional_string(body, k) for k in ("source_lang", "target_lang")}
        ids = await asyncio.to_thread(formatter.chat_ids, messages, **languages)
        asked = body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None
        protocol.fit_max_tokens(params, len(ids), limits, "messages", asked)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        request, events = submit(ids, params)
        logprobs = protocol.LogprobsBuilder(token_bytes, "chat") if params.logprobs is not None else None
        if streamed:

            def piece(text, lp):
                return protocol.chat_chunk(rid, model_name, {"content": text} if text else {}, None, lp)

            def last(reason):
                return protocol.chat_chunk(rid, model_name, {}, reason)

            def usage_object(use):
                return protocol.usage_chunk(rid, model_name, "chat.completion.chunk", use)

            first = protocol.chat_chunk(rid, model_name, {"role": "assistant", "content": ""})
            return _event_stream(stream(request, events, first, piece, last, usage_object, include_usage, logprobs))
        text, done = await collect(http, request, events, logprobs)
        use = protocol.usage(done["prompt_tokens"], done["completion_tokens"])
        result = logprobs.result() if logprobs is not None else None
        return JSONResponse(protocol.chat_object(rid, model_name, text, done["finish_reason"], result, use))

    def _event_stream(chunks) -> StreamingResponse:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models(http: Request):
        authorize(http)
        created = int(time.time())
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "switchformer"}]}  # fmt: skip

    @app.api_route("/v1/models/{name}", methods=["GET", "HEAD"])
    async def model(http: Request, name: str):
        authorize(http)
        if name != model_name:
            raise APIError(404, f"model: {name!r} is not served here; this server serves {model_name!r}", "model",
                           code="model_not_found")  # fmt: skip
        return {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "switchformer"}

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        alive = engine._thread_alive() and engine._accepting
        body = {"status": "ok" if alive else "unavailable", "model": model_name,
                "running": engine.running(), "waiting": engine.queue_length()}  # fmt: skip
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.api_route("/", methods=["GET", "HEAD"])
    async def chat_page():
        page = importlib.resources.files("switchformer.serve").joinpath("chat.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    if cors_origins:  # outermost: a preflight is answered before authorization, which browsers do not send
        app.add_middleware(
            CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"], max_age=600,
        )  # fmt: skip
    app.state.engine, app.state.metrics = engine, metrics
    return app


def _optional_string(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise APIError(400, f"{name}: expected a string", name)
    return value
