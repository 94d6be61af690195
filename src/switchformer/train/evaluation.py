"""Validation loss, perplexity and routing statistics: during training, and of a saved run
(``switchformer eval``), which only reads the run."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from switchformer.train.config import TrainConfig
from switchformer.train.layout import global_batch
from switchformer.train.precision import autocast_context


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per scored token (nats); NaN when no token was scored
    perplexity: float
    tokens: int  # scored label tokens
    routing: dict  # per Switch layer: tokens_per_expert, dropped_fraction, router_entropy, max_load_over_mean

    def to_dict(self) -> dict:
        return {
            "eval_loss": self.loss,
            "perplexity": self.perplexity,
            "eval_tokens": self.tokens,
            "routing": self.routing,
        }


def scored_tokens(batch: dict) -> int:
    """Label tokens the cross-entropy of ``batch`` averages over: ``labels`` other than -100
    (seq2seq, span corruption), else each position whose input and next token are both real
    (causal LM, the model's shift)."""
    if "labels" in batch:
        return int((batch["labels"] != -100).sum())
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if mask is None:
        return ids.shape[0] * max(ids.shape[1] - 1, 0)
    mask = mask.bool()
    return int((mask[:, :-1] & mask[:, 1:]).sum())


def model_forward(model, batch: dict, label_smoothing: float = 0.0):
    """The model's loss on a training or validation batch of either objective; ``label_smoothing``
    for training (evaluation scores the plain cross-entropy)."""
    extra = {"label_smoothing": label_smoothing} if label_smoothing else {}
    if "labels" in batch:
        return model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"], **extra)
    return model(batch["input_ids"], labels=batch["input_ids"], **extra)


def evaluate(
    model,
    valid,
    config: TrainConfig,
    device,
    max_batches: int | None = None,
    forward=None,
    rank: int = 0,
    world: int = 1,
    reduce_sum=None,
    rows_per_batch: int | None = None,
) -> EvalResult:
    """Score up to ``max_batches`` (default ``config.eval_batches``) evaluation batches of the split
    ``valid`` in order; the model's mode is restored afterwards. ``forward(batch)`` runs the model
    on a batch already on ``device`` (default: the model's keyword call).

    An evaluation batch is ``rows_per_batch`` rows (default: the global batch, ``batch_size x
    grad_accum x world``), run through the model in chunks of ``batch_size`` rows (each chunk a
    routing group, as a training micro-batch is), so the figures do not depend on how many
    processes share the work. Under torchrun (``world`` ranks, ``reduce_sum`` summing a tensor over
    them), rank ``r`` runs chunks ``r, r + world, ...`` and the sums are reduced; a rank with fewer
    chunks than another still runs the model (its collectives must meet the others') on a
    stand-in row that counts for nothing."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"batches: must be >= 1, got {max_batches}")
    forward = forward or (lambda batch: model_forward(model, batch))
    was_training = model.training
    model.eval()
    batches = max_batches or config.eval_batches
    if rows_per_batch is None:
        rows_per_batch = global_batch(config, world)
    rows = min(len(valid), batches * rows_per_batch)  # a small split: what there is
    chunks = _chunks(rows, rows_per_batch, config.batch_size)
    mine = chunks[rank::world]
    calls = math.ceil(len(chunks) / world)  # the same on every rank
    totals = _Totals()
    try:
        with torch.no_grad():
            for call in range(calls):
                counted = call < len(mine)
                index = torch.arange(*mine[call]) if counted else torch.tensor([len(valid) - 1])
                batch = {k: v.to(device) for k, v in valid.rows(index).items()}
                with autocast_context(config, device):
                    out = forward(batch)
                if counted:
                    totals.add(out, scored_tokens(batch))
                else:  # the layers' names (every rank sums the same tensors), no counts
                    totals.name_layers(out)
    finally:
        model.train(was_training)
    if reduce_sum is not None:  # every rank's sums, so every rank reports the global figures
        totals.reduce(reduce_sum, device)
    return totals.result()


class _Totals:
    """Sums over the evaluated chunks: the loss over scored tokens, and per Switch layer the tokens
    each expert got, the dropped fraction and the router entropy."""

    def __init__(self):
        self.loss, self.tokens, self.seen = 0.0, 0, 0
        self.counts, self.dropped, self.entropy = {}, {}, {}

    def add(self, out, tokens: int) -> None:
        if tokens:
            self.loss += out.ce_loss.item() * tokens
            self.tokens += tokens
        for name, aux in out.router_stats.layers:
            self.counts[name] = self.counts.get(name, 0) + aux.tokens_per_expert.cpu()
            self.dropped[name] = self.dropped.get(name, 0.0) + aux.dropped_fraction
            self.entropy[name] = self.entropy.get(name, 0.0) + float(aux.router_entropy)
        self.seen += 1

    def name_layers(self, out) -> None:
        for name, aux in out.router_stats.layers:
            self.counts.setdefault(name, torch.zeros_like(aux.tokens_per_expert.cpu()))
            self.dropped.setdefault(name, 0.0)
            self.entropy.setdefault(name, 0.0)

    def reduce(self, reduce_sum, device) -> None:
        scalars = torch.tensor([self.loss, self.tokens, self.seen], dtype=torch.float64, device=device)
        scalars = reduce_sum(scalars).cpu()
        self.loss, self.tokens, self.seen = float(scalars[0]), int(scalars[1]), int(scalars[2])
        for name in sorted(self.counts):
            extra = torch.tensor([self.dropped[name], self.entropy[name]], dtype=torch.float64)
            packed = reduce_sum(torch.cat([self.counts[name].double(), extra]).to(device)).cpu()
            self.counts[name], self.dropped[name], self.entropy[name] = (
                packed[:-2].long(), float(packed[-2]), float(packed[-1])
            )  # fmt: skip

    def result(self) -> EvalResult:
        loss = self.loss / self.tokens if self.tokens else float("nan")
        seen = max(self.seen, 1)
        routing = {
            name: {
                "tokens_per_expert": counts.tolist(),
                "dropped_fraction": self.dropped[name] / seen,
                "router_entropy": self.entropy[name] / seen,
                "max_load_over_mean": float(counts.max() / counts.float().mean().clamp_min(1e-9)),
            }
            for name, counts in self.counts.items()
        }
        perplexity = math.exp(min(loss, 50)) if self.tokens else float("nan")
        return EvalResult(loss, perplexity, self.tokens, routing)


def _chunks(rows: int, rows_per_batch: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the ``size``-row pieces of each evaluation batch of ``rows_per_batch``
    rows over the first ``rows`` rows (a batch's last piece may be shorter; none straddles two)."""
    pieces = []
    for first in range(0, rows, rows_per_batch):
        last = min(first + rows_per_batch, rows)
        pieces.extend((start, min(start + size, last)) for start in range(first, last, size))
    return pieces
