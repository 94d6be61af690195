"""``SwitchMoE``: router + dispatch + experts, the sparse feed-forward layer of a Switch Transformer.

One call, top to bottom (docs/architecture.md, "One MoE call")::

    x [..., d]  --flatten, split into routing groups-->  [G, S, d]
    router      -> float32 logits/probs, each token's choice(s) and gate, in priority order
    capacity    -> slots per expert and group (train / eval factor, absolute, or dropless)
    plan        -> stable sort by expert, positions, capacity mask           (dispatch.plan_dispatch)
    experts     -> gather kept tokens, grouped FFN                           (experts.Experts)
    combine     -> gate-weighted add back in token order, dropped tokens = 0 (dispatch.combine)
    aux         -> this layer's load-balancing loss, z-loss and statistics

Routing groups: by default the whole local batch is one group; ``group_size`` splits the tokens
into groups of that many; an absolute ``expert_capacity`` (Hugging Face compatibility) makes every
sequence (the next-to-last dim of ``x``) its own group, as HF counts capacity per sequence.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from switchformer.moe.bounds import (
    AT_LEAST_ONE,
    AT_LEAST_ZERO,
    CAPACITY_FACTOR,
    FRACTION,
    OPTIONAL_AT_LEAST_ONE,
    POSITIVE,
    check_bounds,
)
from switchformer.moe.dispatch import BACKENDS, DispatchPlan, combine, dispatch_rows, plan_dispatch, token_slots
from switchformer.moe.experts import ACTIVATIONS, Experts
from switchformer.moe.routing import (
    PRIORITIES,
    ROUTINGS,
    AuxLossFreeRouter,
    ExpertChoiceRouter,
    Routing,
    TokenChoiceRouter,
    expert_capacity,
    load_balancing_loss,
    router_entropy_and_confidence,
    router_z_loss,
)
from switchformer.moe.static import static_moe_forward

# Up to this many (token, expert) assignments, inference runs each expert directly (see
# SwitchMoE._few_assignments). Measured on CPU (d 256, f 1024, E 8 and 64): 140 us against 270 us
# for one token, 250 against 400 us for two; from four tokens on the two paths cost the same.
FEW_ASSIGNMENTS = 4

# Token-choice layers dispatch and combine by gathering in both directions (dispatch.token_slots);
# False: index_select forward and index_add_ combine (scatters). Chosen by benchmarks/moe_layer.py.
GATHER_COMBINE = True


class MoEAux:
    """What one MoE layer call reports besides its output.

    ``aux_loss`` and ``z_loss`` are differentiable scalars (the layer's own, unscaled by any
    coefficient). Counts are per expert: ``tokens_per_expert`` after capacity (what the experts
    processed), ``demand_per_expert`` before it (what the router asked for). For top-k, counts and
    the dropped fraction are over (token, expert) assignments. Losses and router statistics are
    computed on first access, so inference that never reads them does not pay for them.
    """

    def __init__(self, routing: Routing, plan: DispatchPlan, token_mask: Tensor | None, capacity: int | None):
        self._routing, self._mask = routing, token_mask
        self.tokens_per_expert: Tensor = plan.tokens_per_expert
        self.demand_per_expert: Tensor = plan.demand_per_expert
        self.routed: Tensor = plan.routed
        self.dropped: Tensor = plan.dropped
        self.capacity = capacity

    @functools.cached_property
    def aux_loss(self) -> Tensor:
        routing = self._routing
        if routing.expert_index is None:  # expert choice is balanced by construction
            return routing.probs.new_zeros(())
        return load_balancing_loss(routing.probs, routing.expert_index, self._mask)

    @functools.cached_property
    def z_loss(self) -> Tensor:
        return router_z_loss(self._routing.logits, self._mask)

    @functools.cached_property
    def _entropy_and_confidence(self) -> tuple[Tensor, Tensor]:
        return router_entropy_and_confidence(self._routing.probs, self._mask)

    @property
    def router_entropy(self) -> Tensor:
        """Mean entropy of the router's distribution over experts (nats)."""
        return self._entropy_and_confidence[0]

    @property
    def router_confidence(self) -> Tensor:
        """Mean probability of each token's top expert."""
        return self._entropy_and_confidence[1]

    @property
    def dropped_fraction(self) -> float:
        """Share of routed assignments that no expert processed (over capacity), in [0, 1]."""
        routed = int(self.routed)
        return float(self.dropped) / routed if routed else 0.0


# the layer's settings and their bounds (the model configs and the training configuration take the
# same Bound for the same setting)
LAYER_BOUNDS = {
    "d_model": AT_LEAST_ONE,
    "d_ff": AT_LEAST_ONE,
    "num_experts": AT_LEAST_ONE,
    "capacity_factor": CAPACITY_FACTOR,
    "eval_capacity_factor": CAPACITY_FACTOR,
    "min_capacity": AT_LEAST_ZERO,
    "expert_capacity": OPTIONAL_AT_LEAST_ONE,
    "group_size": OPTIONAL_AT_LEAST_ONE,
    "expert_dropout": FRACTION,
    "jitter_eps": FRACTION,
    "init_scale": POSITIVE,
}


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field}: {message}")


