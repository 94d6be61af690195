"""``switchformer train``: train a Switch model (default: the tiny preset on the embedded corpus)."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from switchformer.commands.common import TRAIN_PRESET, add_config_arguments, config_from_args, run_dir_for

# The library is imported inside run(), on use: the parser is built from every command module, and
# `switchformer --help` should not load the library (models, tokenizers, plotting).

NAME = "train"
HELP = "train a Switch model (default: the tiny preset on the embedded corpus)"
EPILOG = """examples:
  switchformer train                                   # tiny preset on the embedded corpus (a few minutes)
  switchformer train --preset tiny --max-steps 200 --run-name quick
  switchformer train --data notes/ --set vocab_size=8000 --set num_experts=16
  switchformer train --config my.toml --model t5       # T5 span corruption
  switchformer train --resume runs/quick               # continue exactly where it stopped
  switchformer train --model t5 --set objective=seq2seq --data train.de.gz train.en.gz \\
      --source-lang de --target-lang en --valid val.de.gz val.en.gz   # translation pairs, your dev set
  torchrun --nproc_per_node 4 -m switchformer train --expert-parallel 2   # 2-way experts x 2-way data"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TRAIN_PRESET)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    parser.add_argument(
        "--init-from",
        metavar="SOURCE",
        help="start a new run from pretrained weights: a Hugging Face T5/Switch directory, a run or a checkpoint "
        "(architecture and tokenizer come from SOURCE; optimizer and schedule start fresh)",
    )
    parser.add_argument(
        "--expert-parallel",
        type=int,
        metavar="P",
        help="under torchrun: split each layer's experts over P ranks (batch size is per rank)",
    )


def run(args) -> int:
    from switchformer.runs.state import check_resumable, claim_run
    from switchformer.train.trainer import Trainer

    model_values, init_state = None, None
    if args.resume:  # first: a run with no complete checkpoint, or in use, is named as such
        check_resumable(args.resume, probe_lock=os.environ.get("RANK", "0") == "0")
        config, run = _resume_settings(args)
        run_dir, model_values = run.run_dir, run.model_values
    else:
        config = config_from_args(args, TRAIN_PRESET)
        if config.init_from:
            config, model_values, init_state = _init_from_settings(args, config)
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if distributed and not config.run_name:
            raise ValueError("--run-name: required under torchrun, so that every rank writes to the same run")
        run_dir = run_dir_for(config)
    from switchformer.train.layout import check_start_layout

    check_start_layout(config, model_values)  # a layout that cannot work: refused before anything is written
    main_rank = int(os.environ.get("RANK", "0")) == 0
    new_folder = not Path(run_dir).exists()
    # one writer per run directory (rank 0 locks it); under the lock, a fresh run over one holding a
    # checkpoint is refused (--resume it) and one over a run stopped before its first starts over
    lock = claim_run(run_dir, resume=bool(args.resume), main=main_rank)
    try:
        try:
            trainer = Trainer(
                config,
                run_dir,
                resume=bool(args.resume),
                progress=not args.no_progress,
                device=args.device,
                model_config=model_values,
                init_state=init_state,
            )
        except BaseException:
            # a run that could not start (its data, device or settings refused) leaves nothing behind:
            # the folder this command made holds no checkpoint and no metrics of a step
            if new_folder and main_rank:
                if lock is not None:
                    lock.release()
                    lock = None
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if main_rank:
            print(
                f"training {config.model} ("
                + (f"{config.num_experts} experts every {config.sparse_step} layers" if config.sparse_step else "dense")
                + f") for {config.max_steps} steps -> {run_dir}",
                flush=True,
            )
        summary = trainer.train()
    finally:
        if lock is not None:
            lock.release()
    if main_rank:
        _print_summary(summary, config)
    return 0


def _resume_settings(args):
    """The resumed run's config: its own, with the changes the flags ask for (validated; only
    bookkeeping and max_steps may change, see ``RESUMABLE_FIELDS``)."""
    from switchformer.train.run import read_run_config
    from switchformer.train.sources import FLAG_NAMES, resolve_paths, resume_config, settings_given

    flags_for_new_runs = (
        ("--preset", args.preset),
        ("--out-dir", args.out_dir),
        ("--run-name", args.run_name),
        ("--init-from", args.init_from),
    )
    for flag, value in flags_for_new_runs:
        if value is not None:
            raise ValueError(f"{flag}: not used with --resume (the run directory is given; its settings are kept)")
    if (Path(args.resume) / "state.json").exists():
        raise ValueError(
            f"--resume: {args.resume} is a checkpoint; --resume takes the run directory and continues from its "
            "latest checkpoint (to go back to this one, move the later checkpoints out of checkpoints/)"
        )
    run = read_run_config(args.resume)
    changes, sources = settings_given(args.config, args.set)
    flags = {"model": args.model, "data": args.data, "max_steps": args.max_steps}
    flags["expert_parallel"] = getattr(args, "expert_parallel", None)
    flags.update(valid_data=args.valid, source_lang=args.source_lang, target_lang=args.target_lang)
    for name, value in flags.items():
        if value is not None:
            changes[name], sources[name] = value, FLAG_NAMES[name]
    resolve_paths(changes)
    return resume_config(run.train_values, str(run.file), changes, sources), run


def _init_from_settings(args, config):
    """(config, model config, weights) of a new run started from ``config.init_from``; the size
    settings the user gave must agree with the pretrained model; the fine-tuning defaults fill in
    the training settings the user did not give (printed, on the main rank)."""
    from switchformer.train.init_from import (
        check_settings_fit,
        describe_fine_tuning,
        fine_tuning_config,
        load_pretrained,
    )
    from switchformer.train.sources import FLAG_NAMES, settings_given

    given, sources = settings_given(args.config, args.set)
    if args.model is not None:
        given["model"], sources["model"] = args.model, FLAG_NAMES["model"]
    pretrained = load_pretrained(config.init_from, tokenizer=config.tokenizer if "tokenizer" in given else None)
    check_settings_fit(pretrained, given, sources)
    config, model_values, applied = fine_tuning_config(pretrained, config, given, sources)
    if int(os.environ.get("RANK", "0")) == 0:
        for line in describe_fine_tuning(applied, model_values, pretrained):
            print(line, flush=True)
    return config, model_values, pretrained.state


def _print_summary(summary: dict, config) -> None:
    print(
        f"\nvalidation loss {summary['eval_loss']:.4f}, perplexity {summary['perplexity']:.2f} "
        f"after {summary['step']} steps"
    )
    params = summary["parameters"]
    print(
        f"parameters: {params['total']:,} total, {params['active']:,} active per token, "
        f"{params['flops_per_token']:,} FLOPs per token"
    )
    if summary["routing"]:
        print(f"routing (validation, {summary['routing_used']}):")
        for name, r in summary["routing"].items():
            print(
                f"  {name}: max/mean expert load {r['max_load_over_mean']:.2f}, dropped {r['dropped_fraction']:.1%}, "
                f"router entropy {r['router_entropy']:.2f} nats"
            )
    if summary["sample"] is not None:  # sample_tokens=0: none
        print(f"sample: {summary['sample']!r}")
    print(f"run directory: {summary['run_dir']}")
