"""The process layout of a distributed run: a :class:`~torch.distributed.device_mesh.DeviceMesh`.

World ``W``, expert-parallel size ``P`` (``W % P == 0``). Ranks form a ``(W / P, P)`` mesh with
dimensions ``("edp", "ep")``, row-major: rank ``r`` sits at ``(r // P, r % P)``.

- ``ep`` (a row): ``P`` consecutive ranks ``[kP .. kP + P - 1]`` that split every Switch layer's
  experts between them (rank ``i`` of the row holds experts ``[i E/P, (i+1) E/P)``) and exchange
  tokens with all-to-all. Consecutive ranks share a node under torchrun, so the all-to-all (the
  heaviest traffic) stays inside a node as long as ``P`` divides the GPUs per node.
- ``edp`` (a column): the ``W / P`` ranks holding the same experts; expert weights are sharded
  (FSDP) or replicated over it, and their gradients reduced over it.
- ``dp``: a one-dimensional mesh over the whole world for every other (dense) weight.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelState:
    """This process's place in the run. ``fsdp``: dense weights sharded over ``dp`` and expert
    weights over ``edp`` with FSDP2 (``fully_shard``); otherwise both are replicated and gradients
    summed by :func:`switchformer.parallel.replicate.reduce_gradients`."""

    world_size: int
    rank: int
    expert_parallel_size: int
    mesh: DeviceMesh  # ("edp", "ep")
    dp_mesh: DeviceMesh  # ("dp",): the whole world
    fsdp: bool = True

    @property
    def ep_rank(self) -> int:
        return self.rank % self.expert_parallel_size

    @property
    def ep_group(self):
        return self.mesh.get_group("ep")

    @property
    def edp_group(self):
        return self.mesh.get_group("edp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(
    expert_parallel_size: int = 1, timeout_s: float = 120.0, fsdp: bool = True
) -> ParallelState | None:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPUs) and build the mesh.
    Returns None when not launched with several processes and no expert parallelism is asked."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and expert_parallel_size == 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return make_groups(expert_parallel_size, fsdp=fsdp)


def make_groups(expert_parallel_size: int, fsdp: bool = True) -> ParallelState:
    """The mesh of the current process group (every rank must call this, in the same order).

    Raises ValueError (``expert_parallel``) when the world size is not a multiple of it."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if expert_parallel_size < 1 or world % expert_parallel_size:
        raise ValueError(f"expert_parallel: world size {world} is not a multiple of {expert_parallel_size}")
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    shape = (world // expert_parallel_size, expert_parallel_size)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=("edp", "ep"))
    dp_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    return ParallelState(world, rank, expert_parallel_size, mesh, dp_mesh, fsdp)


def check_same_config(config: dict, state: ParallelState) -> None:
    """Every rank must run the same configuration; a mismatch fails on all ranks at once."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    gathered = [None] * state.world_size
    dist.all_gather_object(gathered, digest)
    if len(set(gathered)) != 1:
        bad = [r for r, d in enumerate(gathered) if d != gathered[0]]
        raise ValueError(f"config: ranks {bad} run a different configuration than rank 0")


# What gloo and NCCL say when a peer process is gone or silent (torch raises them as RuntimeError or
# DistBackendError, whose text is the library's own)
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "timeout")


def failure_message(err: BaseException) -> str | None:
    """The one line a process of a distributed run prints when ``err`` means another process
    stopped (crashed, was killed, or hung past ``dist_timeout_s``); None for any other error."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if not isinstance(err, RuntimeError) or type(err).__module__.startswith("switchformer"):
        return None  # the communication libraries raise RuntimeError (DistBackendError, ...); ours say their own
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not any(sign in text.lower() for sign in _PEER_LOST):
        return None
    return (
        f"rank {dist.get_rank()} of {dist.get_world_size()}: lost contact with another process of the run, "
        f"which stopped or hung (its own error, if any, is above; the cause here: {text})"
    )
