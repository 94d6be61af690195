"""``switchformer convert``: convert between Hugging Face and switchformer formats."""

from __future__ import annotations

import argparse

# The library is imported inside run(), on use: the parser is built from every command module, and
# `switchformer --help` should not load the library (models, tokenizers, plotting).

NAME = "convert"
HELP = "convert between Hugging Face and switchformer formats"
EPILOG = """examples:
  switchformer convert path/to/hf-switch-dir native-run/      # Hugging Face -> switchformer
  switchformer convert runs/t5-run hf-export/                 # switchformer (T5) -> Hugging Face
  switchformer convert path/to/switch-base-256 sb256/ --dtype int8   # streamed: int8 experts, never all in memory"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "int8"],
        help="the precision written (default: the source's); int8: a Hugging Face directory into a run whose "
        "experts are quantised per output channel, so --dtype int8 at inference needs no quantising",
    )  # fmt: skip


def run(args) -> int:
    from switchformer.lifecycle.convert import convert

    print(f"wrote {convert(args.source, args.target, args.dtype)}")
    return 0
