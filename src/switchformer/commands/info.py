"""``switchformer info``: layout, parameters, active parameters and FLOPs per token."""

from __future__ import annotations

import argparse

from switchformer.commands.common import add_inference_arguments

# The library is imported inside run(), on use: the parser is built from every command module, and
# `switchformer --help` should not load the library (models, tokenizers, plotting).

NAME = "info"
HELP = "layout, parameters, active parameters and FLOPs per token"
EPILOG = """examples:
  switchformer info runs/quick
  switchformer info --preset compare
  switchformer info --preset compare --world-size 8 --expert-parallel 4   # memory per rank
  switchformer info --d-model 768 --d-ff 3072 --num-experts 128       # one Switch layer
  switchformer info path/to/switch-base-256 --dtype int8 --max-memory 20GiB   # what fits, before loading"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", help="run directory, checkpoint or Hugging Face T5/Switch directory")
    parser.add_argument("--preset")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=3072)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--activation", default="relu")
    parser.add_argument(
        "--world-size",
        type=int,
        metavar="W",
        help="with a run or --preset: memory per rank (parameters, gradients, optimizer state) over W processes",
    )
    parser.add_argument(
        "--expert-parallel", type=int, metavar="P", help="with --world-size: experts split over P ranks"
    )
    parser.add_argument("--no-fsdp", action="store_true", help="with --world-size: weights replicated (fsdp=false)")
    add_inference_arguments(parser)
    parser.add_argument("--device", help="with --dtype/--max-memory: where the model would run (default: cpu)")


def run(args) -> int:
    import torch

    from switchformer.runs.directory import is_hugging_face_source, run_dir_of
    from switchformer.train.run import load_run

    if args.no_fsdp and args.world_size is None:
        raise ValueError("--no-fsdp: memory per rank needs --world-size W")
    if args.source and args.preset:
        raise ValueError(f"--preset: not used with a run ({args.source}); the run's own settings are shown")
    placing = args.dtype is not None or args.max_memory is not None
    if placing and not (args.source or args.preset):
        raise ValueError("--max-memory: what fits needs a model: give a run, a Hugging Face directory or --preset")
    if args.source and is_hugging_face_source(args.source):  # its config alone: nothing is loaded
        from switchformer.interop.hf_config import config_from_hf
        from switchformer.models import SwitchT5
        from switchformer.runs.files import read_json

        with torch.device("meta"):
            model = SwitchT5(config_from_hf(read_json(run_dir_of(args.source) / "config.json")))
        train = None
        title = f"{args.source}: t5 (Hugging Face)"
    elif args.source and placing:  # the run's shapes alone: what fits is told before anything loads
        from switchformer.train.run import read_run_config

        run = read_run_config(args.source)
        with torch.device("meta"):
            model = run.build_model()
        train = run.train
        title = f"{args.source}: {train.model}"
    elif args.source:
        model, _, train = load_run(args.source, need_tokenizer=False)
        title = f"{args.source}: {train.model}"
    elif args.preset:
        from switchformer.train.run import build_model
        from switchformer.train.sources import build_config

        train = build_config(args.preset)
        with torch.device("meta"):
            model = build_model(train, train.vocab_size)
        title = f"preset {args.preset}: {train.model}"
    else:
        if args.world_size is not None or args.expert_parallel is not None or args.no_fsdp:
            raise ValueError("--world-size: memory per rank needs a model: give a run directory or --preset")
        return _layer_info(args)
    memory_lines = []  # computed first: a layout that cannot work is refused before anything is printed
    if placing:
        from switchformer.models.placement import parse_size, plan_placement

        max_memory = parse_size(args.max_memory) if args.max_memory is not None else None
        memory_lines += plan_placement(model, args.dtype or "float32", max_memory, args.device or "cpu").lines()
    if (args.world_size is not None or args.expert_parallel is not None) and train is None:
        raise ValueError("--world-size: memory per rank is for training: give a run directory or --preset")
    if args.world_size is not None or args.expert_parallel is not None:
        from switchformer.parallel.memory import memory_report

        world = 1 if args.world_size is None else args.world_size
        fsdp = getattr(train, "fsdp", True) and not args.no_fsdp and world > 1  # a run's own setting first
        optimizer = getattr(train, "optimizer", "adamw")
        expert_parallel = 1 if args.expert_parallel is None else args.expert_parallel
        memory_lines += memory_report(model, world, expert_parallel, fsdp, optimizer)
    counts = model.num_parameters()
    config = model.config
    print(title)
    print(f"  d_model {config.d_model}, d_ff {config.d_ff}, heads {config.num_heads}, vocab {config.vocab_size}")
    layout = (
        config.sparse_layers()
        if hasattr(config, "sparse_step")
        else config.sparse_layers("encoder") + config.sparse_layers("decoder")
    )
    print("  layers: " + " ".join("S" if s else "d" for s in layout) + "   (S: Switch layer, d: dense FFN)")
    print(f"  experts per Switch layer: {config.num_experts}, top-{config.top_k}")
    print(f"  parameters: {counts['total']:,} total, {counts['active']:,} active per token")
    print(f"  forward FLOPs per token: {counts['flops_per_token']:,}")
    for line in memory_lines:
        print(line)
    return 0


def _layer_info(args) -> int:
    import torch

    from switchformer import SwitchMoE
    from switchformer.moe.layer import num_active_expert_params

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
