"""Continuous batching: one scheduler thread owns the model; every iteration it admits waiting
requests into free slots of the batch (prefill), then steps every running request together by one
token, each with its own sampling settings, stop rules and length, and retires each request the
step it finishes, times out or its client goes away (the loop of vLLM's and SGLang's schedulers).

**Cache layout**: see :mod:`switchformer.serve.batch`.

**One request, one routing group.** Each prompt is prefilled alone, routed with the model's eval
routing (as ``generate`` routes it); a step's tokens are routed dropless, which is what each of
them gets alone (one token never exceeds an expert's capacity of at least one slot). So requests
never compete for expert capacity, and a greedy request's tokens under load are those of
``generate`` for it alone. (Expert-choice routing, which ranks tokens across the batch, keeps its
own capacity; a batch of such a model may differ from a request alone.)

**Failures stay with their request.** A request whose prefill or token choice raises gets an
error and leaves; a batched step that raises is retried row by row, and only the rows that fail
alone are ended. The scheduler itself never stops on a request's error.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from switchformer.inference.routing import inference_routing, routing_description
from switchformer.inference.scope import DecodingScope
from switchformer.inference.static import check_cache_options, decode_step_fn
from switchformer.models.outputs import RouterStats
from switchformer.models.t5 import SwitchT5
from switchformer.moe.layer import switch_layers
from switchformer.serve.batch import Batch, LMBatch, Row, T5Batch
from switchformer.serve.sampling import RowSampler, SamplingParams, TextStream, TokenChoice

log = logging.getLogger("switchformer")


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests (HTTP 429)."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class Request:
    """One generation request. ``prompt_ids``: a decoder-only prompt, or an encoder-decoder source
    (formatted and ending in EOS). ``emit(kind, payload)`` is called from the scheduler thread:
    ``("token", {"text", "choice"})`` per generated token (``text`` may be empty while a character
    or a possible stop string is incomplete), then ``("done", {"finish_reason", "text",
    "prompt_tokens", "completion_tokens"})`` or ``("error", {"message", "status"})`` once."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[str, dict], None]
    deadline: float | None = None  # time.monotonic() after which the request is ended with 408
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrival: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """The client went away: the request leaves the batch at the next step."""
        self.cancelled.set()


@dataclass
class EngineStats:
    """Counters the server's ``/metrics`` reads (written by the scheduler thread only). Every figure
    is exact at any rate: counters are totals, the rate is a difference of totals (no sample cap), and
    each time to first token goes straight to ``first_token_observer`` (the server's histogram)."""

    requests_finished: collections.Counter = field(default_factory=collections.Counter)  # by finish reason
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    first_token_observer: Callable[[float], None] | None = None  # seconds from arrival to the first token
    expert_tokens: dict[str, Tensor] = field(default_factory=dict)  # layer name -> tokens per expert
    window: float = 10.0  # seconds the rate is measured over
    # (time, generation_tokens) after each scheduler iteration that generated tokens, back to the last
    # one at or before the window's start: what the rate needs, however many tokens a step makes
    totals: collections.deque = field(default_factory=collections.deque)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_total(self, now: float | None = None) -> None:
        """Notes ``generation_tokens`` at ``now`` (the scheduler, after an iteration)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self.totals and self.totals[-1][1] == self.generation_tokens:
                return
            self.totals.append((now, self.generation_tokens))
            while len(self.totals) > 1 and self.totals[1][0] <= now - self.window:
                self.totals.popleft()

    def tokens_per_second(self, now: float | None = None) -> float:
        """Tokens generated in the last ``window`` seconds, divided by the window: the total now less
        the total at the window's start (a step's tokens count at the step's end)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            totals = list(self.totals)
        before = 0
        for at, total in totals:
            if at > now - self.window:
                break
            before = total
        latest = totals[-1][1] if totals else 0
        return (latest - before) / self.window


