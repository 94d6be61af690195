"""``switchformer compare``: train a Switch model and its FLOP-matched dense twin; table and plot."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from switchformer.commands.common import COMPARE_PRESET, add_config_arguments, config_from_args

# The library is imported inside run(), on use: the parser is built from every command module, and
# `switchformer --help` should not load the library (models, tokenizers, plotting).

NAME = "compare"
HELP = "train a Switch model and its FLOP-matched dense twin; table and plot"
EPILOG = """examples:
  switchformer compare                    # Switch vs its FLOP-matched dense twin, compare-long preset (about an hour)
  switchformer compare --preset compare   # the quick check (about 15 minutes; within seed noise)
  switchformer compare --preset compare --max-steps 200 --set num_experts=8
  switchformer compare --seeds 3          # three seeds: is the gap larger than the spread?
  switchformer compare --preset compare-gpu --device cuda   # d_model 512, 8 layers, 49M tokens each (one GPU)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, COMPARE_PRESET)
    parser.add_argument(
        "--seeds", type=int, default=1, help="repeat the pair with seeds seed, seed+1, ... and summarise the spread"
    )


def run(args) -> int:
    from switchformer.analysis.compare import format_seed_summary, format_table, run_compare, run_compare_seeds
    from switchformer.runs.files import write_text_atomic

    config = config_from_args(args, COMPARE_PRESET)
    out_dir = Path(config.out_dir) / (config.run_name or f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.seeds == 1:
        result = run_compare(config, out_dir, progress=not args.no_progress, device=args.device)
        table = format_table(result)
        write_text_atomic(out_dir / "compare.md", table + "\n")
        print(table)
        print(f"plot: {result['plot']}")
        return 0
    results = run_compare_seeds(config, out_dir, args.seeds, progress=not args.no_progress, device=args.device)
    parts = [f"## seed {r['seed']}\n\n{format_table(r)}\n\nplot: {r['plot']}" for r in results]
    text = "\n\n".join([*parts, "## all seeds\n\n" + format_seed_summary(results)])
    write_text_atomic(out_dir / "compare.md", text + "\n")
    print(text)
    return 0
