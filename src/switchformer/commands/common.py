"""What several commands share: the flags of a training configuration and the config they give."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# The presets --help names; written out so that --help loads no training code (a test holds it equal to PRESETS).
PRESET_NAMES = ("tiny", "test", "compare", "compare-long", "compare-gpu", "mt-small")
TRAIN_PRESET = "tiny"
# `switchformer compare` runs, by default, the regime where the paper's effect shows on a laptop
# (docs: results, "a small model trained long"); the 800-step `compare` preset is the quick check.
COMPARE_PRESET = "compare-long"

# Commands import the library inside run(): the parser is built from every command module, and
# `switchformer --help` should not load the library (models, tokenizers, plotting).


def add_config_arguments(p: argparse.ArgumentParser, default_preset: str) -> None:
    """The flags of a training configuration (train, compare)."""
    names = ", ".join(f"{name} (default)" if name == default_preset else name for name in PRESET_NAMES)
    p.add_argument("--preset", default=None, help=names)
    p.add_argument("--config", help="a .toml, .yaml or .json file of settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    p.add_argument("--model", choices=["lm", "t5"], help="model family")
    p.add_argument(
        "--data",
        nargs="+",
        help="text files or folders, .jsonl, .arrow/.parquet; seq2seq pairs also .tsv or line-aligned text files "
        "(train.de train.en); .gz read as gzip (default: the embedded corpus)",
    )
    p.add_argument(
        "--valid",
        nargs="+",
        metavar="FILE",
        help="validation files, in --data's formats and pairing rules (default: the first validation_fraction of "
        "--data is held out)",
    )
    p.add_argument(
        "--source-lang",
        metavar="CODE[,CODE...]",
        help="seq2seq: the source language(s) of line-aligned files named by language (train.de); several make "
        "a multilingual set (default: every language but the target)",
    )
    p.add_argument("--target-lang", metavar="CODE", help="seq2seq: the target language (train.en pairs with train.de)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--out-dir", help="parent folder of runs (default: runs)")
    p.add_argument("--run-name")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_inference_arguments(p: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--max-memory``: how an inference command holds the weights."""
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "int8"],
        help="float32 (default), bfloat16, or int8: experts quantised per output channel (weight-only), "
        "activations float32 (bfloat16 on a GPU), routers float32 always",
    )
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="memory budget, such as 20GiB or 512MiB: experts that do not fit stay in the checkpoint's files "
        "and are read on use into a cache of the most recently used (default: no budget, all resident)",
    )


def inference_options(args, device=None) -> dict:
    """``load_run``'s (and ``from_hf``'s) keyword arguments for ``--dtype`` and ``--max-memory``;
    empty when neither is given (the model loads as trained)."""
    if args.dtype is None and args.max_memory is None:
        return {}
    from switchformer.models.placement import parse_size
    from switchformer.runtime import resolve_device, return_freed_memory

    max_memory = parse_size(args.max_memory) if args.max_memory is not None else None
    if max_memory is not None or args.dtype == "int8":
        return_freed_memory()  # freed experts leave the process at once (runtime.py says why)
    return {"dtype": args.dtype or "float32", "max_memory": max_memory, "device": resolve_device(device)}


def report_expert_cache(model) -> None:
    """The expert cache's hit rate and bytes read, on standard error (offloaded experts only)."""
    cache = getattr(model, "expert_cache", None)
    if cache is not None:
        print(cache.summary(), file=sys.stderr)


def config_from_args(args, default_preset: str):
    """The ``TrainConfig`` the flags of :func:`add_config_arguments` give: the preset, then the config
    file, ``--set`` and the flags; with ``--init-from``, the model family is the source's."""
    from switchformer.train.sources import FLAG_NAMES, build_config, settings_given

    overrides = {
        "model": args.model,
        "data": args.data,
        "max_steps": args.max_steps,
        "out_dir": args.out_dir,
        "run_name": args.run_name,
        "expert_parallel": getattr(args, "expert_parallel", None),
        "init_from": getattr(args, "init_from", None),
        "valid_data": getattr(args, "valid", None),
        "source_lang": getattr(args, "source_lang", None),
        "target_lang": getattr(args, "target_lang", None),
    }
    given, sources = settings_given(args.config, args.set)
    init_from = overrides["init_from"] or given.get("init_from")
    if init_from:  # the source decides the model family; a contradicting one is refused by name
        from switchformer.train.init_from import source_family  # on use (start-up time)

        family = source_family(init_from)
        asked = args.model if args.model is not None else given.get("model")
        if asked is not None and asked != family:
            where = FLAG_NAMES["model"] if args.model is not None else sources["model"]
            raise ValueError(f"model: --init-from {init_from} holds a {family} model, {where} asks for {asked!r}; "
                             "leave it out (the family comes from the pretrained model)")  # fmt: skip
        overrides["model"] = family
    return build_config(args.preset or default_preset, args.config, overrides, args.set, FLAG_NAMES)


def run_dir_for(config) -> Path:
    """A new run's directory: ``out_dir/run_name``, or the family and the time."""
    name = config.run_name or f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(config.out_dir) / name
