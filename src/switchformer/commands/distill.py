"""``switchformer distill``: distil a Switch run into a dense student (teacher probabilities and labels)."""

from __future__ import annotations

import argparse

# The library is imported inside run(), on use: the parser is built from every command module, and
# `switchformer --help` should not load the library (models, tokenizers, plotting).

NAME = "distill"
HELP = "distil a Switch run into a dense student (teacher probabilities and labels)"
EPILOG = """examples:
  switchformer distill runs/switch runs/student --max-steps 800               # its dense twin, alpha 0.75
  switchformer distill runs/switch runs/small --max-steps 800 --set d_model=128 --temperature 2"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "teacher", help="a Switch run or checkpoint: its data, tokenizer and settings are the student's"
    )
    parser.add_argument("out", help="the student's run directory")
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--alpha", type=float, default=0.75, help="the teacher's weight in the loss (default: 0.75)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softens both distributions (default: 1)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a student setting (lr, batch_size, ...; d_model, num_layers, d_ff, num_heads for a smaller student; "
        "default: the teacher's FLOP-matched dense twin)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, help="(default: the teacher's)")
    parser.add_argument("--device", help="cpu or cuda")
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from switchformer.lifecycle.distill import distill
    from switchformer.train.config import TrainConfig
    from switchformer.train.sources import parse_setting

    fields = set(TrainConfig.__dataclass_fields__)
    sets = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ValueError(f"--set {item}: expected KEY=VALUE with KEY a training setting")
        sets[key] = parse_setting(key, value)
    if args.seed is not None:
        sets["seed"] = args.seed
    summary = distill(
        args.teacher, args.out, args.max_steps, alpha=args.alpha, temperature=args.temperature, sets=sets,
        device=args.device, progress=not args.no_progress, announce=lambda line: print(line, flush=True),
    )  # fmt: skip
    print(f"validation loss {summary['eval_loss']:.4f} (the student's cross-entropy), run directory: {args.out}")
    return 0
