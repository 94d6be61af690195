"""Translation metrics: corpus BLEU and chrF computed by ``sacrebleu``, the field's standard scorer,
with its signature (``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0``) so a score
can be compared with others computed the same way. ``sacrebleu`` is an optional extra:
``pip install 'switchformer[metrics]'``."""

from __future__ import annotations

METRICS = ("bleu", "chrf")
INSTALL = "pip install 'switchformer[metrics]'"


class MetricsUnavailable(ValueError):
    """``sacrebleu`` is not installed; the message says how to install it."""


def require_sacrebleu():
    """The ``sacrebleu`` module, or :class:`MetricsUnavailable` saying what to install."""
    try:
        import sacrebleu
    except ImportError:
        raise MetricsUnavailable(
            f"--metric: BLEU and chrF are scored by sacrebleu, which is not installed: {INSTALL}"
        ) from None
    return sacrebleu


def _scorer(name: str):
    from sacrebleu.metrics import BLEU, CHRF

    if name == "bleu":
        return BLEU()  # sacrebleu's defaults: 13a tokenisation, exponential smoothing, mixed case
    if name == "chrf":
        return CHRF()  # chrF2: character 6-grams, beta 2
    raise ValueError(f"--metric: unknown {name!r}; choose from {', '.join(METRICS)}")


def check_metrics(names) -> list[str]:
    """``names`` without repeats, checked: ``ValueError`` naming an unknown metric;
    :class:`MetricsUnavailable` when ``sacrebleu`` is missing."""
    names = list(dict.fromkeys(names))
    for name in names:
        if name not in METRICS:
            raise ValueError(f"--metric: unknown {name!r}; choose from {', '.join(METRICS)}")
    if names:
        require_sacrebleu()
    return names


def corpus_scores(hypotheses: list[str], references: list[str], metrics=METRICS) -> dict[str, dict]:
    """Corpus scores of ``hypotheses`` against one reference each, per metric name:
    ``{"score": float, "signature": str, "text": str}`` (``text`` is sacrebleu's own line, as
    ``BLEU = 34.12 65.0/41.2/27.9/19.0 (BP = 1.000 ...)``)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"references: {len(references)} for {len(hypotheses)} hypotheses")
    require_sacrebleu()
    out = {}
    for name in check_metrics(metrics):
        scorer = _scorer(name)
        result = scorer.corpus_score(list(hypotheses), [list(references)])
        out[name] = {"score": float(result.score), "signature": str(scorer.get_signature()), "text": str(result)}
    return out


def scores_by_group(hypotheses: list[str], references: list[str], groups: list, metrics=METRICS) -> dict:
    """:func:`corpus_scores` of each group of sentences (``groups[i]`` names sentence ``i``'s group,
    e.g. its source language), with ``"pairs"``: how many sentences it holds; groups sorted by name."""
    out = {}
    for group in sorted(set(groups), key=str):
        index = [i for i, g in enumerate(groups) if g == group]
        scores = corpus_scores([hypotheses[i] for i in index], [references[i] for i in index], metrics)
        out[group] = {"pairs": len(index), **scores}
    return out
