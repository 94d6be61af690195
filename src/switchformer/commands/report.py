"""``switchformer report``: PNG plots of a run: losses, expert load, dropped tokens."""

from __future__ import annotations

import argparse
from pathlib import Path

# The library is imported inside run(), on use: the parser is built from every command module, and
# `switchformer --help` should not load the library (models, tokenizers, plotting).

NAME = "report"
HELP = "PNG plots of a run: losses, expert load, dropped tokens"
EPILOG = """examples:
  switchformer report runs/quick --out quick-plots   # loss, expert load, dropped fraction
  switchformer report runs/multi --by-language       # which experts each source language uses"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory")
    parser.add_argument("--out", help="folder for the plots (default: ./<run name>-report; never the run itself)")
    parser.add_argument(
        "--by-language",
        action="store_true",
        help="also the share of each source language's tokens per expert and Switch layer (a multilingual "
        "seq2seq run; loads the model): routing_by_language.png and .json, and a table",
    )
    parser.add_argument("--data", nargs="+", help="with --by-language: these pairs instead of the validation split")
    parser.add_argument("--device", help="with --by-language: cpu or cuda")


def run(args) -> int:
    from switchformer.analysis.plots import plot_run

    run = Path(args.run)
    out = Path(args.out) if args.out else Path.cwd() / f"{run.resolve().name}-report"
    if out.resolve().is_relative_to(run.resolve()):
        raise ValueError(f"--out: {out} is inside the run {run}; reading a run never writes into it")
    paths = plot_run(run, out)
    if args.by_language:
        from switchformer.analysis.routing_report import routing_by_language_report

        paths += routing_by_language_report(run, out, data=args.data, device=args.device)
    elif args.data or args.device:
        raise ValueError("--data/--device: used only with --by-language (which loads the model)")
    for path in paths:
        print(f"wrote {path}")
    return 0
