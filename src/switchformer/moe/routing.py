"""Routers: which expert(s) each token goes to, with what gate, and the router losses.

A router looks at tokens arranged in routing groups, ``x`` of shape ``[G, S, d]``, and returns a
:class:`Routing`: the float32 logits and probabilities (for the losses and statistics) and a flat
list of *assignments* ``(token, expert, gate)`` in priority order. Dispatch (``dispatch.py``) turns
that list into capacity-limited expert batches; the router never drops anything itself.

Three routers:

- :class:`TokenChoiceRouter`: each token picks its top-k experts (k = 1 is the Switch router).
- :class:`AuxLossFreeRouter`: token choice with a per-expert selection bias nudged towards balance
  outside autograd (DeepSeek-V3's auxiliary-loss-free balancing).
- :class:`ExpertChoiceRouter`: each expert picks its top-C tokens of the group (Zhou et al. 2022).
  It looks across the whole sequence, so it cannot be used causally.

Selective precision (Switch paper, section 2.4): router input, logits and softmax are float32
whatever the model dtype or autocast state; jitter is applied to a float32 *copy* of the input
that only the router sees.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from switchformer.moe.initialization import scaled_trunc_normal_

ROUTINGS = ("token_choice", "expert_choice", "aux_loss_free")
PRIORITIES = ("position", "router_prob")


# ----------------------------------------------------------------------------- losses


def load_balancing_loss(router_probs: Tensor, expert_index: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Switch auxiliary loss ``N * sum_i f_i * P_i``, computed per routing group, averaged over groups.

    ``router_probs``: ``[..., T, N]`` softmax probabilities (not renormalised here).
    ``expert_index``: ``[..., T]`` (top-1) or ``[..., T, k]``: the experts each token chose, before
    capacity dropping. ``f_i`` is the fraction of tokens that chose expert ``i`` (for top-k, among its
    k choices, so ``sum_i f_i = k``); ``P_i`` is the mean router probability of expert ``i``.
    ``token_mask``: optional ``[..., T]`` bool, False for tokens (padding) left out of the loss.
    No token at all (an empty input, or all masked) gives 0, with the graph kept.
    """
    num_experts = router_probs.shape[-1]
    if router_probs.numel() == 0:
        return router_probs.sum() * 0.0
    if expert_index.dim() == router_probs.dim() - 1:
        expert_index = expert_index.unsqueeze(-1)
    chosen = F.one_hot(expert_index, num_experts).amax(dim=-2).to(router_probs.dtype)  # [..., T, N]
    if token_mask is None:
        fraction = chosen.mean(dim=-2)
        mean_prob = router_probs.mean(dim=-2)
        return num_experts * (fraction * mean_prob).sum(-1).mean()
    weight = token_mask.unsqueeze(-1).to(router_probs.dtype)
    count = weight.sum(dim=-2)  # [..., 1]
    fraction = (chosen * weight).sum(dim=-2) / count.clamp_min(1)
    mean_prob = (router_probs * weight).sum(dim=-2) / count.clamp_min(1)
    per_group = num_experts * (fraction * mean_prob).sum(-1)
    has_tokens = (count.squeeze(-1) > 0).to(per_group.dtype)  # groups of pure padding do not vote
    return (per_group * has_tokens).sum() / has_tokens.sum().clamp_min(1)


