"""``switchformer eval RUN``'s library: a run's validation loss, perplexity and per-layer routing on
its validation split or a user's data, and for a translation run corpus BLEU and chrF of its
translations (sacrebleu). Reads the run, writes nothing."""

from __future__ import annotations

import math
from pathlib import Path

from switchformer.analysis.metrics import check_metrics, corpus_scores, scores_by_group
from switchformer.inference.routing import inference_routing, routing_description
from switchformer.inference.translation import (
    DEFAULT_BATCH_SIZE,
    check_languages,
    check_settings,
    decoding_settings,
    require_seq2seq,
    translate,
)
from switchformer.runs.checkpoints import state_value
from switchformer.runs.directory import run_dir_of
from switchformer.runtime import resolve_device
from switchformer.train.checkpoint import latest_checkpoint
from switchformer.train.config import TrainConfig
from switchformer.train.data import evaluation_documents, evaluation_split
from switchformer.train.evaluation import evaluate
from switchformer.train.layout import global_batch
from switchformer.train.run import load_run


def run_global_batch(source: str | Path, config: TrainConfig) -> int:
    """The global batch a run trained with (its latest checkpoint's ``state.json`` records it, for
    any number of processes), else ``batch_size x grad_accum``: training's evaluation batch, so
    ``eval`` in one process scores the rows training's evaluation scored."""
    source = Path(source)
    folder = source if (source / "state.json").is_file() else latest_checkpoint(run_dir_of(source), warn=False)
    saved = None if folder is None else state_value(folder, "global_batch")
    if isinstance(saved, int) and not isinstance(saved, bool) and saved >= 1:
        return saved

    return global_batch(config, 1)


def evaluate_run(
    source: str | Path, *, data: list[str] | None = None, batches: int | None = None, routing: str = "eval",
    device: str | None = None, metrics: list[str] | None = None, num_beams: int | None = None,
    length_penalty: float | None = None, max_new_tokens: int | None = None, no_repeat_ngram_size: int | None = None,
    source_lang: str | None = None, progress: bool = False, load_options: dict | None = None,
) -> dict:  # fmt: skip
    """``switchformer eval``: the run's (or checkpoint's) model on its validation split, or on every
    document of ``data``. Reads the run and writes nothing anywhere. Returns a JSON-ready dict
    (NaN as ``None``).

    ``metrics`` (``"bleu"``, ``"chrf"``; seq2seq runs): the same pairs are also translated
    (:func:`switchformer.inference.translation.translate`; ``num_beams``, ``length_penalty``,
    ``max_new_tokens``, ``no_repeat_ngram_size`` default to the run's) and scored against their
    targets with sacrebleu (:mod:`switchformer.analysis.metrics`), per source language too when there
    are several. With
    ``metrics``, every pair is evaluated (loss included) unless ``batches`` is given; ``progress``
    shows a bar while translating. ``source_lang``: the source language of ``data``'s pairs that
    do not say theirs (one of the run's; a TSV or a pair of unnamed files). ``load_options``: for
    ``load_run`` (``--dtype``, ``--max-memory``; offloaded experts add ``expert_cache`` statistics)."""
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
    model, tokenizer, config = load_run(source, **(load_options or {}))
    if source_lang is not None:  # the language of --data's pairs that do not say theirs
        from dataclasses import replace

        require_seq2seq(config, "--source-lang")
        if not data:
            raise ValueError("--source-lang: names the language of --data's pairs; give --data too")
        check_languages(config, source_lang)
        config = replace(config, source_lang=source_lang)
    if metrics:
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
        **_cache_stats(model),
    }


def _cache_stats(model) -> dict:
    cache = getattr(model, "expert_cache", None)
    return {"expert_cache": cache.stats()} if cache is not None else {}


def translation_scores(model, tokenizer, config, pairs, metrics, settings, routing, source_lang, progress) -> dict:
    """Translate the sources of ``pairs`` and score them against their targets: the JSON-ready
    part of :func:`evaluate_run`'s report for ``metrics`` (see there)."""
    from tqdm.auto import tqdm

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
    if "expert_cache" in report:
        c = report["expert_cache"]
        lines.append(
            f"expert cache: {c['hits'] + c['misses']:,} fetches, hit rate {c['hit_rate']:.1%}, "
            f"{c['bytes_read'] / 2**20:,.1f} MiB read"
        )
    return "\n".join(lines)
