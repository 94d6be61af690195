"""The HTTP layer: a FastAPI application over one :class:`~switchformer.serve.engine.Engine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as server-sent
events of OpenAI's chunks, ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus) and ``GET /`` (the chat page); every GET route answers HEAD too. With
an API key, the ``/v1/`` routes need ``Authorization: Bearer KEY`` (401 otherwise); the page, health
and metrics stay open. Requests reach the scheduler and come back through :mod:`~switchformer.serve.relay`;
the HTTP conventions are :mod:`~switchformer.serve.http`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from switchformer.data.token_bytes import TokenBytes
from switchformer.serve import protocol
from switchformer.serve.engine import Engine
from switchformer.serve.http import event_stream, install_conventions, read_body
from switchformer.serve.metrics import ServerMetrics
from switchformer.serve.prompts import PromptFormatter
from switchformer.serve.protocol import APIError, Limits
from switchformer.serve.relay import Relay


@dataclass
class _CompletionChunks:
    """The chunks of a streamed completion."""

    rid: str
    model: str
    prefix: str  # an echoed prompt, sent first

    @property
    def first(self):
        return protocol.completion_object(self.rid, self.model, self.prefix, None, None, None) if self.prefix else None

    def piece(self, text, logprobs):
        return protocol.completion_object(self.rid, self.model, text, None, logprobs, None)

    def last(self, reason):
        return protocol.completion_object(self.rid, self.model, "", reason, None, None)

    def usage(self, use):
        return protocol.usage_chunk(self.rid, self.model, "text_completion", use)


@dataclass
class _ChatChunks:
    """The chunks of a streamed chat completion."""

    rid: str
    model: str

    @property
    def first(self):
        return protocol.chat_chunk(self.rid, self.model, {"role": "assistant", "content": ""})

    def piece(self, text, logprobs):
        return protocol.chat_chunk(self.rid, self.model, {"content": text} if text else {}, None, logprobs)

    def last(self, reason):
        return protocol.chat_chunk(self.rid, self.model, {}, reason)

    def usage(self, use):
        return protocol.usage_chunk(self.rid, self.model, "chat.completion.chunk", use)


class _OpenAIRoutes:
    """The two generation endpoints and the model list, in OpenAI's request and response shapes."""

    def __init__(self, engine, formatter, relay, metrics, *, model_name, limits, api_key, default_completion_tokens,
                 max_body_bytes):  # fmt: skip
        self.engine, self.formatter, self.relay, self.metrics = engine, formatter, relay, metrics
        self.model_name, self.limits, self.api_key = model_name, limits, api_key
        self.default_completion_tokens, self.max_body_bytes = default_completion_tokens, max_body_bytes
        self.vocab_size = engine.model.config.vocab_size
        self.token_bytes = TokenBytes(formatter.tokenizer)  # what each token writes, for exact logprobs fields

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    def check_model(self, name) -> None:
        if name is not None and not isinstance(name, str):
            raise APIError(400, f"model: expected a string, got {json.dumps(name)}", "model")
        if name is not None and name != self.model_name:
            raise APIError(404, f"model: {name!r} is not served here; this server serves {self.model_name!r}",
                           "model", code="model_not_found")  # fmt: skip

    async def body(self, http: Request) -> dict:
        self.authorize(http)
        body = protocol.parse_body(await read_body(http, self.max_body_bytes))
        self.check_model(body.get("model"))
        return body

    async def completions(self, http: Request):
        body = await self.body(http)
        prompt = protocol.completion_prompt(body, self.vocab_size)
        streamed, include_usage = protocol._boolean(body, "stream", False), protocol.stream_options(body)
        echo = protocol._boolean(body, "echo", False)
        if echo and self.formatter.family == "t5":
            raise APIError(400, "echo: a text-to-text model's answer does not continue its prompt", "echo")
        # a text-to-text answer is a whole translation: by default as long as the server allows
        default = self.default_completion_tokens if self.formatter.family == "lm" else None
        params = protocol.sampling_params(body, "completions", default, self.limits)
        languages = {k: _optional_string(body, k) for k in ("source_lang", "target_lang")}
        ids = await asyncio.to_thread(self.formatter.completion_ids, prompt, **languages)  # off the event loop
        protocol.fit_max_tokens(params, len(ids), self.limits, "prompt", body.get("max_tokens") is not None)
        if echo and isinstance(prompt, list):
            prompt = self.formatter.tokenizer.decode(prompt, skip_special_tokens=False)
        prefix = prompt if echo else ""
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        request, events = self.relay.submit(ids, params)
        logprobs = None
        if params.logprobs is not None:  # the generated tokens' (an echoed prompt's are not computed)
            logprobs = protocol.LogprobsBuilder(self.token_bytes, "completions", offset=len(prefix))
        if streamed:
            shape = _CompletionChunks(rid, self.model_name, prefix)
            return event_stream(self.relay.stream(request, events, shape, include_usage, logprobs))
        text, done = await self.relay.collect(http, request, events, logprobs)
        use = protocol.usage(done["prompt_tokens"], done["completion_tokens"])
        result = logprobs.result() if logprobs is not None else None
        return JSONResponse(
            protocol.completion_object(rid, self.model_name, prefix + text, done["finish_reason"], result, use)
        )

    async def chat_completions(self, http: Request):
        body = await self.body(http)
        messages = protocol.chat_messages(body)
        streamed, include_usage = protocol._boolean(body, "stream", False), protocol.stream_options(body)
        params = protocol.sampling_params(body, "chat", None, self.limits)
        languages = {k: _optional_string(body, k) for k in ("source_lang", "target_lang")}
        ids = await asyncio.to_thread(self.formatter.chat_ids, messages, **languages)
        asked = body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None
        protocol.fit_max_tokens(params, len(ids), self.limits, "messages", asked)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        request, events = self.relay.submit(ids, params)
        logprobs = protocol.LogprobsBuilder(self.token_bytes, "chat") if params.logprobs is not None else None
        if streamed:
            shape = _ChatChunks(rid, self.model_name)
            return event_stream(self.relay.stream(request, events, shape, include_usage, logprobs))
        text, done = await self.relay.collect(http, request, events, logprobs)
        use = protocol.usage(done["prompt_tokens"], done["completion_tokens"])
        result = logprobs.result() if logprobs is not None else None
        return JSONResponse(protocol.chat_object(rid, self.model_name, text, done["finish_reason"], result, use))

    async def models(self, http: Request):
        self.authorize(http)
        return {"object": "list", "data": [self._model_object()]}

    async def model(self, http: Request, name: str):
        self.authorize(http)
        if name != self.model_name:
            raise APIError(404, f"model: {name!r} is not served here; this server serves {self.model_name!r}",
                           "model", code="model_not_found")  # fmt: skip
        return self._model_object()

    def _model_object(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "switchformer"}

    def counted(self, endpoint: str, handler):
        """``handler`` with its answer's status counted in ``/metrics``."""

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
                self.metrics.requests.labels(endpoint, str(status)).inc()

        run.__name__ = handler.__name__
        return run


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
    routes = _OpenAIRoutes(
        engine, formatter, Relay(engine, metrics, request_timeout), metrics, model_name=model_name, limits=limits,
        api_key=api_key, default_completion_tokens=default_completion_tokens, max_body_bytes=max_body_bytes,
    )  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, shutdown_timeout)

    app = FastAPI(title="switchformer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    for path, handler in (("/v1/completions", routes.completions), ("/v1/chat/completions", routes.chat_completions)):
        app.add_api_route(path, routes.counted(path, handler), methods=["POST"])
    get = ["GET", "HEAD"]
    app.add_api_route("/v1/models", routes.models, methods=get)
    app.add_api_route("/v1/models/{name}", routes.model, methods=get)

    async def health():
        alive = engine._thread_alive() and engine._accepting
        body = {"status": "ok" if alive else "unavailable", "model": model_name,
                "running": engine.running(), "waiting": engine.queue_length()}  # fmt: skip
        return JSONResponse(body, status_code=200 if alive else 503)

    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def chat_page():
        page = importlib.resources.files("switchformer.serve").joinpath("chat.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    app.add_api_route("/health", health, methods=get)
    app.add_api_route("/metrics", prometheus_metrics, methods=get)
    app.add_api_route("/", chat_page, methods=get)
    install_conventions(app, cors_origins)
    app.state.engine, app.state.metrics = engine, metrics
    return app


def _optional_string(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise APIError(400, f"{name}: expected a string", name)
    return value
