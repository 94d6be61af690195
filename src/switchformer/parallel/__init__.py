"""Scale a model from outside it: expert parallelism (all-to-all), FSDP2 or plain data parallelism
over a DeviceMesh, and DCP checkpoints that reshard. See :mod:`~switchformer.parallel.groups`
for how ranks map to the mesh."""

from switchformer.parallel.checkpoint import (
    DCP_FOLDER,
    checkpoint_state,
    ensure_optimizer_state,
    export_safetensors,
    load_dcp,
    load_full_state_into,
    save_dcp,
)
from switchformer.parallel.expert import (
    ExpertParallelExperts,
    all_to_all,
    apply_expert_parallel,
    global_name,
    is_expert_parameter,
)
from switchformer.parallel.fsdp import (
    apply_fsdp,
    grad_norm,
    local_tensor,
    scale_gradients,
    transformer_blocks,
    whole_weights,
)
from switchformer.parallel.groups import (
    ParallelState,
    check_same_config,
    failure_message,
    init_distributed,
    make_groups,
)
from switchformer.parallel.replicate import reduce_gradients, sum_over_world

__all__ = [
    "DCP_FOLDER",
    "ExpertParallelExperts",
    "ParallelState",
    "all_to_all",
    "apply_expert_parallel",
    "apply_fsdp",
    "check_same_config",
    "checkpoint_state",
    "ensure_optimizer_state",
    "export_safetensors",
    "failure_message",
    "global_name",
    "grad_norm",
    "init_distributed",
    "is_expert_parameter",
    "load_dcp",
    "load_full_state_into",
    "local_tensor",
    "make_groups",
    "reduce_gradients",
    "save_dcp",
    "scale_gradients",
    "sum_over_world",
    "transformer_blocks",
    "whole_weights",
]
