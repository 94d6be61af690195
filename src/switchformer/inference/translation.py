"""Batched translation with a seq2seq run: each source formatted exactly as training formatted it,
batched by length, decoded greedily or with beam search, returned in input order.

Formatting: :func:`switchformer.train.data.encoder_text` (the run's ``source_prefix`` with the
pair's languages, then the text), tokenised, cut to ``seq_len - 1`` tokens and ended with EOS, as
the training rows were (``_pairs_split`` in :mod:`switchformer.train.data`; a test holds the two
equal). No sentinel is added: that is span corruption's convention, not seq2seq's.

Batching (as fairseq's ``interactive``): up to ``buffer_size`` sources are read, sorted by length
(longest first, so similar lengths share a batch and little padding is computed), decoded
``batch_size`` at a time, and the buffer's translations are yielded in input order before the next
buffer is read.

Batched and one-by-one decoding give the same tokens whenever no token is dropped by expert
capacity: with ``routing="dropless"``, with a per-sequence ``expert_capacity`` (Hugging Face
imports), or while no expert overflows. Under a capacity *factor* (the run's ``eval`` routing), a
batch's tokens share one routing group, so which tokens overflow can depend on the other sentences
of the batch, as in the validation loss training reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from switchformer.data.formatting import Pair, encoder_text
from switchformer.data.tokenizer import special_ids
from switchformer.inference.beam import check_beam_arguments
from switchformer.inference.routing import routing_description
from switchformer.inference.sampling import check_no_repeat_ngram_size

DEFAULT_BATCH_SIZE = 32
DEFAULT_BUFFER_SIZE = 1024
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines() splits on


def require_seq2seq(config, what: str = "translate") -> None:
    """``ValueError`` naming the run's objective unless it is ``seq2seq``."""
    objective = config.resolved_objective
    if objective != "seq2seq":
        raise ValueError(
            f"objective: the run was trained with {objective!r}; {what} needs a seq2seq run "
            "(train one with --model t5 --set objective=seq2seq on source/target pairs)"
        )


def one_line(text: str) -> str:
    """``text`` with every line break (any that ``str.splitlines`` knows) replaced by a space, so
    one translation is always one output line."""
    return text.translate({ord(c): " " for c in LINE_BREAKS})


def _as_pair(item, source_lang: str | None, target_lang: str | None) -> Pair:
    if isinstance(item, str):
        return Pair(item, "", source_lang, target_lang)
    pair_source_lang = getattr(item, "source_lang", None)
    pair_target_lang = getattr(item, "target_lang", None)
    return Pair(item[0], "", pair_source_lang or source_lang, pair_target_lang or target_lang)


def check_languages(config, source_lang: str | None = None, target_lang: str | None = None) -> None:
    """``ValueError`` naming the flag when a language given contradicts the run: a source language
    the run was not trained on (its ``source_lang``, one code or a list), a target language other
    than the run's ``target_lang``; or (naming ``source_prefix`` and the flag to give) when the
    run's prefix names a language that neither the call nor the run's config gives."""
    trained = [code for code in (config.source_lang or "").split(",") if code]
    if source_lang is not None and trained and source_lang not in trained:
        raise ValueError(
            f"--source-lang: the run was trained on source language(s) {','.join(trained)}, not {source_lang!r}"
        )
    if target_lang is not None and config.target_lang and target_lang != config.target_lang:
        raise ValueError(
            f"--target-lang: the run translates into {config.target_lang!r}; it cannot translate into {target_lang!r}"
        )
    encoder_text(Pair("", "", source_lang, target_lang), config)


def encode_sources(
    tokenizer, config, items: list, source_lang=None, target_lang=None, cut: list[int] | None = None
) -> list[list[int]]:
    """Encoder token ids of each source (a ``str``, or a :class:`Pair` whose own languages win over
    ``source_lang``/``target_lang``, which win over the run's): formatted, cut to ``seq_len - 1``
    tokens, EOS appended, as the training rows."""
    eos = special_ids(tokenizer)["eos"]
    if eos is None:
        raise ValueError("tokenizer: no '</s>' token to end the source with")
    texts = [encoder_text(_as_pair(item, source_lang, target_lang), config) for item in items]
    encoded = tokenizer.encode_batch(texts)
    if cut is not None:  # how many sources were longer than training's rows and were cut, as training cut them
        cut.append(sum(len(e.ids) > config.seq_len - 1 for e in encoded))
    return [e.ids[: config.seq_len - 1] + [eos] for e in encoded]


def decode_output(tokenizer, row: list[int], eos: int | None) -> str:
    """Text of one generated row (without the decoder start token): up to its first EOS, special
    tokens skipped, on one line."""
    if eos is not None and eos in row:
        row = row[: row.index(eos)]
    return one_line(tokenizer.decode(row, skip_special_tokens=True))


def decoding_settings(
    config, num_beams=None, length_penalty=None, max_new_tokens=None, no_repeat_ngram_size=None
) -> dict:
    """The decoding settings actually used: each given value, else the run's (``num_beams``,
    ``length_penalty``, ``no_repeat_ngram_size``; ``max_new_tokens``: the run's ``seq_len``)."""
    return {
        "num_beams": config.num_beams if num_beams is None else num_beams,
        "length_penalty": config.length_penalty if length_penalty is None else length_penalty,
        "max_new_tokens": config.seq_len if max_new_tokens is None else max_new_tokens,
        "no_repeat_ngram_size": config.no_repeat_ngram_size if no_repeat_ngram_size is None else no_repeat_ngram_size,
    }


