"""Routing at inference: one routing truth per model. By default (``routing="eval"``) inference
routes exactly as the model's forward does in eval mode, with its own configured eval routing
(``eval_capacity_factor``, or Hugging Face's per-sequence ``expert_capacity`` for an imported
checkpoint, so default outputs equal Hugging Face's). ``routing="dropless"`` is the explicit
alternative: no token is ever dropped, so a batch gives the same tokens as its rows one by one. The
choice is logged on the ``switchformer`` logger; :func:`routing_description` names it for outputs."""

from __future__ import annotations

import contextlib
import logging

import torch

from switchformer.moe.layer import SwitchMoE, switch_layers

log = logging.getLogger("switchformer")


ROUTING_MODES = ("eval", "dropless")


def routing_description(model: torch.nn.Module, routing: str = "eval") -> str:
    """How ``routing`` makes ``model``'s Switch layers route at inference, in words, for outputs and
    logs: ``"eval: capacity factor 2.0"``, ``"eval: expert_capacity 64 per sequence"``,
    ``"dropless"``; ``"dense"`` for a model without Switch layers.

    Raises ``ValueError`` for a ``routing`` not in :data:`ROUTING_MODES`."""
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing: unknown {routing!r}; choose one of {ROUTING_MODES}")
    layers = switch_layers(model)
    if not layers:
        return "dense"
    if routing == "dropless":
        return "dropless (no token dropped)"
    kinds = []
    for m in layers:
        if m.routing == "expert_choice":
            kind = f"expert choice, capacity factor {m.eval_capacity_factor:g}"
        elif m.expert_capacity is not None:
            kind = f"expert_capacity {m.expert_capacity} per sequence"
        elif m.eval_capacity_factor is None:
            kind = "dropless (eval_capacity_factor None)"
        else:
            kind = f"capacity factor {m.eval_capacity_factor:g}"
        if kind not in kinds:
            kinds.append(kind)
    return "eval: " + "; ".join(kinds)


@contextlib.contextmanager
def inference_routing(
    model: torch.nn.Module, routing: str = "eval", decoding: bool = False, layers: list[SwitchMoE] | None = None
):
    """Run the model's Switch layers with their own eval routing (default: exactly as ``forward``
    in eval mode) or dropless (``"dropless"``), restoring the layers' settings afterwards.

    ``decoding``: the calls are generation steps, whose token counts (the rows of a step) are no
    multiple of a fixed ``group_size``: each call's tokens form one routing group, with the eval
    capacity factor (or per-sequence ``expert_capacity``) as configured. ``layers``: the model's
    Switch layers, from a caller that enters this for every step (a server): the model is then
    not walked, and nothing is logged.

    Raises ``ValueError`` for a ``routing`` not in :data:`ROUTING_MODES`."""
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing: unknown {routing!r}; choose one of {ROUTING_MODES}")
    if layers is None:
        layers = switch_layers(model)
        if layers:
            log.info("inference routing: %s", routing_description(model, routing))
    saved = [(m.eval_capacity_factor, m.expert_capacity, m.group_size) for m in layers]
    try:
        if routing == "dropless":
            for m in layers:
                if m.routing != "expert_choice":  # without capacity, groups do not matter either
                    m.eval_capacity_factor, m.expert_capacity, m.group_size = None, None, None
        elif decoding:
            for m in layers:
                m.group_size = None
        yield
    finally:
        for m, (factor, capacity, group_size) in zip(layers, saved):
            m.eval_capacity_factor, m.expert_capacity, m.group_size = factor, capacity, group_size
