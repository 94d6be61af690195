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
    from switchformer.train.trainer import autocast_context, global_batch

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
    total_loss, total_tokens = 0.0, 0
    counts, dropped, entropy, seen = {}, {}, {}, 0
    try:
        with torch.no_grad():
            for call in range(calls):
                counted = call < len(mine)
                index = torch.arange(*mine[call]) if counted else torch.tensor([len(valid) - 1])
                batch = {k: v.to(device) for k, v in valid.rows(index).items()}
                with autocast_context(config, device):
                    out = forward(batch)
                if not counted:  # the layers' names (every rank sums the same tensors), no counts
                    for name, aux in out.router_stats.layers:
                        counts.setdefault(name, torch.zeros_like(aux.tokens_per_expert.cpu()))
                        dropped.setdefault(name, 0.0)
                        entropy.setdefault(name, 0.0)
                    continue
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
    if reduce_sum is not None:  # every rank's sums, so every rank reports the global figures
        names = sorted(counts)
        scalars = torch.tensor([total_loss, total_tokens, seen], dtype=torch.float64, device=device)
        scalars = reduce_sum(scalars).cpu()
        total_loss, total_tokens, seen = float(scalars[0]), int(scalars[1]), int(scalars[2])
        for name in names:
            packed = torch.cat(
                [counts[name].double(), torch.tensor([dropped[name], entropy[name]], dtype=torch.float64)]
            )
            packed = reduce_sum(packed.to(device)).cpu()
            counts[name], dropped[name], entropy[name] = packed[:-2].long(), float(packed[-2]), float(packed[-1])
    loss = total_loss / total_tokens if total_tokens else float("nan")
    routing = {
        name: {
            "tokens_per_expert": counts[name].tolist(),
            "dropped_fraction": dropped[name] / max(seen, 1),
            "router_entropy": entropy[name] / max(seen, 1),
            "max_load_over_mean": float(counts[name].max() / counts[name].float().mean().clamp_min(1e-9)),
        }
        for name in counts
    }
    perplexity = math.exp(min(loss, 50)) if total_tokens else float("nan")
    return EvalResult(loss, perplexity, total_tokens, routing)


