"""Between the scheduler thread and the event loop: a request submitted to the engine, and its
events (tokens, the end, an error) relayed back as a whole answer (:meth:`Relay.collect`) or as
server-sent events (:meth:`Relay.stream`). A client that disconnects (a stream's task is cancelled,
or a non-streamed request sees the disconnect while it waits) cancels its request, which leaves the
batch at the next step."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from fastapi import Request

from switchformer.serve import protocol
from switchformer.serve.engine import Engine, EngineStopped, QueueFull
from switchformer.serve.engine import Request as EngineRequest
from switchformer.serve.http import sse
from switchformer.serve.metrics import ServerMetrics
from switchformer.serve.protocol import APIError


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


class Events:
    """The scheduler thread's events for one request, handed to the event loop."""

    def __init__(self, handoff: _Handoff):
        self.handoff, self.queue = handoff, asyncio.Queue()

    def emit(self, kind: str, payload: dict) -> None:
        self.handoff.put(self.queue, (kind, payload))


def engine_error(payload: dict) -> APIError:
    status = payload["status"]
    return APIError(status, payload["message"], kind="timeout" if status == 408 else "server_error")


class Relay:
    """Requests into ``engine`` and their events back; ``request_timeout``: seconds from arrival
    after which a request is ended with a 408 error."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, request_timeout: float):
        self.engine, self.metrics, self.request_timeout = engine, metrics, request_timeout
        self.handoffs: dict[asyncio.AbstractEventLoop, _Handoff] = {}

    def submit(self, ids: list[int], params) -> tuple[EngineRequest, Events]:
        loop = asyncio.get_running_loop()
        events = Events(self.handoffs.setdefault(loop, _Handoff(loop)))
        request = EngineRequest(ids, params, events.emit, deadline=time.monotonic() + self.request_timeout)
        try:
            self.engine.submit(request)
        except QueueFull as err:
            raise APIError(429, f"the server is busy: {err}; retry later", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None  # fmt: skip
        except EngineStopped as err:
            raise APIError(503, str(err), kind="server_error") from None
        except ValueError as err:  # past the limits already checked; the engine's own guard
            raise APIError(400, str(err), code="context_length_exceeded") from None
        return request, events

    async def collect(self, http: Request, request: EngineRequest, events: Events, logprobs) -> tuple[str, dict]:
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
            if kind == "token":
                text.append(payload["text"])
                if logprobs is not None:
                    logprobs.add(payload["choice"])
            elif kind == "done":
                text.append(payload["text"])
                self.metrics.request_duration.observe(time.monotonic() - request.arrival)
                return "".join(text), payload
            elif kind is not None:
                raise engine_error(payload)

    async def stream(self, request: EngineRequest, events: Events, shape, include_usage: bool, logprobs):
        """Server-sent events: ``shape.first`` (or nothing), a ``shape.piece(text, logprobs)`` chunk per
        token with text or log-probabilities, ``shape.last(finish_reason)``, the usage chunk when asked
        (``shape.usage``), then ``[DONE]``. An engine error is sent as an ``error`` event."""
        try:
            if shape.first is not None:
                yield sse(shape.first)
            while True:
                ready = [await events.queue.get()]
                while not events.queue.empty():  # a client that lags gets what piled up in one write
                    ready.append(events.queue.get_nowait())
                out = []
                for kind, payload in ready:
                    if kind == "token":
                        lp = logprobs.add(payload["choice"]) if logprobs is not None else None
                        if payload["text"] or lp is not None:
                            out.append(sse(shape.piece(payload["text"], lp)))
                    elif kind == "done":
                        if payload["text"]:
                            out.append(sse(shape.piece(payload["text"], None)))
                        out.append(sse(shape.last(payload["finish_reason"])))
                        if include_usage:
                            use = protocol.usage(payload["prompt_tokens"], payload["completion_tokens"])
                            out.append(sse(shape.usage(use)))
                        self.metrics.request_duration.observe(time.monotonic() - request.arrival)
                        yield "".join(out) + sse("[DONE]")
                        return
                    else:  # the status line has gone: the error is an event, then the stream ends
                        yield "".join(out) + sse(engine_error(payload).body()) + sse("[DONE]")
                        return
                if out:
                    yield "".join(out)
        finally:
            request.cancel()  # a client gone mid-stream frees its slot; a finished request ignores it
