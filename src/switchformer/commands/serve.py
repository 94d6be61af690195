"""``switchformer serve``: serve a model over an OpenAI-compatible HTTP API with continuous batching; chat page."""

from __future__ import annotations

import argparse
import math
import re
import sys

from switchformer.commands.common import add_inference_arguments

# The library is imported inside run(), on use: the parser is built from every command module, and
# `switchformer --help` should not load the library (models, tokenizers, plotting).

NAME = "serve"
HELP = "serve a model over an OpenAI-compatible HTTP API with continuous batching; chat page"
EPILOG = """examples:
  switchformer serve runs/chat                      # http://127.0.0.1:8000/ : the chat page; the OpenAI API under /v1
  switchformer serve runs/de-en --port 8080         # a translation run: /v1/completions translates the prompt
  switchformer serve path/to/hf-switch-dir --api-key secret --max-batch-size 32
  switchformer serve path/to/switch-base-256 --dtype int8 --max-memory 20GiB   # experts offloaded to a cache
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}'"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a run, a checkpoint or a Hugging Face T5/Switch directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    parser.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (default: $SWITCHFORMER_API_KEY, else none)"
    )
    parser.add_argument("--served-model-name", help="the model id of the API (default: the run's folder name)")
    parser.add_argument(
        "--cors-origin", action="append", metavar="ORIGIN",
        help="a browser origin (https://app.example.com; '*' for any) whose pages may call the API (CORS); "
        "repeat for several (default: none)",
    )  # fmt: skip
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together (default: 16)")
    parser.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting beyond those; more get 429 (default: 256)"
    )
    parser.add_argument(
        "--max-prompt-tokens", type=int, help="longest prompt or source (default: what the model takes)"
    )
    parser.add_argument("--max-tokens", type=int, help="largest max_tokens a request may ask (default: the model's)")
    parser.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds before a request is ended with 408 (default: 600)"
    )
    parser.add_argument(
        "--shutdown-timeout", type=float, default=10.0,
        help="on Ctrl-C or SIGTERM, seconds running requests get to finish (default: 10)",
    )  # fmt: skip
    parser.add_argument(
        "--routing", choices=["eval", "dropless"], default="eval",
        help="how prompts are routed: the model's eval routing (default) or dropless; decoding steps never drop",
    )  # fmt: skip
    parser.add_argument(
        "--cache", choices=["dynamic", "static"], default="dynamic",
        help="the decoding step: dynamic (attends to the filled columns; default) or static (fixed shapes per "
        "power-of-two number of running requests, no host reads: what CUDA graphs capture); the same tokens",
    )  # fmt: skip
    parser.add_argument(
        "--compile", action="store_true",
        help="with --cache static: compile the step (torch.compile; CUDA graphs on a GPU); the first requests "
        "of each batch size wait for it",
    )  # fmt: skip
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    add_inference_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args) -> int:
    from switchformer.inference.routing import routing_description
    from switchformer.models.placement import parse_size
    from switchformer.serve.server import bind, build_server, run_server

    check_flags(args)
    max_memory = parse_size(args.max_memory) if args.max_memory is not None else None
    if max_memory is not None or args.dtype == "int8":
        from switchformer.runtime import return_freed_memory

        return_freed_memory()  # freed experts leave the process at once (runtime.py says why)
    server = build_server(
        args.source, device=args.device, dtype=args.dtype or "float32", max_memory=max_memory,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
        routing=args.routing, api_key=args.api_key, served_model_name=args.served_model_name,
        request_timeout=args.request_timeout, shutdown_timeout=args.shutdown_timeout, cors_origins=args.cors_origin,
        cache=args.cache, compile=args.compile,
    )  # fmt: skip
    sock = bind(args.host, args.port)
    limits = server.limits
    family = "encoder-decoder (text-to-text)" if limits.context is None else "decoder-only"
    print(
        f"serving {server.name!r}: {family}, routing {routing_description(server.served.model, args.routing)}, "
        f"decoding step {args.cache}{' (compiled)' if args.compile else ''}, up to "
        f"{args.max_batch_size} requests at once, prompts up to {limits.max_prompt_tokens} tokens, max_tokens up to "
        f"{limits.max_tokens}{', API key required' if server.api_key else ''}\n"
        f"  http://{args.host}:{args.port}/  (chat page), /v1/completions, /v1/chat/completions, /metrics",
        file=sys.stderr,
        flush=True,
    )
    if server.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without --api-key: anyone who reaches it can use it", file=sys.stderr)
    run_server(server.app, sock, args.shutdown_timeout, args.log_level)
    return 0


def check_flags(args) -> None:
    """The serve flags' values, each refused by name before anything loads."""
    for flag in ("max_batch_size", "max_prompt_tokens", "max_tokens", "request_timeout", "shutdown_timeout"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            what = "an integer >= 1" if isinstance(value, int) else "a finite number > 0"  # counts, or seconds
            raise ValueError(f"--{flag.replace('_', '-')}: must be {what}, got {value}")
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
    if args.compile and args.cache != "static":
        raise ValueError("--compile: only the static decoding step compiles whole; add --cache static")