def router_z_loss(router_logits: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """ST-MoE z-loss (Zoph et al. 2022, eq. 5): mean over tokens of ``logsumexp(logits)^2``;
    ``router_logits`` is ``[..., T, N]``. No token at all (empty or all masked) gives 0."""
    z = torch.logsumexp(router_logits.float(), dim=-1).square()
    if token_mask is None:
        return z.mean() if z.numel() else z.sum() * 0.0
    weight = token_mask.to(z.dtype)
    return (z * weight).sum() / weight.sum().clamp_min(1)


def expert_capacity(
    tokens_per_group: int, num_experts: int, capacity_factor: float, top_k: int = 1, min_capacity: int = 4
) -> int:
    """Slots per expert and group: ``ceil(k * tokens_per_group / N * capacity_factor)``, at least
    ``min_capacity`` (T5X) and never more than the group has tokens (more could never be used)."""
    capacity = math.ceil(top_k * tokens_per_group * capacity_factor / num_experts)
    return min(max(capacity, min_capacity), tokens_per_group)


# ----------------------------------------------------------------------------- routing result


@dataclass
class Routing:
    """A router's decision for ``G`` routing groups of ``S`` tokens and ``N`` experts.

    The assignments are flat and in priority order within each group: dispatch keeps, for every
    expert and group, the first ``capacity`` assignments it meets. ``expert == N`` marks an
    assignment that is not routed at all (a masked padding token).
    """

    logits: Tensor  # [G, S, N] float32
    probs: Tensor  # [G, S, N] float32
    expert_index: Tensor | None  # [G, S, k] the experts tokens chose (token choice); None for expert choice
    token: Tensor  # [A] int64, index into the G*S flattened tokens
    expert: Tensor  # [A] int64 in [0, N]
    gate: Tensor  # [A] float32 in (0, 1]


# ----------------------------------------------------------------------------- routers


class Router(nn.Module):
    """Bias-free linear router computed in float32. Subclasses decide who goes where."""

    def __init__(self, d_model: int, num_experts: int, *, jitter_eps: float = 0.0, init_scale: float = 0.1):
        super().__init__()
        self.num_experts = num_experts
        self.jitter_eps = jitter_eps
        self.init_scale = init_scale
        # Hugging Face layout ([N, d], like nn.Linear) so checkpoints map one to one.
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scaled_trunc_normal_(self.weight, fan_in=self.weight.shape[1], scale=self.init_scale)

    def compute_logits(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self._float32_logits(x)
        return self._float32_logits(x)

    def _float32_logits(self, x: Tensor) -> Tensor:
        h = x.float()
        if self.training and self.jitter_eps > 0:
            # Out of place: the experts must see the clean input (HF once jittered in place).
            h = h * torch.empty_like(h).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        return F.linear(h, self.weight.float())

    def forward(self, x: Tensor, token_mask: Tensor | None, capacity: int | None) -> Routing:
        raise NotImplementedError


class TokenChoiceRouter(Router):
    """Each token picks its ``top_k`` most probable experts; ``top_k=1`` is the Switch router.

    The gate is the router probability of the chosen expert (optionally renormalised over the k
    choices). Priority within a group: every token's first choice before any second choice, and
    within a choice rank by position (``priority="position"``, T5X) or by descending router
    confidence (``priority="router_prob"``, the paper's batch-prioritised routing, encoder-only).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        top_k: int = 1,
        normalize_gates: bool = False,
        priority: str = "position",
        jitter_eps: float = 0.0,
        init_scale: float = 0.1,
    ):
        super().__init__(d_model, num_experts, jitter_eps=jitter_eps, init_scale=init_scale)
        self.top_k = top_k
        self.normalize_gates = normalize_gates
        self.priority = priority

    def selection_scores(self, probs: Tensor) -> Tensor:
        return probs

    def forward(self, x: Tensor, token_mask: Tensor | None, capacity: int | None) -> Routing:
        groups, seq, _ = x.shape
        logits = self.compute_logits(x)
        probs = torch.softmax(logits, dim=-1)
        _, expert_index = torch.topk(self.selection_scores(probs), self.top_k, dim=-1)  # [G, S, k]
        gate = probs.gather(-1, expert_index)
        if self.normalize_gates and self.top_k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)

        token = torch.arange(groups * seq, device=x.device).view(groups, seq)
        expert = expert_index
        if token_mask is not None:
            expert = expert.masked_fill(~token_mask.view(groups, seq, 1), self.num_experts)
        if self.priority == "router_prob":
            order = torch.argsort(probs.amax(dim=-1), dim=-1, descending=True, stable=True)  # [G, S]
            token = token.gather(1, order)
            expert = expert.gather(1, order.unsqueeze(-1).expand_as(expert))
            gate = gate.gather(1, order.unsqueeze(-1).expand_as(gate))
        # Choice-rank major within each group: [G, S, k] -> [G, k, S] -> flat.
        token = token.unsqueeze(1).expand(groups, self.top_k, seq)
        return Routing(
            logits=logits,
            probs=probs,
            expert_index=expert_index,
            token=token.reshape(-1),
            expert=expert.transpose(1, 2).reshape(-1),
            gate=gate.transpose(1, 2).reshape(-1),
        )


class AuxLossFreeRouter(TokenChoiceRouter):
    """Token choice with a per-expert bias added to the *selection* scores only (DeepSeek-V3,
    Wang et al. 2024, "Auxiliary-loss-free load balancing").

    The gates stay the unbiased probabilities. The bias moves by ``bias_update_rate`` towards
    balance, ``bias += rate * sign(mean(load) - load)`` with ``load`` the tokens each expert was
    chosen by: up for experts chosen less than average, down for those chosen more. It is state
    (a persistent float32 buffer ``expert_bias [N]``), not a learned weight, updated under
    ``no_grad``.

    When: by default after each training forward, on that forward's load. Every training forward
    also adds its load to ``pending_load`` (not saved); :func:`sync_bias_updates` turns the loads
    since the last sync into one update over their sum (a whole optimizer step, over every
    micro-batch, summed over data-parallel ranks by its ``reduce``), replacing the interim local
    updates, so every replica holds the bias of one process that saw the global batch.
    ``defer_bias_update = True`` skips the interim updates, so micro-batches after the first also
    route as that one process would (the trainer sets it).
    """

    def __init__(self, d_model: int, num_experts: int, *, bias_update_rate: float = 1e-3, **kwargs):
        super().__init__(d_model, num_experts, **kwargs)
        self.bias_update_rate = bias_update_rate
        self.defer_bias_update = False
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        # since the last sync: the summed load, and the sum of the interim local updates
        # (counts as int64: `.to(dtype)` leaves them exact in a bf16 model)
        self.register_buffer("pending_load", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("local_update", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        # a loaded bias is the new reference: forget what was pending against the old one
        self.register_load_state_dict_post_hook(lambda module, _: module._forget_pending())

    def materialize_buffers(self, device, dtype: torch.dtype) -> None:
        """The unsaved counters again (zeros), for a model built on the meta device; float32 whatever ``dtype``."""
        self.pending_load = torch.zeros(self.pending_load.shape, dtype=torch.long, device=device)
        self.local_update = torch.zeros(self.local_update.shape, dtype=torch.float32, device=device)

    def selection_scores(self, probs: Tensor) -> Tensor:
        return probs + self.expert_bias

    def bias_step(self, load: Tensor) -> Tensor:
        """The update for ``load`` (``[N]``, tokens per expert)."""
        load = load.float()
        return self.bias_update_rate * torch.sign(load.mean() - load)

    def forward(self, x: Tensor, token_mask: Tensor | None, capacity: int | None) -> Routing:
        routing = super().forward(x, token_mask, capacity)
        if self.training:
            with torch.no_grad():
                # slot N collects padding and dropped assignments: not a choice of any expert
                load = torch.bincount(routing.expert, minlength=self.num_experts + 1)[: self.num_experts]
                self.pending_load += load
                if not self.defer_bias_update:
                    step = self.bias_step(load)
                    self.expert_bias += step
                    self.local_update += step
        return routing

    @torch.no_grad()
    def apply_pending(self, total_load: Tensor) -> None:
        """Replace the interim updates since the last sync by one update on ``total_load``."""
        self.expert_bias += self.bias_step(total_load) - self.local_update  # no load: a zero step
        self._forget_pending()

    @torch.no_grad()
    def discard_pending(self) -> None:
        """Undo the interim updates since the last sync and forget their loads (a skipped step)."""
        self.expert_bias -= self.local_update
        self._forget_pending()

    @torch.no_grad()
    def _forget_pending(self) -> None:
        self.pending_load.zero_()
        self.local_update.zero_()


def _aux_loss_free_routers(model: nn.Module) -> list[AuxLossFreeRouter]:
    return [m for m in model.modules() if isinstance(m, AuxLossFreeRouter)]


def defer_bias_updates(model: nn.Module, defer: bool = True) -> None:
    """Make every aux-loss-free router of ``model`` wait for :func:`sync_bias_updates` (no interim
    update between the micro-batches of a step)."""
    for router in _aux_loss_free_routers(model):
        router.defer_bias_update = defer


def sync_bias_updates(model: nn.Module, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
    """Apply one selection-bias update per aux-loss-free router over the loads of every training
    forward since the last sync. ``reduce`` sums a flat int64 tensor over data-parallel replicas
    and returns it (``None``: this process alone); every replica then applies the same update, so
    they stay identical and equal to one process on the global batch."""
    routers = _aux_loss_free_routers(model)
    if not routers:
        return
    loads = torch.cat([r.pending_load for r in routers])
    if reduce is not None:
        loads = reduce(loads)
    for router, total in zip(routers, loads.split([r.num_experts for r in routers])):
        router.apply_pending(total)


def discard_bias_updates(model: nn.Module) -> None:
    """Undo every aux-loss-free router's interim updates since the last sync (the step was skipped)."""
    for router in _aux_loss_free_routers(model):
        router.discard_pending()


class ExpertChoiceRouter(Router):
    """Each expert takes the ``capacity`` tokens of the group it scores highest; gate = probability.

    Tokens may go to several experts or to none. Balanced by construction, so no auxiliary loss is
    needed. Choosing needs the whole group, later positions included: never use it causally.
    """

    def forward(self, x: Tensor, token_mask: Tensor | None, capacity: int | None) -> Routing:
        groups, seq, _ = x.shape
        if capacity is None:
            raise ValueError("capacity_factor: expert-choice routing needs a capacity (it cannot be dropless)")
        logits = self.compute_logits(x)
        probs = torch.softmax(logits, dim=-1)
        scores = probs
        if token_mask is not None:
            scores = probs.masked_fill(~token_mask.unsqueeze(-1), -1.0)  # padding is picked last
        capacity = min(capacity, seq)
        top_score, top_pos = torch.topk(scores.transpose(1, 2), capacity, dim=-1)  # [G, N, C]
        group_base = torch.arange(groups, device=x.device).view(groups, 1, 1) * seq
        expert = torch.arange(self.num_experts, device=x.device).view(1, -1, 1).expand_as(top_pos)
        expert = expert.masked_fill(top_score < 0, self.num_experts)
        return Routing(
            logits=logits,
            probs=probs,
            expert_index=None,
            token=(group_base + top_pos).reshape(-1),
            expert=expert.reshape(-1),
            gate=top_score.clamp_min(0).reshape(-1),
        )


def router_entropy_and_confidence(probs: Tensor, token_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mean entropy of the router distribution (nats) and mean top probability, over valid tokens."""
    with torch.no_grad():
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        if probs.numel() == 0:  # no token: nothing to describe
            zero = probs.new_zeros(())
            return zero, zero
        confidence = probs.amax(-1)
        if token_mask is None:
            return entropy.mean(), confidence.mean()
        weight = token_mask.to(probs.dtype)
        count = weight.sum().clamp_min(1)
        return (entropy * weight).sum() / count, (confidence * weight).sum() / count