class SwitchMoE(nn.Module):
    """Sparse mixture-of-experts feed-forward layer; ``layer(x) -> (y, aux)``, ``y`` shaped like ``x``.

    Args mirror the Switch paper and Hugging Face's SwitchTransformers config: ``top_k`` experts per
    token, ``capacity_factor`` for training and ``eval_capacity_factor`` for eval (``None``:
    dropless), ``min_capacity``, an absolute per-sequence ``expert_capacity`` (overrides the factors),
    ``group_size`` (routing groups), ``routing`` (``token_choice``, ``expert_choice``,
    ``aux_loss_free``), ``priority`` (``position`` or ``router_prob``), ``jitter_eps``
    (multiplicative router-input noise in training), ``expert_dropout``, ``init_scale`` (paper: 0.1),
    ``backend`` of the grouped matmul (``auto``, ``grouped_mm``, ``padded``, ``loop``) and ``causal``
    (the layer sits in a decoder; forbids routers that look ahead).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        *,
        top_k: int = 1,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = 2.0,
        min_capacity: int = 4,
        expert_capacity: int | None = None,
        group_size: int | None = None,
        routing: str = "token_choice",
        normalize_gates: bool = False,
        priority: str = "position",
        activation: str = "relu",
        expert_dropout: float = 0.0,
        jitter_eps: float = 0.0,
        init_scale: float = 0.1,
        bias_update_rate: float = 1e-3,
        backend: str = "auto",
        causal: bool = False,
    ):
        super().__init__()
        check_bounds(
            dict(d_model=d_model, d_ff=d_ff, num_experts=num_experts, capacity_factor=capacity_factor,
                 eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity, expert_capacity=expert_capacity,
                 group_size=group_size, expert_dropout=expert_dropout, jitter_eps=jitter_eps, init_scale=init_scale),
            LAYER_BOUNDS,
        )  # fmt: skip
        _check(1 <= top_k <= num_experts, "top_k", f"must be in [1, num_experts={num_experts}], got {top_k}")
        _check(routing in ROUTINGS, "routing", f"unknown {routing!r}; choose one of {ROUTINGS}")
        _check(priority in PRIORITIES, "priority", f"unknown {priority!r}; choose one of {PRIORITIES}")
        _check(activation in ACTIVATIONS, "activation", f"unknown {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        _check(backend in BACKENDS, "backend", f"unknown {backend!r}; choose one of {BACKENDS}")
        if routing == "expert_choice":
            _check(not causal, "routing", "expert_choice looks at later tokens to choose; it cannot be used causally")
            _check(
                capacity_factor is not None and eval_capacity_factor is not None,
                "capacity_factor",
                "expert_choice needs a capacity factor for training and eval (it cannot be dropless)",
            )
        if causal and priority == "router_prob":
            raise ValueError("priority: 'router_prob' ranks tokens using later positions; it cannot be used causally")

        self.d_model, self.d_ff, self.num_experts, self.top_k = d_model, d_ff, num_experts, top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.expert_capacity = expert_capacity
        self.group_size = group_size
        self.routing = routing
        self.causal = causal
        self.gather_combine = GATHER_COMBINE

        router_kwargs = dict(jitter_eps=jitter_eps, init_scale=init_scale)
        if routing == "expert_choice":
            self.router = ExpertChoiceRouter(d_model, num_experts, **router_kwargs)
        else:
            router_kwargs.update(top_k=top_k, normalize_gates=normalize_gates, priority=priority)
            if routing == "aux_loss_free":
                self.router = AuxLossFreeRouter(
                    d_model, num_experts, bias_update_rate=bias_update_rate, **router_kwargs
                )
            else:
                self.router = TokenChoiceRouter(d_model, num_experts, **router_kwargs)
        self.experts = Experts(
            num_experts,
            d_model,
            d_ff,
            activation=activation,
            dropout=expert_dropout,
            init_scale=init_scale,
            backend=backend,
        )

    # -- helpers -----------------------------------------------------------------------------

    def routing_groups(self, x: Tensor) -> tuple[int, int]:
        """(number of groups, tokens per group) for input ``x`` of shape ``[..., d_model]``."""
        num_tokens = x.numel() // self.d_model
        if self.expert_capacity is not None:
            seq = x.shape[-2] if x.dim() >= 3 else num_tokens
            return num_tokens // max(seq, 1), seq
        if self.group_size is not None:
            if num_tokens % self.group_size:
                raise ValueError(
                    f"group_size: {num_tokens} tokens do not split into routing groups of {self.group_size}"
                )
            return num_tokens // self.group_size, self.group_size
        return 1, num_tokens

    def capacity(self, tokens_per_group: int) -> int | None:
        """Slots per expert and routing group in the current mode; ``None`` means dropless."""
        if self.expert_capacity is not None:
            return self.expert_capacity
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return None
        return expert_capacity(tokens_per_group, self.num_experts, factor, self.top_k, self.min_capacity)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, MoEAux]:
        """Route, compute and combine. ``token_mask`` (shape ``x.shape[:-1]``, bool): False marks
        padding, which is not routed, gets zero output and is left out of the losses and statistics."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"input: last dim must be d_model={self.d_model}, got shape {tuple(x.shape)}")
        if token_mask is not None and token_mask.shape != x.shape[:-1]:
            raise ValueError(f"token_mask: shape {tuple(token_mask.shape)} does not match input {tuple(x.shape[:-1])}")
        num_groups, group_len = self.routing_groups(x)
        flat = x.reshape(num_groups * group_len, self.d_model)
        mask = None if token_mask is None else token_mask.reshape(num_groups, group_len).bool()
        capacity = self.capacity(group_len)

        routing = self.router(flat.view(num_groups, group_len, self.d_model), mask, capacity)
        if self._few_assignments(flat, mask, capacity, group_len):
            y, plan = self._forward_few(flat, routing)
            return y.view(x.shape), MoEAux(routing, plan, mask, capacity)
        plan = plan_dispatch(
            routing.token,
            routing.expert,
            routing.gate,
            num_experts=self.num_experts,
            num_groups=num_groups,
            tokens_per_group=group_len,
            capacity=None if self.routing == "expert_choice" else capacity,
            all_routed=mask is None and self.routing != "expert_choice",
        )
        slots = None
        if self.gather_combine and self.routing != "expert_choice":
            slots = token_slots(routing.token, plan, self.top_k, group_len)
        expert_out = self.experts(dispatch_rows(flat, plan, slots), plan)
        y = combine(expert_out, plan, flat.shape[0], slots)
        if not torch.is_autocast_enabled(x.device.type):
            y = y.to(x.dtype)  # under autocast keep the compute dtype, as nn.Linear would

        aux = MoEAux(routing, plan, mask, capacity)
        return y.view(x.shape), aux

    # -- inference with a handful of tokens (cached decoding) ------------------------------------

    def _few_assignments(self, flat: Tensor, mask: Tensor | None, capacity: int | None, group_len: int) -> bool:
        """Decoding a token or two: sorting, planning and combining cost more than the experts, so
        run each assignment's expert directly. Only where that is the same computation: inference
        without autograd or autocast, no padding, token choice, and a capacity that cannot drop
        anything (an expert gets at most one assignment per token of a group)."""
        return (
            0 < flat.shape[0] * self.top_k <= FEW_ASSIGNMENTS
            and not self.training
            and not torch.is_grad_enabled()
            and mask is None
            and self.routing != "expert_choice"
            and (capacity is None or capacity >= group_len)
            and not torch.is_autocast_enabled(flat.device.type)
            and getattr(self.experts, "all_local", False)  # not expert-parallel
        )

    def _forward_few(self, flat: Tensor, routing: Routing) -> tuple[Tensor, DispatchPlan]:
        rows: list[Tensor | None] = [None] * flat.shape[0]
        for a, (token, expert) in enumerate(zip(routing.token.tolist(), routing.expert.tolist())):
            y = self.experts.forward_one(expert, flat[token : token + 1]) * routing.gate[a : a + 1, None]
            rows[token] = y if rows[token] is None else rows[token] + y
        plan = DispatchPlan.for_counts(torch.bincount(routing.expert, minlength=self.num_experts))
        return torch.cat(rows).to(flat.dtype), plan

    def forward_static(self, x: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(y, tokens_per_expert)`` of a static-shape decoding step: the eval-mode result of
        ``forward`` computed without reading any value back to the host, so that it can be
        compiled whole and replayed as a CUDA graph (:func:`switchformer.moe.static.static_moe_forward`)."""
        return static_moe_forward(self, x, token_mask)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, routing={self.routing!r}, "
            f"capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}, "
            f"expert_capacity={self.expert_capacity}, group_size={self.group_size}"
        )


def switch_layers(model: nn.Module) -> list[SwitchMoE]:
    """Every Switch layer of ``model``, in module order (none for a dense model)."""
    return [m for m in model.modules() if isinstance(m, SwitchMoE)]


def num_active_expert_params(layer: SwitchMoE) -> int:
    """Expert parameters one token uses (k experts) plus the router."""
    return layer.top_k * layer.experts.params_per_expert + layer.router.weight.numel()


__all__ = ["SwitchMoE", "MoEAux", "num_active_expert_params"]