class Engine:
    """The scheduler: ``submit`` requests from any thread; ``start`` runs the loop in a thread of
    its own; ``stop`` ends it (running requests finish within ``timeout`` seconds, or get an
    error). ``max_batch_size``: requests decoded together; ``max_queue``: requests waiting beyond
    them (:class:`QueueFull` past it); ``max_prefill_tokens``: prompt tokens admitted per
    iteration before the running requests step again (at least one prompt); ``max_request_tokens``:
    the most positions one request may take (prompt and answer; the server's limits keep requests
    within it); ``columns``: cache positions per slot, more than ``max_request_tokens`` (default
    twice it: fewer shifts). ``cache``: ``"dynamic"`` (the step attends to the filled columns of
    the running rows) or ``"static"`` (``decode_step``: fixed shapes, no host reads within a step;
    :mod:`switchformer.serve.batch`), ``compile`` compiling that step whole (CUDA graphs on a GPU).
    Raises ``ValueError`` for sizes that cannot hold a request, or for a model the static step
    cannot run."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        max_prefill_tokens: int = 2048,
        max_request_tokens: int,
        max_source_tokens: int = 0,
        routing: str = "eval",
        columns: int | None = None,
        cache: str = "dynamic",
        compile: bool = False,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be >= 1, got {max_batch_size}")
        if max_queue < 0:
            raise ValueError(f"max_queue: must be >= 0, got {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.family = "t5" if isinstance(model, SwitchT5) else "lm"
        self.eos = model.config.eos_token_id
        self.max_batch_size, self.max_queue, self.max_prefill_tokens = max_batch_size, max_queue, max_prefill_tokens
        self.routing = routing
        self.max_request_tokens, self.max_source_tokens = max_request_tokens, max_source_tokens
        self.routing_text = routing_description(model, routing)  # refuses an unknown mode now, not at a step
        parameter = next(model.parameters())
        self.device, dtype = parameter.device, parameter.dtype
        columns = columns or 2 * max_request_tokens
        if columns <= max_request_tokens:  # a request's keys plus the step's column must always fit
            raise ValueError(f"columns: {columns} must exceed max_request_tokens={max_request_tokens}")
        if self.family == "t5":
            self.batch: Batch = T5Batch(model, max_batch_size, columns, max_source_tokens, self.device, dtype)
        else:
            self.batch = LMBatch(model, max_batch_size, columns, self.device, dtype)
        self.static_step = None
        if check_cache_options(cache, compile, model):
            self.static_step = decode_step_fn(model, compile)
        self.stats = EngineStats()
        self._moe_layers = switch_layers(model)  # walked once, not per step
        self._step_layer_names = step_layer_names(model)  # what decode_step's counts belong to
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._closed = False
        self._drain_deadline: float | None = None  # set by drain(): past it, what remains is ended
        self._thread: threading.Thread | None = None
        self.fault_hook: Callable[[Request], None] | None = None  # tests: raise inside one request

    # -- the outside: any thread ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="switchformer-scheduler", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue ``request``. Raises ``ValueError`` for a request the cache cannot hold (the server's
        limits keep requests within it: this guards direct use), :class:`QueueFull`,
        :class:`EngineStopped`."""
        self.check_fits(len(request.prompt_ids), request.params.max_tokens)
        with self._cond:
            if not self._accepting:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue + max(self.max_batch_size - len(self.batch), 0):
                raise QueueFull(
                    f"{len(self.batch)} requests running and {len(self._waiting)} waiting (max_batch_size "
                    f"{self.max_batch_size}, max_queue {self.max_queue})"
                )
            self._waiting.append(request)
            self._cond.notify()

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """``ValueError`` naming what does not fit this engine's cache: an empty prompt, a prompt and
        answer longer than ``max_request_tokens`` (decoder-only), a source longer than
        ``max_source_tokens`` or an answer longer than ``max_request_tokens - 1`` (encoder-decoder)."""
        if prompt_tokens < 1 or max_tokens < 1:
            raise ValueError(f"request: needs a prompt and max_tokens >= 1 (got {prompt_tokens} and {max_tokens})")
        if self.family == "lm" and prompt_tokens + max_tokens > self.max_request_tokens:
            raise ValueError(f"request: {prompt_tokens} prompt tokens and max_tokens {max_tokens} exceed the "
                             f"engine's max_request_tokens={self.max_request_tokens}")  # fmt: skip
        if self.family == "t5" and (prompt_tokens > self.max_source_tokens or max_tokens >= self.max_request_tokens):
            raise ValueError(f"request: a source of {prompt_tokens} tokens and max_tokens {max_tokens} exceed the "
                             f"engine's max_source_tokens={self.max_source_tokens} or max_request_tokens="
                             f"{self.max_request_tokens} (less one for the decoder start)")  # fmt: skip

    def queue_length(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return len(self.batch)

    def drain(self, timeout: float) -> None:
        """Take no new requests; the running and waiting ones may finish within ``timeout``
        seconds, after which the scheduler ends each with an error (503). Returns at once (the
        server calls it when the shutdown signal comes, so that every client gets an ending
        before the HTTP server closes connections)."""
        with self._cond:
            self._accepting = False
            deadline = time.monotonic() + timeout
            self._drain_deadline = min(self._drain_deadline or deadline, deadline)
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """:meth:`drain`, wait until nothing runs or waits (at most ``timeout`` seconds and a
        little more for the scheduler to end the rest), then stop the thread."""
        self.drain(timeout)
        end = time.monotonic() + timeout + 2.0
        while time.monotonic() < end and (self._waiting or len(self.batch)) and self._thread_alive():
            time.sleep(0.02)
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(timeout, 5.0))

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the scheduler thread ------------------------------------------------------------------

    def _loop(self) -> None:
        scope = DecodingScope()  # derived weights (fused projections) kept across steps
        while True:
            with self._cond:
                while not self._waiting and not len(self.batch) and not self._closed:
                    self._cond.wait(timeout=0.5)
                if self._closed:
                    break
            if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
                self._end_all(("the server is shutting down", 503))
                continue
            try:
                with torch.inference_mode(), scope.active():
                    self._retire_gone()
                    self._admit()
                    if len(self.batch):
                        self._step()
                self.stats.record_total()
            except Exception:  # a bug outside any one request: end the running ones, keep serving
                log.exception("scheduler iteration failed")
                for slot in reversed(range(len(self.batch))):
                    self._finish(slot, error=("internal error in the scheduler", 500))
        self._end_all(("the server is shutting down", 503))

    def _end_all(self, error: tuple[str, int]) -> None:
        for slot in reversed(range(len(self.batch))):
            self._finish(slot, error=error)
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for request in waiting:
            request.emit("error", {"message": error[0], "status": error[1]})

    def _retire_gone(self) -> None:
        now = time.monotonic()
        for slot in reversed(range(len(self.batch))):
            request = self.batch.rows[slot].request
            if request.cancelled.is_set():
                self._finish(slot, reason="cancelled")
            elif request.deadline is not None and now > request.deadline:
                self._finish(slot, error=("request timed out", 408))

    def _admit(self) -> None:
        budget = self.max_prefill_tokens
        admitted = 0
        while len(self.batch) < self.max_batch_size and (admitted == 0 or budget > 0):
            with self._cond:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
            if request.cancelled.is_set():
                continue
            if request.deadline is not None and time.monotonic() > request.deadline:
                request.emit("error", {"message": "request timed out while waiting", "status": 408})
                continue
            admitted += 1
            budget -= len(request.prompt_ids)
            try:
                self._prefill(request)
            except Exception as err:  # this request's fault; the others go on
                log.exception("request %s failed in prefill", request.id)
                if self.batch.rows and self.batch.rows[-1].request is request:
                    self._finish(len(self.batch) - 1, error=(f"generation failed: {err}", 500))
                else:
                    request.emit("error", {"message": f"generation failed: {err}", "status": 500})

    def _new_row(self, request: Request) -> Row:
        history = request.prompt_ids if self.family == "lm" else [self.model.config.decoder_start_token_id]
        sampler = RowSampler(request.params, history, self.device)
        return Row(request, sampler, TextStream(self.tokenizer, request.params.stop))

    def _prefill(self, request: Request) -> None:
        row = self._new_row(request)
        stats = RouterStats()
        self.stats.prompt_tokens += len(request.prompt_ids)
        if self.family == "t5":
            row.source_length = len(request.prompt_ids)
            with self._routing(self.routing):
                cross = self.batch.encode(request.prompt_ids, stats)
            self.batch.admit(row, cross)
            self._count_experts(stats)
            return
        with self._routing(self.routing):
            logits, keys_values = self.batch.prefill(request.prompt_ids, stats)
        self._count_experts(stats)
        self.batch.admit(row, keys_values)
        self._advance(len(self.batch) - 1, logits)

    def _step(self) -> None:
        n = len(self.batch)
        tokens = [row.pending for row in self.batch.rows]
        self.batch.make_room()  # a column for this step's keys
        stats = RouterStats()
        counts = None
        try:
            with self._routing("dropless"):
                if self.static_step is not None:
                    logits, counts = self.batch.static_step(n, tokens, self.static_step)
                else:
                    logits = self.batch.step(slice(0, n), tokens, stats)
            self.batch.length += 1
        except Exception:
            if self.static_step is not None:  # once, not at every step: the growing cache from here on
                log.exception("the static decoding step failed; the engine decodes with the growing cache from now on")
                self.static_step = None
            else:
                log.exception("a batched step failed; stepping its rows one by one")
            self._step_rows_alone(tokens)
            return
        self.stats.steps += 1
        if counts is None:
            self._count_experts(stats)
        else:
            self._add_expert_counts(zip(self._step_layer_names, counts))
        self._advance_all(logits)

    def _step_rows_alone(self, tokens: list[int]) -> None:
        """After a failed batched step: each row alone; a row that fails alone is ended. Rewriting a
        column a failed step wrote already puts the same values there."""
        results: list[Tensor | Exception] = []
        for slot, token in enumerate(tokens):
            try:
                with self._routing("dropless"):
                    results.append(self.batch.step(slice(slot, slot + 1), [token], RouterStats())[0])
            except Exception as err:
                results.append(err)
        self.batch.length += 1
        for slot in reversed(range(len(results))):
            result = results[slot]
            if isinstance(result, Exception):
                self._finish(slot, error=(f"generation failed: {result}", 500))
            else:
                self._advance(slot, result)

    def _advance_all(self, logits: Tensor) -> None:
        """Choose every row's next token: one argmax for the plain greedy rows, the row's own
        sampler for the others; then retire the finished rows (from the last, so slots hold)."""
        greedy = logits.argmax(-1).tolist()
        for slot in reversed(range(len(self.batch))):
            row = self.batch.rows[slot]
            if row.request.params.plain_greedy:
                self._accept(slot, TokenChoice(greedy[slot]))
            else:
                self._advance(slot, logits[slot])

    def _advance(self, slot: int, logits: Tensor) -> None:
        row = self.batch.rows[slot]
        try:
            if self.fault_hook is not None:
                self.fault_hook(row.request)
            choice = row.sampler.choose(logits)
        except Exception as err:
            log.exception("request %s failed choosing a token", row.request.id)
            self._finish(slot, error=(f"generation failed: {err}", 500))
            return
        self._accept(slot, choice)

    def _accept(self, slot: int, choice: TokenChoice) -> None:
        row = self.batch.rows[slot]
        request, token = row.request, choice.token
        row.sampler.record(token)
        row.completion_tokens += 1
        self.stats.generation_tokens += 1
        if row.completion_tokens == 1 and self.stats.first_token_observer is not None:
            self.stats.first_token_observer(time.monotonic() - request.arrival)
        if token == self.eos:  # the end of the text: no token of it is sent
            self._finish(slot, reason="stop")
            return
        text = row.text.add(token)
        request.emit("token", {"text": text, "choice": choice})
        if row.text.stopped:
            self._finish(slot, reason="stop")
        elif row.completion_tokens >= request.params.max_tokens:
            self._finish(slot, reason="length")
        else:
            row.pending = token

    def _finish(self, slot: int, reason: str | None = None, error: tuple[str, int] | None = None) -> None:
        row = self.batch.rows[slot]
        request = row.request
        self.batch.remove(slot)
        if error is not None:
            self.stats.requests_finished["error"] += 1
            request.emit("error", {"message": error[0], "status": error[1]})
            return
        self.stats.requests_finished[reason] += 1
        tail = row.text.finish() if reason != "cancelled" else ""
        request.emit(
            "done",
            {
                "finish_reason": reason,
                "text": tail,
                "prompt_tokens": len(request.prompt_ids),
                "completion_tokens": row.completion_tokens,
            },
        )

    def _routing(self, routing: str):
        return inference_routing(self.model, routing, decoding=True, layers=self._moe_layers)

    def _count_experts(self, stats: RouterStats) -> None:
        self._add_expert_counts((name, aux.tokens_per_expert) for name, aux in stats.layers)

    def _add_expert_counts(self, layers) -> None:
        for name, counts in layers:
            counts = counts.detach()
            total = self.stats.expert_tokens.get(name)
            self.stats.expert_tokens[name] = counts.clone() if total is None else total + counts


def step_layer_names(model) -> list[str]:
    """The names (as :class:`RouterStats` gives them) of the Switch layers a decoding step runs,
    in ``decode_step``'s order of its tokens-per-expert counts."""
    if isinstance(model, SwitchT5):
        return [f"decoder.{i}" for i, block in enumerate(model.decoder.blocks) if block.ffn.sparse]
    return [f"layers.{i}" for i, block in enumerate(model.blocks) if block.ffn.sparse]
