"""Training objectives: packed causal LM sequences, T5 span corruption, supervised pairs.

All are plain functions from token ids to tensors, deterministic given their ``numpy``-free
``torch.Generator``, so a data position plus a seed reproduces every batch exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pack_causal(documents: list[list[int]], seq_len: int, eos_id: int) -> Tensor:
    """Concatenate documents, each followed by EOS, and cut into rows of ``seq_len + 1`` tokens
    (inputs are ``row[:-1]``, targets ``row[1:]``; the model shifts inside, so rows are used whole)."""
    # one tensor per document, then one concatenation: a flat Python list of every token would
    # cost ~36 bytes a token (gigabytes at GPU-scale corpora)
    if seq_len < 1:
        raise ValueError(f"seq_len: must be >= 1, got {seq_len}")
    eos = torch.tensor([eos_id], dtype=torch.long)
    pieces = [part for doc in documents for part in (torch.tensor(doc, dtype=torch.long), eos)]
    stream = torch.cat(pieces) if pieces else eos.new_zeros(0)
    rows = stream.numel() // seq_len
    if rows < 1:
        raise ValueError(f"seq_len: {stream.numel()} tokens cannot fill one sequence of {seq_len}")
    return stream[: rows * seq_len].view(rows, seq_len).clone()


def noise_span_counts(length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """``(noise tokens, noise spans)`` that span corruption makes of ``length`` tokens (T5's
    ``random_spans_noise_mask``): ``round(length * noise_density)`` noise tokens, at least one and at
    least one kept, in ``round(noise / mean_span)`` spans, at least one and no more than the kept
    tokens can separate. Fewer than two tokens cannot hold both: no noise, ``(0, 0)``.

    The one place these clamps live: :func:`random_spans` and :func:`span_corruption_lengths`
    both read them, so predicted and produced lengths always agree.

    Raises ``ValueError`` naming ``length``, ``noise_density`` or ``mean_span`` when out of range."""
    if length < 0:
        raise ValueError(f"length: must be >= 0, got {length}")
    if not 0 < noise_density < 1:
        raise ValueError(f"noise_density: must be in (0, 1), got {noise_density}")
    if not mean_span > 0:
        raise ValueError(f"mean_span: must be > 0, got {mean_span}")
    if length < 2:
        return 0, 0
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)
    return num_noise, min(num_spans, num_noise, length - num_noise)


def random_spans(length: int, noise_density: float, mean_span: float, generator: torch.Generator) -> Tensor:
    """Bool mask of ``length`` (True = noise) with the noise tokens and spans of
    :func:`noise_span_counts`, noise spans interleaved with kept spans, each span at least one token."""
    num_noise, num_spans = noise_span_counts(length, noise_density, mean_span)
    if num_spans == 0:
        return torch.zeros(length, dtype=torch.bool)

    def segment(total: int, parts: int) -> list[int]:
        # a random composition of `total` into `parts` positive integers
        cuts = torch.randperm(total - 1, generator=generator)[: parts - 1].add(1).sort().values.tolist()
        bounds = [0, *cuts, total]
        return [b - a for a, b in zip(bounds[:-1], bounds[1:])]

    noise_lengths = segment(num_noise, num_spans)
    keep_lengths = segment(length - num_noise, num_spans)
    mask = []
    for keep, noise in zip(keep_lengths, noise_lengths):
        mask += [False] * keep + [True] * noise
    return torch.tensor(mask, dtype=torch.bool)


def span_corruption(
    tokens: list[int],
    sentinels: list[int],
    eos_id: int,
    generator: torch.Generator,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
) -> tuple[list[int], list[int]]:
    """T5's objective: each noise span in the input becomes one sentinel; the target lists each
    sentinel followed by the tokens it replaced, then EOS. A document of fewer than two tokens has
    no noise: source = the tokens + EOS, target = EOS alone."""
    mask = random_spans(len(tokens), noise_density, mean_span, generator).tolist()
    source, target = [], []
    span = -1
    for i, (token, noisy) in enumerate(zip(tokens, mask)):
        if noisy:
            if i == 0 or not mask[i - 1]:
                span += 1
                if span >= len(sentinels):
                    raise ValueError(f"sentinels: {len(sentinels)} are too few for the noise spans of this sequence")
                source.append(sentinels[span])
                target.append(sentinels[span])
            target.append(token)
        else:
            source.append(token)
    return source + [eos_id], target + [eos_id]


def span_corruption_lengths(input_len: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """Encoder and decoder lengths (EOS included) that :func:`span_corruption` makes of a chunk of
    ``input_len`` tokens: exactly, for every length (the counts come from :func:`noise_span_counts`)."""
    noise, spans = noise_span_counts(input_len, noise_density, mean_span)
    return input_len - noise + spans + 1, noise + spans + 1


def pad_batch(rows: list[list[int]], pad_id: int, width: int | None = None, value: int | None = None) -> Tensor:
    width = width or max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id if value is None else value, dtype=torch.long)
    for i, row in enumerate(rows):
        row = row[:width]
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def epoch_order(num_items: int, seed: int, epoch: int) -> Tensor:
    """The shuffled order of one epoch: a function of (seed, epoch) only, so resuming is exact."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=g)


def length_bucketed(order: Tensor, lengths: Tensor, batch_size: int, pool: int, phase: int, seed: int, epoch: int):
    """``order`` (an epoch's shuffled rows) regrouped so that each batch holds rows of similar
    length, the standard bucketing of translation toolkits: windows of ``pool`` positions (a
    multiple of ``batch_size``) are sorted by ``lengths``, cut into batches, and each window's
    batches shuffled, so batch lengths still come in random order. ``phase``: where the epoch's
    first whole batch starts (the batches of consecutive epochs run on without a gap), so that
    every batch is one sorted block. A function of its arguments only: resuming stays exact.

    Padding falls from a random batch's longest row to about its own length: measured on
    Multi30k with 64 pairs a batch, a step's tokens (padding included) fall by 44% (benchmarks/bucketing.py)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_919)  # a stream of its own
    out = order.clone()
    for start in range(phase, len(order), pool):
        window = order[start : start + pool]
        window = window[torch.argsort(lengths[window], stable=True)]
        whole = len(window) // batch_size
        if whole > 1:
            blocks = window[: whole * batch_size].view(whole, batch_size)[torch.randperm(whole, generator=g)]
            window = torch.cat([blocks.reshape(-1), window[whole * batch_size :]])
        out[start : start + len(window)] = window
    return out
