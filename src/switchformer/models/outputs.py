"""What a forward returns: :class:`ModelOutput` (logits, losses, router statistics), the router
statistics of each Switch layer (:class:`RouterStats`), and how the router losses are combined
(per layer, then averaged: imbalances of different layers do not cancel)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from switchformer.models.vocab_loss import linear_cross_entropy
from switchformer.moe.layer import MoEAux


@dataclass
class RouterStats:
    """Per sparse layer: its name and what the layer reported."""

    layers: list[tuple[str, MoEAux]] = field(default_factory=list)

    def add(self, name: str, aux: MoEAux | None) -> None:
        if aux is not None:
            self.layers.append((name, aux))

    def mean(self, attribute: str, prefix: str = "") -> Tensor | None:
        values = [getattr(aux, attribute) for name, aux in self.layers if name.startswith(prefix)]
        return torch.stack(values).mean() if values else None

    def summary(self) -> dict[str, dict[str, float]]:
        """Plain numbers per layer, for logs: dropped fraction, entropy, load imbalance."""
        out = {}
        for name, aux in self.layers:
            counts = aux.tokens_per_expert.float()
            out[name] = {
                "dropped_fraction": aux.dropped_fraction,
                "router_entropy": float(aux.router_entropy),
                "max_load_over_mean": float(counts.max() / counts.mean().clamp_min(1e-9)),
            }
        return out


class ModelOutput:
    """What a model's forward returns. ``logits`` are computed on first access when the loss was
    computed without them (the fused output-layer loss), so training never pays for them."""

    def __init__(
        self,
        logits: Tensor | Callable[[], Tensor],
        loss: Tensor | None = None,
        ce_loss: Tensor | None = None,
        aux_loss: Tensor | None = None,
        z_loss: Tensor | None = None,
        router_stats: RouterStats | None = None,
        encoder_hidden_states: Tensor | None = None,
        cache: object | None = None,
    ):
        self._logits = logits
        self.loss, self.ce_loss, self.aux_loss, self.z_loss = loss, ce_loss, aux_loss, z_loss
        self.router_stats = router_stats
        self.encoder_hidden_states = encoder_hidden_states
        self.cache = cache

    @property
    def logits(self) -> Tensor:
        if callable(self._logits):
            self._logits = self._logits()
        return self._logits


def combined_router_losses(stats: RouterStats, stacks: tuple[str, ...]) -> tuple[Tensor | None, Tensor | None]:
    """Each layer's own losses, averaged over the sparse layers of a stack, summed over stacks.

    Averaging within a stack equals Hugging Face's z-loss (its logits are pooled over layers with
    equal token counts); the aux loss stays per layer, so imbalances in different layers never
    cancel as they do in HF's pooled version.
    """
    aux, z = None, None
    for stack in stacks:
        stack_aux, stack_z = stats.mean("aux_loss", stack), stats.mean("z_loss", stack)
        if stack_aux is not None:
            aux = stack_aux if aux is None else aux + stack_aux
            z = stack_z if z is None else z + stack_z
    return aux, z


def _deferred_logits(x: Tensor, weight: Tensor) -> Callable[[], Tensor]:
    """Logits computed later as they would have been now: same grad mode, no autocast."""
    grad_enabled = torch.is_grad_enabled()

    def compute() -> Tensor:
        with torch.set_grad_enabled(grad_enabled), torch.autocast(x.device.type, enabled=False):
            return x @ weight.t()

    return compute


def weighted_router_loss(config, aux: Tensor, z: Tensor) -> Tensor:
    """``router_aux_loss_coef * aux + router_z_loss_coef * z``: what the router losses add to a loss."""
    return config.router_aux_loss_coef * aux + config.router_z_loss_coef * z


def finish_output(
    config, x, weight, labels, stats, stacks, encoder_hidden_states=None, label_smoothing: float = 0.0
) -> ModelOutput:
    """Logits ``x @ weight.T``; cross-entropy over non-ignored labels (-100) plus the router losses
    with their coefficients. ``labels`` are aligned with ``x`` (a causal LM shifts them first).
    ``label_smoothing``: as ``F.cross_entropy``'s (a training choice; 0 scores the model).

    In float32 without autocast the cross-entropy is fused with the output projection
    (:mod:`vocab_loss`) and the logits are only computed if ``.logits`` is read.
    """
    aux, z = combined_router_losses(stats, stacks)
    ce = None
    loss = None
    logits = None
    if labels is not None:
        fused = (
            x.dtype == torch.float32 and weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
        )
        if fused:
            ce = linear_cross_entropy(x.reshape(-1, x.shape[-1]), weight, labels.reshape(-1), label_smoothing)
        else:
            logits = x @ weight.t()
            ce = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), label_smoothing=label_smoothing
            )
        loss = ce
        if aux is not None:
            loss = loss + weighted_router_loss(config, aux, z)
    return ModelOutput(
        logits=_deferred_logits(x, weight) if logits is None else logits,
        loss=loss,
        ce_loss=ce,
        aux_loss=aux,
        z_loss=z,
        router_stats=stats,
        encoder_hidden_states=encoder_hidden_states,
    )
