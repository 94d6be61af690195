"""The parallel layout of a training run: the global batch, and the layouts refused before anything
is written (a world or expert-parallel size that cannot work, a global batch a resume would change)."""

from __future__ import annotations

import os

import torch

from switchformer.parallel.memory import estimate_rank_memory
from switchformer.train.config import TrainConfig
from switchformer.train.run import build_model


def check_start_layout(config: TrainConfig, model_config: dict | None) -> None:
    """The layout of the processes this command runs in (torchrun's ``WORLD_SIZE``, or one) fits
    ``config``: a ValueError naming the setting otherwise (see :func:`check_layout`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and config.expert_parallel > 1:
        raise ValueError(
            f"expert_parallel: {config.expert_parallel} splits the experts over {config.expert_parallel} "
            "processes, and one runs here: launch under torchrun (torchrun --nproc_per_node N -m switchformer "
            f"train ..., N a multiple of {config.expert_parallel}), or give --expert-parallel 1"
        )
    if world > 1:
        check_layout(config, model_config, world)


def check_layout(config: TrainConfig, model_config: dict | None, world: int) -> None:
    """The model fits the layout ``world`` processes with ``config.expert_parallel`` give: the
    experts split evenly, FSDP can shard every expert weight, Adafactor only without FSDP. Raises
    ValueError naming the setting (checked on the ``meta`` device: no memory, no weights)."""
    if config.fsdp and config.optimizer == "adafactor":
        raise ValueError(
            "optimizer: adafactor factors whole matrices, which FSDP shards; use adamw, or --set fsdp=false "
            "to keep weights whole on every rank"
        )
    with torch.device("meta"):
        model = build_model(config, config.vocab_size, model_config)
    estimate_rank_memory(model, world, config.expert_parallel, 0, config.fsdp, config.optimizer)


def global_batch(config: TrainConfig, world: int) -> int:
    """Sequences (or pairs, conversations) per optimizer step over every rank."""
    return config.batch_size * config.grad_accum * world


def _processes(n) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def check_global_batch(config: TrainConfig, state: dict, world: int) -> None:
    """A run resumed on another number of processes must keep its global batch (``batch_size`` is
    per rank): the checkpoint's, when it records one, or a ValueError naming the setting to give.
    The advice keeps each rank's micro-batch where it can (``grad_accum``): a micro-batch is a
    routing group, so its size decides capacity and the router losses."""
    saved = state.get("global_batch")
    if saved is None or saved == global_batch(config, world):
        return
    accum, accum_rest = divmod(saved, world * config.batch_size)
    per_rank, rest = divmod(saved, world * config.grad_accum)
    if accum and not accum_rest:
        fix = (
            f"give --set grad_accum={accum} (each rank keeps its micro-batch of {config.batch_size}, so routing "
            "groups and losses go on as before)"
        )
    elif per_rank and not rest:
        fix = f"give --set batch_size={per_rank}"
    elif saved % world:
        fits = [n for n in range(1, saved + 1) if saved % n == 0]
        fix = f"{saved} cannot be split evenly over {world} processes: resume on one of {fits} processes"
    else:
        fix = f"choose batch_size and grad_accum with batch_size x grad_accum x {world} = {saved}"
    raise ValueError(
        f"batch_size: the checkpoint was trained with a global batch of {saved} (saved with "
        f"{_processes(state.get('world_size', '?'))}), here batch_size {config.batch_size} x grad_accum "
        f"{config.grad_accum} x {_processes(world)} = {global_batch(config, world)}; {fix}"
    )
