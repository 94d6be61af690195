"""Validation loss, perplexity and routing statistics: during training, and of a saved run
(``switchformer eval``), which only reads the run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from switchformer.train.config import TrainConfig


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


def evaluate(model, valid, config: TrainConfig, device, max_batches: int | None = None, forward=None) -> EvalResult:
    """Score up to ``max_batches`` (default ``config.eval_batches``) batches of ``config.batch_size``
    rows of the split ``valid`` in order; the model's mode is restored afterwards. ``forward(batch)``
    runs the model on a batch already on ``device`` (default: the model's keyword call)."""
    from switchformer.train.trainer import autocast_context

    if max_batches is not None and max_batches < 1:
        raise ValueError(f"batches: must be >= 1, got {max_batches}")
    forward = forward or (lambda batch: model_forward(model, batch))
    was_training = model.training
    model.eval()
    batches = max_batches or config.eval_batches
    total_loss, total_tokens = 0.0, 0
    counts, dropped, entropy, seen = {}, {}, {}, 0
    try:
        with torch.no_grad():
            for b in range(batches):
                start = b * config.batch_size
                if start >= len(valid):  # a small validation split: use what there is
                    break
                index = torch.arange(start, min(start + config.batch_size, len(valid)))
                batch = {k: v.to(device) for k, v in valid.rows(index).items()}
                with autocast_context(config, device):
                    out = forward(batch)
                tokens = scored_tokens(batch)
                if tokens:
                    total_loss += out.ce_loss.item() * tokens
                    total_tokens += tokens
                for name, aux in out.router_stats.layers:
                    counts[name] = counts.get(name, 0) + aux.tokens_per_expert.cpu()
                    dropped[name] = dropped.get(name, 0.0) + aux.dropped_fraction
                    entropy[name] = entropy.get(name, 0.0) + float(aux.router_entropy)
                seen += 1
    finally:
        model.train(was_training)
    loss = total_loss / total_tokens if total_tokens else float("nan")
    routing = {
        name: {
            "tokens_per_expert": counts[name].tolist(),
            "dropped_fraction": dropped[name] / seen,
            "router_entropy": entropy[name] / seen,
            "max_load_over_mean": float(counts[name].max() / counts[name].float().mean().clamp_min(1e-9)),
        }
        for name in counts
    }
    perplexity = math.exp(min(loss, 50)) if total_tokens else float("nan")
    return EvalResult(loss, perplexity, total_tokens, routing)


def evaluate_run(
    source: str | Path,
    *,
    data: list[str] | None = None,
    batches: int | None = None,
    routing: str = "eval",
    device: str | None = None,
) -> dict:
    """``switchformer eval``: the run's (or checkpoint's) model on its validation split, or on every
    document of ``data``. Reads the run and writes nothing anywhere. Returns a JSON-ready dict
    (NaN as ``None``)."""
    from switchformer.generation import inference_routing, routing_description
    from switchformer.runtime import resolve_device
    from switchformer.train.data import evaluation_split
    from switchformer.train.run import load_run

    if batches is not None and batches < 1:
        raise ValueError(f"--batches: must be >= 1, got {batches}")
    model, tokenizer, config = load_run(source)
    target = resolve_device(device)
    model.to(target)
    valid = evaluation_split(config, tokenizer, data)
    if len(valid) == 0:
        raise ValueError(f"{data or source}: no validation rows to evaluate")
    if data and batches is None:  # a user's test set: every row, not the run's eval_batches
        batches = math.ceil(len(valid) / config.batch_size)
    with inference_routing(model, routing):
        result = evaluate(model, valid, config, target, batches)
    return {
        "run": str(source),
        "data": list(data) if data else "validation split",
        "routing_mode": routing,
        "routing_used": routing_description(model, routing),
        "eval_loss": None if math.isnan(result.loss) else result.loss,
        "perplexity": None if math.isnan(result.perplexity) else result.perplexity,
        "tokens": result.tokens,
        "routing": result.routing,
    }


def format_eval(report: dict) -> str:
    """The readable summary ``switchformer eval`` prints (``--json`` prints the dict itself)."""
    loss = report["eval_loss"]
    lines = [
        f"{report['run']}: on {report['data'] if isinstance(report['data'], str) else ', '.join(report['data'])}",
        "validation loss "
        + (
            ("not finite (the model's outputs hold NaN or infinity)" if report["tokens"] else "n/a (no scored token)")
            if loss is None
            else f"{loss:.4f}, perplexity {report['perplexity']:.2f}"
        )
        + f" over {report['tokens']:,} tokens",
        f"routing: {report['routing_used']}",
    ]
    for name, r in report["routing"].items():
        lines.append(
            f"  {name}: max/mean expert load {r['max_load_over_mean']:.2f}, dropped {r['dropped_fraction']:.1%}, "
            f"router entropy {r['router_entropy']:.2f} nats"
        )
    return "\n".join(lines)
