"""Load on ``switchformer serve``: N concurrent clients (default 1, 4, 16, 64) on 127.0.0.1, each
streaming requests of 64 new tokens from ``/v1/completions``; aggregate generated tokens/s,
p50/p99 time to first token and time per output token (between a request's first and last
token), against the same requests served one at a time (1 client) as the baseline.

The server runs in its own process (``python -m switchformer serve``), as users run it; the clients
are asyncio tasks with ``httpx`` in this one. Each level sends the same requests (prompts of 3 to
40 words, greedy, ``max_tokens`` 64; an untrained model rarely ends early, and the tokens counted
are those the server reports). Levels are interleaved over ``--rounds`` rounds (the order reverses
every round; a warm-up round is not kept) and medians are reported.

    python benchmarks/serve_load.py                           # the tiny preset's model, CPU (minutes)
    python benchmarks/serve_load.py --clients 1 16 --rounds 1 --requests 16    # a quick look
    python benchmarks/serve_load.py --run runs/my-run --device cuda
    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --engine-only     # the ceiling: no HTTP, no clients
    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --engine-only --dense-twin --rounds 7
                                                  # the same beside the preset's FLOP-matched dense twin
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

WORDS = "the a cat dog sat on mat ran fast slow big small red blue green house tree sun moon river".split()


def prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(count)]


def make_run(folder: Path, preset: str, dense: bool = False) -> Path:
    """A run of the preset's model after one step (the server's speed does not depend on the
    weights); ``dense``: its FLOP-matched dense twin (``sparse_step=0``)."""
    name = "bench-dense" if dense else "bench"
    command = [sys.executable, "-m", "switchformer", "train", "--preset", preset, "--model", "lm", "--max-steps", "1",
               "--out-dir", str(folder), "--run-name", name, "--no-progress"]  # fmt: skip
    if dense:
        command += ["--set", "sparse_step=0"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return folder / name


def start_server(run: Path, port: int, args) -> subprocess.Popen:
    command = [sys.executable, "-m", "switchformer", "serve", str(run), "--port", str(port), "--log-level", "warning",
               "--max-batch-size", str(args.max_batch_size), "--max-queue", "1024"]  # fmt: skip
    if args.device:
        command += ["--device", args.device]
    command += ["--cache", args.cache[0]] + (["--compile"] if args.compile else [])
    env = dict(os.environ)
    if args.server_threads:  # the server's PyTorch threads (the clients need a core of their own here)
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start within 120 s")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                now = time.perf_counter()
                first = first or now
                last = now
    return {"ttft": (first or time.perf_counter()) - start, "tokens": tokens,
            "tpot": (last - first) / (tokens - 1) if first and tokens > 1 else None}  # fmt: skip


async def level(url: str, texts: list[str], clients: int, max_tokens: int) -> dict:
    queue = list(enumerate(texts))
    results = []

    async def worker(client):
        while queue:
            _, text = queue.pop(0)
            results.append(await one_request(client, url, text, max_tokens))

    limits = httpx.Limits(max_connections=clients + 4)
    # TCP_NODELAY on the clients' side too: small writes never wait for a delayed ACK
    transport = httpx.AsyncHTTPTransport(limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    async with httpx.AsyncClient(timeout=600, transport=transport) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    tpot = sorted(r["tpot"] for r in results if r["tpot"] is not None)
    return {"tokens_per_s": tokens / elapsed, "ttft": ttft, "tpot": tpot, "requests": len(results), "tokens": tokens}


def engine_only(
    runs: dict[str, Path], levels: list[int], max_tokens: int, rounds: int, caches=("dynamic",), compile=False
) -> None:
    """The scheduler's decoding step without HTTP, in this process: ms per step with N requests
    decoding together (their prefills excluded), the ceiling of what batching gives end to end.
    Several ``runs`` (name -> run) and ``caches`` (the engine's decoding step: ``dynamic``,
    ``static``) are measured in interleaved rounds, each level of each once a round; medians."""
    import torch

    from switchformer.inference.scope import DecodingScope
    from switchformer.serve.engine import Engine, Request
    from switchformer.serve.sampling import SamplingParams
    from switchformer.serve.server import load_source

    served = {name: load_source(run) for name, run in runs.items()}
    texts = prompts(max(levels))

    def step_ms(name: str, cache: str, n: int) -> float:
        model, tok = served[name].model, served[name].tokenizer
        context = model.config.max_seq_len
        engine = Engine(model, tok, max_batch_size=n, max_request_tokens=context, cache=cache,
                        compile=compile and cache == "static")  # fmt: skip
        for text in texts[:n]:
            ids = tok.encode(text).ids[: context - max_tokens - 1]
            engine._waiting.append(Request(ids, SamplingParams(max_tokens=max_tokens, temperature=0), lambda *a: None))
        with torch.inference_mode(), DecodingScope().active():
            engine._admit()
            start, steps = time.perf_counter(), 0
            while len(engine.batch):
                engine._step()
                steps += 1
        return (time.perf_counter() - start) / max(steps, 1) * 1e3

    variants = [(name, cache) for name in runs for cache in caches]
    kept: dict[tuple, list[float]] = {(name, cache, n): [] for name, cache in variants for n in levels}
    if compile:  # the compiled step's first calls compile: one round that is not kept
        for name, cache in variants:
            for n in levels:
                step_ms(name, cache, n)
    for _ in range(rounds):
        for name, cache in variants:
            for n in levels:
                kept[name, cache, n].append(step_ms(name, cache, n))
    threads = torch.get_num_threads()
    print(f"\nthe scheduler's decoding step alone (no HTTP, {threads} thread(s), interleaved, medians of {rounds}):\n")
    print("| model | cache | requests | ms per step | tokens/s | x one at a time | x the dynamic step |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, cache in variants:
        one = statistics.median(kept[name, cache, 1])
        for n in levels:
            ms = statistics.median(kept[name, cache, n])
            dynamic = statistics.median(kept[name, "dynamic", n]) if "dynamic" in caches else float("nan")
            label = cache + (" (compiled)" if compile and cache == "static" else "")
            rates = f"{n / ms * 1e3:.0f} | {n * one / ms:.2f}x | {dynamic / ms:.2f}x"
            print(f"| {name} | {label} | {n} | {ms:.2f} | {rates} |")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(int(q * len(values)), len(values) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a run to serve (default: the --preset model after one training step)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=64, help="requests per level (default: 64)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=64, help="the server's --max-batch-size")
    parser.add_argument("--rounds", type=int, default=3, help="kept rounds (one more warms up)")
    parser.add_argument("--device", help="the server's --device")
    parser.add_argument(
        "--server-threads", type=int, default=max((os.cpu_count() or 2) - 1, 1),
        help="OMP_NUM_THREADS of the server (default: all cores but one, which the clients use)",
    )  # fmt: skip
    parser.add_argument("--engine-only", action="store_true", help="the scheduler's step alone, no server")
    parser.add_argument(
        "--dense-twin", action="store_true",
        help="with --engine-only: the preset's FLOP-matched dense twin too (sparse_step=0), interleaved",
    )  # fmt: skip
    parser.add_argument(
        "--cache", nargs="+", choices=["dynamic", "static"], default=["dynamic"],
        help="the server's --cache; with --engine-only several, interleaved (default: dynamic)",
    )  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="the static step compiled (serve --compile)")
    args = parser.parse_args()
    if len(args.cache) > 1 and not args.engine_only:
        parser.error("--cache: one value, except with --engine-only")
    levels = sorted(set(args.clients) | {1})
    texts = prompts(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else make_run(Path(tmp), args.preset)
        if args.engine_only:
            runs = {"switch" if not args.run else run.name: run}
            if args.dense_twin:
                if args.run:
                    parser.error("--dense-twin: builds the --preset's dense twin; give --preset, not --run")
                runs["dense twin"] = make_run(Path(tmp), args.preset, dense=True)
            engine_only(runs, levels, args.max_tokens, args.rounds, args.cache, args.compile)
            return
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = start_server(run, port, args)
        try:
            url = f"http://127.0.0.1:{port}/v1/completions"
            kept: dict[int, list[dict]] = {n: [] for n in levels}
            for round_index in range(args.rounds + 1):
                order = levels if round_index % 2 == 0 else list(reversed(levels))
                for n in order:
                    result = asyncio.run(level(url, texts, n, args.max_tokens))
                    if round_index:  # the first round warms up
                        kept[n].append(result)
                    rate = result["tokens_per_s"]
                    print(f"round {round_index} clients {n:3d}: {rate:8.1f} tokens/s", file=sys.stderr)
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    base = statistics.median(r["tokens_per_s"] for r in kept[1])
    print(f"\nserve load: {run.name if args.run else args.preset + ' preset model'}, {args.requests} requests of "
          f"{args.max_tokens} new tokens per level, server --max-batch-size {args.max_batch_size} --cache "
          f"{args.cache[0]}{' --compile' if args.compile else ''} on "
          f"{args.server_threads} thread(s), "
          f"{os.cpu_count()} CPUs, medians of {args.rounds} rounds\n")  # fmt: skip
    print("| clients | tokens/s | x one at a time | p50 TTFT (ms) | p99 TTFT (ms) | p50 per token (ms) "
          "| p99 per token (ms) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in levels:
        runs = kept[n]
        rate = statistics.median(r["tokens_per_s"] for r in runs)
        ttft = [statistics.median(percentile(r["ttft"], q) for r in runs) * 1e3 for q in (0.5, 0.99)]
        tpot = [statistics.median(percentile(r["tpot"], q) for r in runs) * 1e3 for q in (0.5, 0.99)]
        print(f"| {n} | {rate:.0f} | {rate / base:.2f}x | {ttft[0]:.0f} | {ttft[1]:.0f} | {tpot[0]:.1f} "
              f"| {tpot[1]:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