def _chunks(rows: int, rows_per_batch: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the ``size``-row pieces of each evaluation batch of ``rows_per_batch``
    rows over the first ``rows`` rows (a batch's last piece may be shorter; none straddles two)."""
    pieces = []
    for first in range(0, rows, rows_per_batch):
        last = min(first + rows_per_batch, rows)
        pieces.extend((start, min(start + size, last)) for start in range(first, last, size))
    return pieces


def run_global_batch(source: str | Path, config: TrainConfig) -> int:
    """The global batch a run trained with (its latest checkpoint's ``state.json`` records it, for
    any number of processes), else ``batch_size x grad_accum``: training's evaluation batch, so
    ``eval`` in one process scores the rows training's evaluation scored."""
    from switchformer.runs.checkpoints import state_value
    from switchformer.runs.directory import run_dir_of
    from switchformer.train.checkpoint import latest_checkpoint

    source = Path(source)
    folder = source if (source / "state.json").is_file() else latest_checkpoint(run_dir_of(source), warn=False)
    saved = None if folder is None else state_value(folder, "global_batch")
    if isinstance(saved, int) and not isinstance(saved, bool) and saved >= 1:
        return saved
    from switchformer.train.trainer import global_batch

    return global_batch(config, 1)


def evaluate_run(
    source: str | Path,
    *,
    data: list[str] | None = None,
    batches: int | None = None,
    routing: str = "eval",
    device: str | None = None,
    metrics: list[str] | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    max_new_tokens: int | None = None,
    no_repeat_ngram_size: int | None = None,
    source_lang: str | None = None,
    progress: bool = False,
) -> dict:
    """``switchformer eval``: the run's (or checkpoint's) model on its validation split, or on every
    document of ``data``. Reads the run and writes nothing anywhere. Returns a JSON-ready dict
    (NaN as ``None``).

    ``metrics`` (``"bleu"``, ``"chrf"``; seq2seq runs): the same pairs are also translated
    (:func:`switchformer.inference.translation.translate`; ``num_beams``, ``length_penalty``,
    ``max_new_tokens``, ``no_repeat_ngram_size`` default to the run's) and scored against their
    targets with sacrebleu (:mod:`switchformer.train.metrics`), per source language too when there
    are several. With
    ``metrics``, every pair is evaluated (loss included) unless ``batches`` is given; ``progress``
    shows a bar while translating. ``source_lang``: the source language of ``data``'s pairs that
    do not say theirs (one of the run's; a TSV or a pair of unnamed files)."""
    from switchformer.inference.routing import inference_routing, routing_description
    from switchformer.runtime import resolve_device
    from switchformer.train.data import evaluation_documents, evaluation_split
    from switchformer.train.metrics import check_metrics
    from switchformer.train.run import load_run

    if batches is not None and batches < 1:
        raise ValueError(f"--batches: must be >= 1, got {batches}")
    metrics = check_metrics(metrics or [])  # sacrebleu missing is said before any work
    if not metrics:
        for flag, value in (
            ("--num-beams", num_beams),
            ("--length-penalty", length_penalty),
            ("--max-new-tokens", max_new_tokens),
            ("--no-repeat-ngram-size", no_repeat_ngram_size),
        ):
            if value is not None:
                raise ValueError(f"{flag}: used only to translate for --metric; give --metric bleu (or chrf) too")
    model, tokenizer, config = load_run(source)
    if source_lang is not None:  # the language of --data's pairs that do not say theirs
        from dataclasses import replace

        from switchformer.inference.translation import check_languages, require_seq2seq

        require_seq2seq(config, "--source-lang")
        if not data:
            raise ValueError("--source-lang: names the language of --data's pairs; give --data too")
        check_languages(config, source_lang)
        config = replace(config, source_lang=source_lang)
    if metrics:
        from switchformer.inference.translation import check_settings, decoding_settings, require_seq2seq

        require_seq2seq(config, "--metric (BLEU, chrF)")
        settings = decoding_settings(config, num_beams, length_penalty, max_new_tokens, no_repeat_ngram_size)
        check_settings(settings)
    target = resolve_device(device)
    model.to(target)
    documents = evaluation_documents(config, data)  # read once: the loss's rows and, with metrics, the pairs
    valid = evaluation_split(config, tokenizer, data, documents)
    if len(valid) == 0:
        raise ValueError(f"{data or source}: no validation rows to evaluate")
    rows_per_batch = run_global_batch(source, config)  # the rows training's evaluation scored per batch
    if (data or metrics) and batches is None:  # a user's test set, or BLEU: every row, not the run's eval_batches
        batches = math.ceil(len(valid) / rows_per_batch)
    with inference_routing(model, routing):
        result = evaluate(model, valid, config, target, batches, rows_per_batch=rows_per_batch)
    scores = {}
    if metrics:
        rows = min(len(valid), (batches or config.eval_batches) * rows_per_batch)  # the pairs the loss scored
        pairs = documents[:rows]  # the split's pairs, in its row order
        scores = translation_scores(model, tokenizer, config, pairs, metrics, settings, routing, source_lang, progress)
    return {
        "run": str(source),
        "data": list(data) if data else "validation split",
        "routing_mode": routing,
        "routing_used": routing_description(model, routing),
        "eval_loss": None if math.isnan(result.loss) else result.loss,
        "perplexity": None if math.isnan(result.perplexity) else result.perplexity,
        "tokens": result.tokens,
        "routing": result.routing,
        **scores,
    }


def translation_scores(model, tokenizer, config, pairs, metrics, settings, routing, source_lang, progress) -> dict:
    """Translate the sources of ``pairs`` and score them against their targets: the JSON-ready
    part of :func:`evaluate_run`'s report for ``metrics`` (see there)."""
    from tqdm.auto import tqdm

    from switchformer.inference.translation import DEFAULT_BATCH_SIZE, translate
    from switchformer.train.metrics import corpus_scores, scores_by_group

    bar = tqdm(total=len(pairs), unit="sent", desc="translating", disable=not progress, dynamic_ncols=True)
    try:
        hypotheses = list(
            translate(
                model,
                tokenizer,
                config,
                pairs,
                source_lang=source_lang,
                batch_size=DEFAULT_BATCH_SIZE,
                routing=routing,
                progress=bar.update,
                **settings,
            )
        )
    finally:
        bar.close()
    references = [pair[1] for pair in pairs]
    scores = corpus_scores(hypotheses, references, metrics)
    out: dict = {"translated_pairs": len(pairs), "decoding": settings}
    for name, score in scores.items():
        out[name] = score["score"]
        out[f"{name}_signature"] = score["signature"]
        out[f"{name}_text"] = score["text"]
    languages = [getattr(pair, "source_lang", None) or source_lang for pair in pairs]
    if len(set(languages)) > 1:
        groups = scores_by_group(hypotheses, references, [lang or "unknown" for lang in languages], metrics)
        out["by_source_lang"] = {
            lang: {"pairs": group["pairs"], **{name: group[name]["score"] for name in metrics}}
            for lang, group in groups.items()
        }
    return out


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
    if "translated_pairs" in report:
        d = report["decoding"]
        how = "greedy" if d["num_beams"] == 1 else f"{d['num_beams']} beams, length penalty {d['length_penalty']:g}"
        if d.get("no_repeat_ngram_size"):
            how += f", no repeated {d['no_repeat_ngram_size']}-gram"
        lines.append(
            f"translation of {report['translated_pairs']:,} pairs ({how}, at most {d['max_new_tokens']} tokens):"
        )
        for name in ("bleu", "chrf"):
            if name in report:
                lines.append(f"  {report[f'{name}_text']}  ({report[f'{name}_signature']})")
        for lang, group in report.get("by_source_lang", {}).items():
            scores = ", ".join(f"{'BLEU' if n == 'bleu' else 'chrF'} {v:.2f}" for n, v in group.items() if n != "pairs")
            lines.append(f"  {lang}: {scores} over {group['pairs']:,} pairs")
    return "\n".join(lines)
