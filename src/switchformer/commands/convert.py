"""``switchformer convert``: convert between Hugging Face and switchformer formats."""

from __future__ import annotations

import argparse

# The library is imported inside run(), on use: the parser is built from every command module, and
# `switchformer --help` should not load the library (models, tokenizers, plotting).

NAME = "convert"
HELP = "convert between Hugging Face and switchformer formats"
EPILOG = """examples:
  switchformer convert path/to/hf-switch-dir native-run/      # Hugging Face -> switchformer
  switchformer convert runs/t5-run hf-export/                 # switchformer (T5) -> Hugging Face"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source")
    parser.add_argument("target")


def run(args) -> int:
    from switchformer.lifecycle.convert import convert

    print(f"wrote {convert(args.source, args.target)}")
    return 0
