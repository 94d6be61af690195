"""Training throughput with 1, 2 and 4 processes (expert parallelism over all of them, gloo on CPU).

Each run is `switchformer train` under torchrun with the same per-rank batch, so the global batch
grows with the process count (weak scaling). Reports tokens/s from the runs' own metrics and the
all-to-all volume per step: every Switch layer sends each token's activations to the rank holding
its expert and back, forward and backward, and a fraction (P-1)/P of them leaves the rank.

    python benchmarks/parallel_scaling.py                    # 1, 2, 4 processes on this machine
    python benchmarks/parallel_scaling.py --procs 1 2 --steps 30
"""

from __future__ import annotations

import argparse
import json
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per rank")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=192)
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sf-scaling-"))
    corpus = work / "corpus.txt"
    import pydoc_data.topics

    corpus.write_text("\n\n".join(pydoc_data.topics.topics.values()))
    common = [
        "--preset",
        "tiny",
        "--data",
        str(corpus),
        "--no-progress",
        "--out-dir",
        str(work),
        "--max-steps",
        str(args.steps),
        "--set",
        f"batch_size={args.batch_size}",
        "--set",
        f"seq_len={args.seq_len}",
        "--set",
        f"d_model={args.d_model}",
        "--set",
        f"num_experts={args.experts}",
        "--set",
        "log_every=5",
        "--set",
        f"eval_every={10 * args.steps}",
        "--set",
        f"checkpoint_every={10 * args.steps}",
        "--set",
        "sample_tokens=1",
    ]
    layers = 2  # the tiny preset: 4 layers, a Switch layer every other one
    print(
        f"CPU, gloo, d_model {args.d_model}, {args.experts} experts, {args.batch_size} x {args.seq_len} tokens "
        f"per rank, {args.steps} steps, median tokens/s of the logged windows after the first"
    )
    print("| processes | expert parallel | global tokens/step | tokens/s | per process | all-to-all MB/step/rank |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = None
    for procs in args.procs:
        name = f"p{procs}"
        if procs == 1:
            cmd = [sys.executable, "-m", "switchformer", "train", *common, "--run-name", name]
        else:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(procs),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(free_port()),
                "-m",
                "switchformer",
                "train",
                *common,
                "--run-name",
                name,
                "--expert-parallel",
                str(procs),
            ]
        if base is not None:  # same tokenizer for every run
            (work / name).mkdir(exist_ok=True)
            (work / name / "tokenizer.json").write_bytes((work / base / "tokenizer.json").read_bytes())
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"run with {procs} processes failed")
        base = base or name
        rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
        tokens_per_s = statistics.median(speeds)
        tokens = args.batch_size * args.seq_len
        # 4 exchanges (dispatch, return; and both again in backward) of d_model fp32 values per token
        volume = layers * 4 * tokens * args.d_model * 4 * (procs - 1) / procs / 1e6
        print(
            f"| {procs} | {procs} | {tokens * procs:,} | {tokens_per_s:,.0f} | {tokens_per_s / procs:,.0f} | "
            f"{volume:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
