"""Training throughput and per-rank memory with 1, 2 and 4 processes: FSDP2 against the old
hand-written data parallelism (``fsdp=false``), with expert parallelism over every process.

Each run is `switchformer train` under torchrun (gloo on CPU) with the same per-rank batch, so the
global batch grows with the process count (weak scaling). Reported per layout: tokens/s (median of
the run's logged windows after the first), rank 0's parameters, gradients and optimizer state as
the run measured them (`memory_per_rank` in summary.json), and the all-to-all volume per step:
every Switch layer sends each token's activations to the rank holding its expert and back, forward
and backward, and a fraction (P-1)/P of them leaves the rank. Layouts run interleaved, round after
round (``--rounds``), and the table gives each one's median over rounds.

    python benchmarks/parallel_scaling.py                    # 1, 2, 4 processes on this machine
    python benchmarks/parallel_scaling.py --procs 1 2 --steps 30
    python benchmarks/parallel_scaling.py --memory-table     # estimates for Switch-Base sizes (no run)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_table() -> None:
    """Per-rank memory of Switch-Base-8 and -128 (Hugging Face's configurations) for a few
    layouts, from :mod:`switchformer.parallel.memory` (exact for these state tensors; tested)."""
    import torch

    from switchformer.models import SwitchT5
    from switchformer.parallel.memory import estimate_rank_memory

    base = dict(vocab_size=32128, d_model=768, d_ff=3072, num_layers=12, num_heads=12)  # SwitchT5Config: Switch-Base
    from switchformer.models.t5 import SwitchT5Config

    print("| model | parameters | processes | expert parallel | sharding | params+grads+AdamW per rank (fp32) |")
    print("|---|---:|---:|---:|---|---:|")
    tables = {
        8: [(1, 1, False), (8, 8, False), (8, 8, True)],
        128: [(1, 1, False), (8, 8, False), (8, 8, True), (64, 64, True), (64, 8, True)],
    }
    for experts, layouts in tables.items():
        with torch.device("meta"):
            model = SwitchT5(SwitchT5Config(**base, num_experts=experts))
        total = sum(p.numel() for p in model.parameters())
        for world, ep, fsdp in layouts:
            worst = max((estimate_rank_memory(model, world, ep, r, fsdp) for r in range(world)), key=lambda m: m.total)
            layout = "FSDP2" if fsdp and world > 1 else ("replicated" if world > 1 else "one process")
            print(
                f"| Switch-Base-{experts} | {total / 1e6:,.0f} M | {world} | {ep} | {layout} | "
                f"{worst.total * 4 / 2**30:,.2f} GiB |"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of every layout")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per rank")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=192)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--memory-table", action="store_true", help="print the Switch-Base estimates and exit")
    args = parser.parse_args()
    if args.memory_table:
        memory_table()
        return

    work = Path(tempfile.mkdtemp(prefix="sf-scaling-"))
    corpus = work / "corpus.txt"
    import pydoc_data.topics

    corpus.write_text("\n\n".join(pydoc_data.topics.topics.values()))
    common = [
        "--preset", "tiny", "--data", str(corpus), "--no-progress", "--out-dir", str(work),
        "--max-steps", str(args.steps), "--set", f"batch_size={args.batch_size}", "--set", f"seq_len={args.seq_len}",
        "--set", f"d_model={args.d_model}", "--set", f"num_experts={args.experts}", "--set", "log_every=5",
        "--set", f"eval_every={10 * args.steps}", "--set", f"checkpoint_every={10 * args.steps}",
        "--set", "sample_tokens=1",
    ]  # fmt: skip
    layers = 2  # the tiny preset: 4 layers, a Switch layer every other one
    layouts = [(1, True)] if 1 in args.procs else []
    layouts += [(procs, fsdp) for procs in args.procs if procs > 1 for fsdp in (False, True)]
    cores = os.cpu_count() or 1
    results: dict[tuple[int, bool], list[tuple[float, dict]]] = {layout: [] for layout in layouts}
    tokenizer = None
    for round_ in range(args.rounds):
        for procs, fsdp in layouts:
            name = f"p{procs}-{'fsdp' if fsdp else 'replicated'}-{round_}"
            settings = [*common, "--run-name", name, "--set", f"fsdp={str(fsdp).lower()}"]
            if procs == 1:
                cmd = [sys.executable, "-m", "switchformer", "train", *settings]
            else:
                cmd = [
                    sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                    "-m", "switchformer", "train", *settings, "--expert-parallel", str(procs),
                ]  # fmt: skip
            if tokenizer is not None:  # same tokenizer for every run
                (work / name).mkdir(exist_ok=True)
                (work / name / "tokenizer.json").write_bytes(tokenizer.read_bytes())
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // procs)))
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"run {name} failed")
            tokenizer = tokenizer or work / name / "tokenizer.json"
            rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
            speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
            memory = json.loads((work / name / "summary.json").read_text())["memory_per_rank"]
            results[(procs, fsdp)].append((statistics.median(speeds), memory))

    print(
        f"CPU ({cores} cores), gloo, d_model {args.d_model}, {args.experts} experts, {args.batch_size} x "
        f"{args.seq_len} tokens per rank, {args.steps} steps, {args.rounds} interleaved round(s)"
    )
    print(
        "| processes | data parallelism | global tokens/step | tokens/s | per process | "
        "rank 0: params / grads / optimizer (MiB) | all-to-all MB/step/rank |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for (procs, fsdp), runs in results.items():
        tokens_per_s = statistics.median(speed for speed, _ in runs)
        memory = runs[0][1]
        tokens = args.batch_size * args.seq_len
        # 4 exchanges (dispatch, return; and both again in backward) of d_model fp32 values per token
        volume = layers * 4 * tokens * args.d_model * 4 * (procs - 1) / procs / 1e6
        mib = " / ".join(f"{memory[k] * 4 / 2**20:.1f}" for k in ("parameters", "gradients", "optimizer"))
        kind = "-" if procs == 1 else ("FSDP2" if fsdp else "replicated (hand-written)")
        print(
            f"| {procs} | {kind} | {tokens * procs:,} | {tokens_per_s:,.0f} | {tokens_per_s / procs:,.0f} | {mib} | "
            f"{volume:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
