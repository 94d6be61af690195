"""``switchformer upcycle``: turn a dense model into a Switch model whose experts copy its FFNs."""

from __future__ import annotations

import argparse

# The library is imported inside run(), on use: the parser is built from every command module, and
# `switchformer --help` should not load the library (models, tokenizers, plotting).

NAME = "upcycle"
HELP = "turn a dense model into a Switch model whose experts copy its FFNs"
EPILOG = """examples:
  switchformer upcycle runs/dense runs/upcycled --num-experts 8   # top-2 every other layer: the dense function
  switchformer train --init-from runs/upcycled --run-name up --max-steps 500 --set lr=1e-3 --set optimizer=adamw
  switchformer upcycle path/to/t5-small-dir t5-moe --num-experts 16 --sparse-step 2 --expert-noise 0.01"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help="a dense run or checkpoint (sparse_step=0), or a dense Hugging Face T5 directory"
    )
    parser.add_argument("out", help="the new run directory (new or empty); train --init-from OUT trains it further")
    parser.add_argument("--num-experts", type=int, required=True, help="experts per Switch layer (>= 2)")
    parser.add_argument("--sparse-step", type=int, default=2, help="a Switch layer every k layers (default: 2)")
    parser.add_argument(
        "--top-k", type=int, default=2, choices=[1, 2],
        help="2 (default): gates renormalised over the two chosen experts, so the model starts as the dense one; "
        "1: Switch's routing, which scales each FFN by its router probability",
    )  # fmt: skip
    parser.add_argument(
        "--expert-noise", type=float, default=0.0,
        help="relative Gaussian noise on each expert's copy, to break their symmetry (default: 0)",
    )  # fmt: skip
    parser.add_argument("--capacity-factor", type=float, help="(default: dropless, so that no token is dropped)")
    parser.add_argument("--seed", type=int, default=0, help="the routers' initialisation and the noise (default: 0)")


def run(args) -> int:
    from switchformer.lifecycle.upcycle import upcycle

    result = upcycle(
        args.source, args.out, args.num_experts, args.sparse_step, args.top_k, args.expert_noise, args.seed,
        args.capacity_factor, args.capacity_factor,
    )  # fmt: skip
    before, after = result["before"], result["after"]
    if args.top_k == 1:
        exact = "not the dense function at step 0 (top-1 gates scale each FFN by its router probability)"
    elif args.capacity_factor is not None:
        exact = "the dense function at step 0 where no token overflows an expert's capacity"
    elif args.expert_noise:
        exact = "the dense function at step 0 up to the expert noise"
    else:
        exact = "the dense model's function at step 0"
    print(f"upcycled {args.source} -> {args.out}: {args.num_experts} experts every {args.sparse_step} layer(s), "
          f"top-{args.top_k}; parameters {before['total']:,} -> {after['total']:,} ({after['active']:,} active per "
          f"token); {exact}")  # fmt: skip
    print(f"train it further: switchformer train --init-from {args.out} --run-name <name> --max-steps N")
    return 0