def check_settings(settings: dict, batch_size: int = 1, buffer_size: int = 1) -> None:
    """``ValueError`` naming the first bad setting of a :func:`decoding_settings` dict, or of
    ``batch_size`` and ``buffer_size``."""
    sizes = (("batch_size", batch_size), ("max_new_tokens", settings["max_new_tokens"]), ("buffer_size", buffer_size))
    for name, value in sizes:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    check_beam_arguments(settings["num_beams"], settings["length_penalty"], False)
    check_no_repeat_ngram_size(settings["no_repeat_ngram_size"])


def translate(
    model,
    tokenizer,
    config,
    texts: Iterable,
    *,
    source_lang: str | None = None,
    target_lang: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    max_new_tokens: int | None = None,
    no_repeat_ngram_size: int | None = None,
    routing: str = "eval",
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    progress: Callable[[int], None] | None = None,
    truncated: list[int] | None = None,
) -> Iterator[str]:
    """Translations of ``texts``, one string (one line) per source, in input order.

    ``texts``: strings, or :class:`~switchformer.data.formatting.Pair` (their own languages win, for
    a multilingual prefix). ``source_lang``/``target_lang``: the languages of every string source
    (default: the run's ``source_lang``/``target_lang``), needed when the run's ``source_prefix``
    names them. ``num_beams`` (1: greedy), ``length_penalty``, ``no_repeat_ngram_size`` (0: off;
    else no n-gram of that many tokens occurs twice in a translation): default the run's;
    ``max_new_tokens``: default the run's ``seq_len``. A source that is empty or only whitespace is
    not decoded: its translation is ``""``. ``progress(n)`` is called after each batch of ``n``
    sources (empty ones included). ``truncated``: a list that gets, per buffer, how many sources
    were longer than ``seq_len - 1`` tokens and were cut (as training cut them).

    Raises ``ValueError`` naming the setting, at the call (before ``texts`` is read), for a run
    whose objective is not seq2seq or a bad decoding setting; and, while iterating, for a language
    the prefix needs and nobody gives (at the first such source; :func:`check_languages` checks
    string sources up front)."""
    require_seq2seq(config)
    settings = decoding_settings(config, num_beams, length_penalty, max_new_tokens, no_repeat_ngram_size)
    check_settings(settings, batch_size, buffer_size)
    routing_description(model, routing)  # an unknown routing is named before any work
    decode = _Decoding(model, tokenizer, config, source_lang, target_lang, batch_size, settings, routing, progress)
    if truncated is not None:
        decode.cut = truncated
    return _stream(decode, texts, buffer_size)


class _Decoding:
    """What every buffer of one :func:`translate` call is decoded with."""

    def __init__(self, model, tokenizer, config, source_lang, target_lang, batch_size, settings, routing, progress):

        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.source_lang, self.target_lang = source_lang, target_lang
        self.batch_size, self.settings, self.routing, self.progress = batch_size, settings, routing, progress
        self.eos = special_ids(tokenizer)["eos"]
        self.cut: list[int] = []  # per buffer: sources longer than seq_len - 1 tokens, cut
        self.device = next(model.parameters()).device


def _stream(decode: _Decoding, texts: Iterable, buffer_size: int) -> Iterator[str]:
    buffer: list = []
    for item in texts:
        buffer.append(item)
        if len(buffer) == buffer_size:
            yield from _translate_buffer(decode, buffer)
            buffer = []
    if buffer:
        yield from _translate_buffer(decode, buffer)


def _translate_buffer(decode: _Decoding, items: list) -> list[str]:
    """Translations of ``items`` in their order: the non-blank ones encoded, sorted by length
    (longest first; equal lengths keep their order) and decoded ``batch_size`` at a time."""
    out = [""] * len(items)
    keep = [i for i, item in enumerate(items) if (item if isinstance(item, str) else item[0]).strip()]
    if len(keep) < len(items) and decode.progress is not None:
        decode.progress(len(items) - len(keep))
    sources = [items[i] for i in keep]
    ids = encode_sources(
        decode.tokenizer, decode.config, sources, decode.source_lang, decode.target_lang, cut=decode.cut
    )
    order = sorted(range(len(keep)), key=lambda j: -len(ids[j]))
    pad = decode.model.config.pad_token_id
    settings = decode.settings
    for start in range(0, len(order), decode.batch_size):
        chosen = order[start : start + decode.batch_size]
        rows = [ids[j] for j in chosen]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        generated = decode.model.generate(
            input_ids.to(decode.device),
            mask.to(decode.device),
            max_new_tokens=settings["max_new_tokens"],
            num_beams=settings["num_beams"],
            length_penalty=settings["length_penalty"],
            no_repeat_ngram_size=settings["no_repeat_ngram_size"],
            do_sample=False,
            routing=decode.routing,
        )
        for j, row in zip(chosen, generated[:, 1:].tolist()):
            out[keep[j]] = decode_output(decode.tokenizer, row, decode.eos)
        if decode.progress is not None:
            decode.progress(len(chosen))
    return out
