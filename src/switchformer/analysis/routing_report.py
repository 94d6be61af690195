"""Which experts each group of inputs uses: for a multilingual translation run, the share of each
source language's tokens that every expert of every Switch layer receives.

Expert specialisation is what users of a multilingual Switch model want to see (Fedus et al.
2022, section 5.4, mSwitch). The counts are the router's choices: the model runs dropless
(every token reaches its top-1 expert), so no capacity limit hides a preference, on the pairs
teacher-forced (encoder tokens are the source language's; decoder tokens are the target side
produced while translating from it).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from switchformer.analysis.plots import _pyplot, _save
from switchformer.data.formatting import Pair
from switchformer.inference.routing import inference_routing
from switchformer.inference.translation import require_seq2seq
from switchformer.runs.files import write_json_atomic
from switchformer.runtime import resolve_device
from switchformer.train.data import evaluation_documents, split_from_documents
from switchformer.train.evaluation import evaluate
from switchformer.train.init_from import is_sparse
from switchformer.train.run import load_run


def group_by_source_language(pairs: list[Pair]) -> dict[str, list[Pair]]:
    """Pairs grouped by ``source_lang`` in first-seen order. Raises ``ValueError`` when a pair has
    no source language (the data's files or rows must say it)."""
    groups: dict[str, list[Pair]] = {}
    for pair in pairs:
        lang = getattr(pair, "source_lang", None)
        if not lang:
            raise ValueError(
                "data: the pairs carry no source language; give line-aligned files named by language "
                "(train.de, train.fr, ...) or JSONL rows with a 'source_lang' field"
            )
        groups.setdefault(lang, []).append(pair)
    return groups


def expert_shares(model, tokenizer, config, groups: dict[str, list], device) -> dict[str, dict[str, list[float]]]:
    """``{group: {layer: [share of the group's routed tokens per expert]}}`` (each list sums to 1)
    for every Switch layer, with the model routed dropless, the pairs formatted as in training."""
    shares = {}
    with inference_routing(model, "dropless"):
        for name, pairs in groups.items():
            split = split_from_documents(tokenizer, pairs, config, config.seed + 1, split_name=f"{name} source")
            result = evaluate(model, split, config, device, max_batches=math.ceil(len(split) / config.batch_size))
            shares[name] = {}
            for layer, stats in result.routing.items():
                counts = torch.tensor(stats["tokens_per_expert"], dtype=torch.float64)
                shares[name][layer] = (counts / counts.sum().clamp_min(1)).tolist()
    return shares


def specialisation_bits(shares: dict[str, dict[str, list[float]]], layer: str) -> float:
    """Mutual information, in bits, between the group (languages weighted equally) and the expert
    a token goes to at ``layer``: 0 when every language uses the experts alike, ``log2(groups)``
    when each language has experts of its own."""
    rows = torch.tensor([shares[g][layer] for g in shares], dtype=torch.float64)
    rows = rows / rows.sum(1, keepdim=True).clamp_min(1e-12)
    mean = rows.mean(0)
    ratio = torch.where(rows > 0, rows / mean.clamp_min(1e-12), torch.ones_like(rows))
    return float((rows * ratio.log2()).sum(1).mean())


def format_shares(shares: dict[str, dict[str, list[float]]]) -> str:
    """A table per layer: each group's share of tokens per expert, and the layer's specialisation."""
    groups = list(shares)
    layers = list(next(iter(shares.values()))) if shares else []
    lines = []
    for layer in layers:
        experts = len(shares[groups[0]][layer])
        lines.append(
            f"{layer}: language-expert mutual information {specialisation_bits(shares, layer):.3f} bits "
            f"(0: no specialisation, {math.log2(max(len(groups), 1)):.2f}: each language its own experts)"
        )
        lines.append("  " + " ".join(["lang".ljust(6)] + [f"e{e:<4d}" for e in range(experts)]))
        for group in groups:
            lines.append("  " + " ".join([group.ljust(6)] + [f"{s:5.1%}" for s in shares[group][layer]]))
    return "\n".join(lines)


def plot_shares(shares: dict[str, dict[str, list[float]]], out: Path) -> Path:
    """One heatmap per Switch layer: languages (rows) x experts (columns), colour = share of the
    language's tokens."""
    plt = _pyplot()
    groups = list(shares)
    layers = list(shares[groups[0]])
    columns = min(len(layers), 4)
    rows = math.ceil(len(layers) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 0.5 * len(groups) * rows + 1.6 * rows),
                             squeeze=False)  # fmt: skip
    for ax, layer in zip(axes.flat, layers):
        image = ax.imshow([shares[g][layer] for g in groups], cmap="viridis", aspect="auto", vmin=0)
        ax.set_title(f"{layer} ({specialisation_bits(shares, layer):.2f} bits)", fontsize=9)
        ax.set_yticks(range(len(groups)), groups)
        ax.set_xlabel("expert")
        fig.colorbar(image, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    fig.suptitle("share of each source language's tokens per expert (dropless routing)")
    return _save(fig, out)


def routing_by_language_report(
    source: str | Path, out_dir: Path, data: list[str] | None = None, device: str | None = None
) -> list[Path]:
    """``switchformer report RUN --by-language``: the run's model on its validation pairs (or the
    pairs of ``data``), grouped by source language; writes ``routing_by_language.png`` and
    ``routing_by_language.json`` (the shares and bits) into ``out_dir`` and returns their paths.
    Reads the run, writes nothing into it. Raises ``ValueError`` for a run that is not seq2seq or
    pairs without languages."""
    model, tokenizer, config = load_run(source)
    require_seq2seq(config, "--by-language")
    if not is_sparse(model.config.to_dict()):
        raise ValueError(f"{source}: the model has no Switch layer (a dense run); there is no routing to report")
    target = resolve_device(device)
    model.to(target)
    groups = group_by_source_language(evaluation_documents(config, data))
    if len(groups) < 2:
        raise ValueError(
            f"--by-language: the pairs hold one source language ({', '.join(groups)}); the report compares how "
            "two or more languages use the experts (a multilingual run, or --data with several languages)"
        )
    shares = expert_shares(model, tokenizer, config, groups, target)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = list(next(iter(shares.values())))
    summary = {
        "run": str(source),
        "data": list(data) if data else "validation split",
        "pairs": {lang: len(pairs) for lang, pairs in groups.items()},
        "routing": "dropless (each token's top-1 expert; no capacity limit)",
        "specialisation_bits": {layer: specialisation_bits(shares, layer) for layer in layers},
        "shares": shares,
    }
    json_path = out_dir / "routing_by_language.json"
    write_json_atomic(json_path, summary)
    print(format_shares(shares))
    return [plot_shares(shares, out_dir / "routing_by_language.png"), json_path]
