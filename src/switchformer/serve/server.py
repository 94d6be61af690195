"""A server of a run, a checkpoint or a Hugging Face directory: the source loaded, the engine and the
application built (:func:`build_server`), the socket bound (:func:`bind`) and uvicorn run until
interrupted (:func:`run_server`; graceful shutdown: running requests get ``shutdown_timeout``
seconds)."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from switchformer.data.tokenizer import load_tokenizer
from switchformer.interop.hf import from_hf
from switchformer.interop.tokenizers import source_tokenizer
from switchformer.runs.directory import is_hugging_face_source, run_dir_of
from switchformer.runtime import resolve_device
from switchformer.serve.engine import Engine
from switchformer.serve.prompts import PromptFormatter
from switchformer.serve.protocol import Limits
from switchformer.train.run import check_tokenizer_fits, load_run

log = logging.getLogger("switchformer")

SERVE_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client"}
HF_DEFAULT_LENGTH = 512  # an imported T5 has no length of its own (relative positions): sources and answers


def check_serve_installed() -> None:
    missing = [pip for module, pip in SERVE_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ValueError(f"serve needs {', '.join(missing)}: pip install 'switchformer[serve]'")


@dataclass
class Served:
    model: torch.nn.Module
    tokenizer: object
    config: object  # the run's TrainConfig; None for a Hugging Face directory
    name: str


def load_source(source: str | Path, dtype: str = "float32", max_memory: int | None = None, device=None) -> Served:
    """Model, tokenizer and run config of a run, a checkpoint or a Hugging Face directory, loaded
    memory-mapped in ``dtype`` on ``device`` within ``max_memory`` bytes (experts offloaded when
    they do not all fit; :mod:`switchformer.models.placement`)."""
    path = Path(source)
    options = dict(dtype=dtype, max_memory=max_memory, device=resolve_device(device))
    if path.is_file():
        raise ValueError(f"{path}: a file; serve takes a run directory, a checkpoint or a Hugging Face directory")
    if is_hugging_face_source(path):
        model = from_hf(path, **options).eval()
        tokenizer_file, note = source_tokenizer(path)
        if note:
            log.info("tokenizer: %s", note)
        tokenizer = load_tokenizer(tokenizer_file)
        check_tokenizer_fits(tokenizer, model, tokenizer_file)
        return Served(model, tokenizer, None, path.resolve().name)
    model, tokenizer, config = load_run(path, **options)
    return Served(model, tokenizer, config, run_dir_of(path).resolve().name)


def limits_for(served: Served, max_prompt_tokens: int | None, max_tokens: int | None):
    """The request limits: a decoder-only model's context is its ``max_seq_len``; an
    encoder-decoder's sources and answers default to the run's ``seq_len`` (512 for an import)."""
    if not served.model.is_encoder_decoder:
        context = served.model.config.max_seq_len
        limits = Limits(max_prompt_tokens or context - 1, max_tokens or context - 1, context)
        if limits.max_prompt_tokens >= context:
            raise ValueError(f"--max-prompt-tokens: {limits.max_prompt_tokens}; the model's context is {context}")
        if limits.max_tokens >= context:
            raise ValueError(f"--max-tokens: {limits.max_tokens}; the model's context is {context} (prompt included)")
        return limits
    length = served.config.seq_len if served.config is not None else HF_DEFAULT_LENGTH
    return Limits(max_prompt_tokens or length, max_tokens or length, None)


@dataclass
class Server:
    """What ``serve`` runs: the application (engine not yet started), what it serves, its limits."""

    app: object
    served: Served
    limits: object
    api_key: str | None
    name: str


def build_server(
    source: str | Path, *, device: str | None = None, dtype: str = "float32", max_memory: int | None = None,
    max_batch_size: int = 16,
    max_queue: int = 256, max_prompt_tokens: int | None = None, max_tokens: int | None = None,
    routing: str = "eval", api_key: str | None = None, served_model_name: str | None = None,
    request_timeout: float = 600.0, shutdown_timeout: float = 10.0, cors_origins: list[str] | None = None,
    cache: str = "dynamic", compile: bool = False,
) -> Server:  # fmt: skip
    """The server of ``source`` (a run, a checkpoint or a Hugging Face directory) with these settings
    (``serve --help`` says each); ``api_key`` None: ``$SWITCHFORMER_API_KEY``, else none."""
    check_serve_installed()
    served = load_source(source, dtype, max_memory, device)
    limits = limits_for(served, max_prompt_tokens, max_tokens)
    lm = limits.context is not None
    engine = Engine(
        served.model,
        served.tokenizer,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        max_request_tokens=limits.context if lm else limits.max_tokens + 1,
        max_source_tokens=0 if lm else limits.max_prompt_tokens,
        routing=routing,
        cache=cache,
        compile=compile,
    )
    formatter = PromptFormatter(served.tokenizer, served.model, served.config)
    from switchformer.serve.app import create_app  # FastAPI: after check_serve_installed named what is missing

    api_key = api_key or os.environ.get("SWITCHFORMER_API_KEY") or None
    name = served_model_name or served.name
    app = create_app(
        engine, formatter, model_name=name, limits=limits, api_key=api_key,
        request_timeout=request_timeout, shutdown_timeout=shutdown_timeout, cors_origins=cors_origins,
    )  # fmt: skip
    return Server(app, served, limits, api_key, name)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is announced: a port in use or an unknown host
    is a one-line error of ours, not the HTTP server's."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(f"--host: {host!r} cannot be resolved ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    # proto must say TCP: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that
    # say so, and with it on, each token of a stream after the first request on a connection
    # waited for the client's delayed ACK (about 40 ms: measured, a whole 64-token answer in one go)
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ValueError(f"--port: cannot listen on {host}:{port} ({err.strerror})") from None
    return sock


def run_server(app, sock: socket.socket, shutdown_timeout: float, log_level: str = "info") -> None:
    """uvicorn on ``sock`` until Ctrl-C or SIGTERM; either is a graceful stop (running requests get
    ``shutdown_timeout`` seconds to finish) that returns normally."""
    import uvicorn  # the serve extra: imported when a server really runs

    engine = app.state.engine

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):  # the signal: running requests get their ending first
            engine.drain(shutdown_timeout)
            super().handle_exit(sig, frame)

    # the HTTP server waits for the connections the drain ends (a little after its deadline)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout + 5)
    # uvicorn re-raises the signal that stopped it once it has shut down cleanly, under the handler that
    # was there before: the default one would end the process with 143 after a graceful SIGTERM
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        _Uvicorn(config).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C, raised again the same way
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
