"""The optimiser (AdamW or Adafactor), the learning-rate schedule (warmup, then cosine, inverse
square root or constant) and gradient clipping over every shard."""

from __future__ import annotations

import math

import torch

from switchformer.parallel import grad_norm, scale_gradients
from switchformer.train.config import TrainConfig


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to 10% (or inverse square root, or constant)."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "inverse_sqrt":
        return config.lr * math.sqrt(max(config.warmup_steps, 1) / max(step, 1))
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def embedding_tables(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of every ``nn.Embedding``: token embeddings and T5's relative-position biases."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]


def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or Adafactor) over three groups: matrices with weight decay, vectors without, and,
    when ``embedding_lr_scale`` is not 1, the embedding tables with decay at ``lr_scale`` times the
    schedule's rate (each group's ``lr_scale``; the trainer sets ``lr`` from it every step). AdamW's
    decoupled decay is ``lr x weight_decay``, so the tables also decay ``lr_scale`` times faster (a
    row no batch touches shrinks by about e^-1.3 over mt-small's schedule), and a tied output layer,
    being the token table, trains at the scaled rate too; mt-small's figures were measured so."""
    tables = {id(p) for p in embedding_tables(model)} if config.embedding_lr_scale != 1 else set()
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in tables]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if tables:
        # Adam moves every element by about the learning rate a step, whatever its scale: the
        # embeddings start at std sqrt(init_scale) (0.32) and a position bias must grow to a few
        # units to order the words, so at the matrices' rate both learn slowly (docs/translation.md)
        embedded = [p for p in model.parameters() if id(p) in tables]
        scale = config.embedding_lr_scale
        groups.append(
            {"params": embedded, "weight_decay": config.weight_decay, "lr": config.lr * scale, "lr_scale": scale}
        )
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=config.lr)
    # The fused kernel makes one pass over each tensor: with stacked [E, d, f] experts the
    # multi-pass implementation streams every expert tensor from memory eight times per step
    # (measured 2.5x slower at E=64 on CPU).
    try:
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, config.beta2), fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, config.beta2))


def clip_grad_norm(model: torch.nn.Module, max_norm: float, parallel) -> float:
    """Clip by the norm of the whole model's gradient (under torchrun: over every rank's shards,
    :func:`switchformer.parallel.grad_norm`, the figure one process computes on the whole model)."""
    if parallel is None:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    total = grad_norm(model, parallel)
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        scale_gradients(model, scale)
    return total
