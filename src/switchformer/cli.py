"""The ``switchformer`` command."""

from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    import torch

    from switchformer import SwitchMoE
    from switchformer.moe import num_active_expert_params

    with torch.device("meta"):  # shapes only: no memory for the weights
        layer = SwitchMoE(args.d_model, args.d_ff, args.num_experts, top_k=args.top_k, activation=args.activation)
    total = sum(p.numel() for p in layer.parameters())
    active = num_active_expert_params(layer)
    print(
        f"SwitchMoE: d_model {args.d_model}, d_ff {args.d_ff}, {args.num_experts} experts, top-{args.top_k}, "
        f"{args.activation}"
    )
    print(f"  parameters: {total:,} total, {active:,} active per token")
    print(f"  matmul FLOPs per token (forward): {2 * active:,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchformer", description="Switch Transformers in PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser(
        "info",
        help="parameters and FLOPs of a Switch layer",
        epilog="example: switchformer info --d-model 768 --d-ff 3072 --num-experts 128",
    )
    info.add_argument("--d-model", type=int, default=768)
    info.add_argument("--d-ff", type=int, default=3072)
    info.add_argument("--num-experts", type=int, default=8)
    info.add_argument("--top-k", type=int, default=1)
    info.add_argument("--activation", default="relu")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"switchformer: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
