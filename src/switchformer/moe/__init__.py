"""The Switch layer, read top to bottom: :mod:`routing` (routers and router losses) ->
:mod:`dispatch` (sort by expert, capacity, gather and combine, expert-compute backends) ->
:mod:`experts` (stacked expert weights) -> :mod:`layer` (``SwitchMoE`` = router + dispatch +
experts); :mod:`initialization` holds the paper's reduced init. Nothing here knows of models,
training, parallelism or serving."""

from switchformer.moe.layer import MoEAux, SwitchMoE, switch_layers
from switchformer.moe.routing import (
    AuxLossFreeRouter,
    ExpertChoiceRouter,
    Router,
    TokenChoiceRouter,
    expert_capacity,
    load_balancing_loss,
    router_z_loss,
)

__all__ = [
    "SwitchMoE", "MoEAux", "switch_layers", "Router", "TokenChoiceRouter", "ExpertChoiceRouter", "AuxLossFreeRouter",
    "expert_capacity", "load_balancing_loss", "router_z_loss",
]  # fmt: skip
