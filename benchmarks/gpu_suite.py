"""Everything a session lent a GPU measures, in one call of at most eight minutes: the steps below in
order, each a subprocess with a time limit of its own, their output in one log (``--out``, default
``$OUT`` or ``gpu-suite``) for ``docs/gpu.md``, and a JSON line per step (its command, exit status,
seconds). A step that fails or runs out of time is recorded and the suite goes on.

1. ``cuda_check.py``: parity with Hugging Face on the device, the expert backends, bf16 training,
   the serving engine (correctness; its speed part skipped: step 3 measures speed);
2. ``moe_layer.py``: the Switch layer against a dense FFN and Hugging Face's layer, E = 8, 64, 128,
   Switch-Base sizes, bf16;
3. ``vs_transformers.py``: Switch-Base-8 training and greedy generation (batch 1 and 32) against
   transformers, bf16 autocast;
4. ``static_decoding.py``: the growing cache, the static step and the step compiled into CUDA graphs
   (``torch.compile(mode="reduce-overhead")``), against transformers' ``generate``, Switch-Base-8,
   batch 1 and 32;
5. ``serve_load.py``: the server on the device at 1, 16 and 64 clients, the growing step, then the
   static step compiled.

    python benchmarks/gpu_suite.py                      # on the GPU machine, from the checkout
    python benchmarks/gpu_suite.py --smoke --device cpu # the same steps at toy sizes (the smoke test)

On the device machine the project need not be installed: the suite puts ``src`` and ``benchmarks``
on ``PYTHONPATH`` for its steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def steps(device: str, smoke: bool) -> list[tuple[str, list[str], int]]:
    """(name, arguments after ``python``, seconds allowed) of every step."""
    if smoke:  # toy sizes: every script and flag exercised in seconds on a CPU
        table = [
            ("cuda_check", f"cuda_check.py --device {device} --skip-speed", 300),
            ("moe_layer", f"moe_layer.py --device {device} --d-model 32 --d-ff 64 --tokens 256 --experts 4 "
                          "--repeats 1 --warmup 1 --scatter-combine", 120),
            ("vs_transformers", f"vs_transformers.py --device {device} --experts 4 --steps 1 --gen-repeats 1 "
                                "--batch 2 --seq 16 --new-tokens 4 --gen-batches 1 2", 300),
            ("static_decoding", f"static_decoding.py --device {device} --experts 4 --batches 1 2 --new-tokens 4 "
                                "--repeats 1 --hf", 300),
            ("serve_load", f"serve_load.py --device {device} --preset test --clients 1 2 --rounds 1 --requests 2 "
                           "--max-tokens 4", 300),
        ]  # fmt: skip
    else:
        bf16 = f"--device {device} --dtype bfloat16"
        table = [
            ("cuda_check", f"cuda_check.py --device {device} --skip-speed", 90),
            ("moe_layer", f"moe_layer.py {bf16} --d-model 768 --d-ff 3072 --tokens 32768 --experts 8 64 128 "
                          "--repeats 10 --warmup 3 --scatter-combine", 60),
            ("vs_transformers", f"vs_transformers.py {bf16} --size base --experts 8 --vocab 32128 --batch 16 "
                                "--seq 512 --steps 8 --gen-repeats 3 --gen-batches 1 32 --gen-weights bfloat16", 110),
            ("static_decoding", f"static_decoding.py {bf16} --size base --experts 8 --vocab 32128 --batches 1 32 "
                                "--compile --hf --repeats 3 --new-tokens 64", 110),
            ("serve_load", f"serve_load.py --device {device} --clients 1 16 64 --rounds 1 --requests 64", 50),
            ("serve_load_static", f"serve_load.py --device {device} --clients 1 16 64 --rounds 1 --requests 64 "
                                  "--cache static --compile", 60),
        ]  # fmt: skip
    return [(name, command.split(), limit) for name, command, limit in table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="toy sizes (a CPU check that every step runs)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-suite")))
    parser.add_argument("--only", nargs="+", help="run only these steps, by name")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log, summary = args.out / "gpu_suite.log", args.out / "gpu_suite.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]))
    failed = 0
    with log.open("a") as out:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"# gpu_suite {stamp}, {sys.executable}, device {args.device}{' (smoke)' if args.smoke else ''}\n")
        out.flush()
        if args.device == "cuda":
            subprocess.run(["nvidia-smi"], stdout=out, stderr=subprocess.STDOUT, check=False)
        for name, command, limit in steps(args.device, args.smoke):
            if args.only and name not in args.only:
                continue
            out.write(f"\n## {name}: python {' '.join(command)}  (limit {limit} s)\n")
            out.flush()
            start = time.monotonic()
            try:
                status = subprocess.run([sys.executable, *command], cwd=HERE, env=env, stdout=out,
                                        stderr=subprocess.STDOUT, timeout=limit, check=False).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                status = "timeout"
            seconds = round(time.monotonic() - start, 1)
            failed += status != 0
            out.write(f"## {name}: exit {status} after {seconds} s\n")
            out.flush()
            with summary.open("a") as f:
                f.write(json.dumps({"step": name, "command": command, "status": status, "seconds": seconds}) + "\n")
            print(f"{name}: exit {status} after {seconds} s", flush=True)
    print(f"log: {log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
