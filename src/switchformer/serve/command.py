"""``switchformer serve SOURCE``: load a run, a checkpoint or a Hugging Face directory, build the
engine and the application, and run uvicorn until interrupted (graceful shutdown: running
requests get ``--shutdown-timeout`` seconds)."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

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


def load_source(source: str | Path) -> Served:
    """Model, tokenizer and run config of a run, a checkpoint or a Hugging Face directory."""
    from switchformer.data.tokenizer import load_tokenizer
    from switchformer.runs.directory import is_hugging_face_source, run_dir_of
    from switchformer.train.run import check_tokenizer_fits, load_run

    path = Path(source)
    if path.is_file():
        raise ValueError(f"{path}: a file; serve takes a run directory, a checkpoint or a Hugging Face directory")
    if is_hugging_face_source(path):
        from switchformer.interop.hf import from_hf
        from switchformer.interop.tokenizers import source_tokenizer

        model = from_hf(path).eval()
        tokenizer_file, note = source_tokenizer(path)
        if note:
            log.info("tokenizer: %s", note)
        tokenizer = load_tokenizer(tokenizer_file)
        check_tokenizer_fits(tokenizer, model, tokenizer_file)
        return Served(model, tokenizer, None, path.resolve().name)
    model, tokenizer, config = load_run(path)
    return Served(model, tokenizer, config, run_dir_of(path).resolve().name)


def limits_for(served: Served, max_prompt_tokens: int | None, max_tokens: int | None):
    """The request limits: a decoder-only model's context is its ``max_seq_len``; an
    encoder-decoder's sources and answers default to the run's ``seq_len`` (512 for an import)."""
    from switchformer.serve.protocol import Limits

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


def _check_flags(args) -> None:
    for flag in ("max_batch_size", "max_prompt_tokens", "max_tokens", "request_timeout", "shutdown_timeout"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{flag.replace('_', '-')}: must be a finite number > 0, got {value}")
    for flag in ("api_key", "served_model_name"):
        value = getattr(args, flag)
        if value is not None and not value.strip():
            raise ValueError(f"--{flag.replace('_', '-')}: empty")
    for origin in args.cors_origin or []:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s:]+(:\d{1,5})?", origin):
            raise ValueError(f"--cors-origin: {origin!r} is not an origin (scheme://host[:port], no path; or '*')")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue: must be >= 0, got {args.max_queue}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port: must be in 1-65535, got {args.port}")


def build_app(args):
    """The application for ``args`` (the parsed ``serve`` flags), engine not yet started."""
    from switchformer.runtime import resolve_device
    from switchformer.serve.app import create_app
    from switchformer.serve.engine import Engine
    from switchformer.serve.prompts import PromptFormatter

    check_serve_installed()
    _check_flags(args)
    served = load_source(args.source)
    device = resolve_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    served.model.to(device=device, dtype=dtype)
    limits = limits_for(served, args.max_prompt_tokens, args.max_tokens)
    lm = limits.context is not None
    engine = Engine(
        served.model,
        served.tokenizer,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_request_tokens=limits.context if lm else limits.max_tokens + 1,
        max_source_tokens=0 if lm else limits.max_prompt_tokens,
        routing=args.routing,
    )
    formatter = PromptFormatter(served.tokenizer, served.model, served.config)
    api_key = args.api_key or os.environ.get("SWITCHFORMER_API_KEY") or None
    name = args.served_model_name or served.name
    app = create_app(
        engine, formatter, model_name=name, limits=limits, api_key=api_key,
        request_timeout=args.request_timeout, shutdown_timeout=args.shutdown_timeout,
        cors_origins=args.cors_origin,
    )  # fmt: skip
    return app, served, limits, api_key, name


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


def run_serve(args) -> int:
    import uvicorn

    from switchformer.inference.routing import routing_description

    app, served, limits, api_key, name = build_app(args)
    sock = bind(args.host, args.port)
    engine = app.state.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # the signal: running requests get their ending first
            engine.drain(args.shutdown_timeout)
            super().handle_exit(sig, frame)

    family = "encoder-decoder (text-to-text)" if limits.context is None else "decoder-only"
    print(
        f"serving {name!r}: {family}, routing {routing_description(served.model, args.routing)}, up to "
        f"{args.max_batch_size} requests at once, prompts up to {limits.max_prompt_tokens} tokens, max_tokens up to "
        f"{limits.max_tokens}{', API key required' if api_key else ''}\n"
        f"  http://{args.host}:{args.port}/  (chat page), /v1/completions, /v1/chat/completions, /metrics",
        file=sys.stderr,
        flush=True,
    )
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without --api-key: anyone who reaches it can use it", file=sys.stderr)
    # the HTTP server waits for the connections the drain ends (a little after its deadline)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout + 5)
    # uvicorn re-raises the signal that stopped it once it has shut down cleanly, under the handler that
    # was there before: the default one would end the process with 143 after a graceful SIGTERM
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C, raised again the same way
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
