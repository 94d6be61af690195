"""Turning a training config into tokenised, batched tensors, deterministically."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from switchformer.data.corpus import embedded_documents, split_documents
from switchformer.data.files import DataError, load_pairs, load_text
from switchformer.data.formatting import source_text
from switchformer.data.objectives import (
    epoch_order,
    pack_causal,
    pad_batch,
    span_corruption,
    span_corruption_lengths,
)
from switchformer.data.tokenizer import load_tokenizer, save_tokenizer, sentinel_ids, special_ids, train_tokenizer
from switchformer.train.config import TrainConfig

log = logging.getLogger("switchformer")


@dataclass
class Split:
    """Rows of one split: ``input_ids`` always; ``labels`` and ``attention_mask`` for seq2seq."""

    tensors: dict[str, Tensor]

    def __len__(self) -> int:
        return self.tensors["input_ids"].shape[0]

    def rows(self, index: Tensor) -> dict[str, Tensor]:
        return {k: v.index_select(0, index) for k, v in self.tensors.items()}

    def num_tokens(self) -> int:
        ids = self.tensors["input_ids"]
        mask = self.tensors.get("attention_mask")
        return int(mask.sum()) if mask is not None else ids.numel()


@dataclass
class Data:
    train: Split
    valid: Split
    tokenizer: object
    vocab_size: int

    def batch(self, config: TrainConfig, step: int, micro: int, rank: int = 0, world: int = 1) -> dict[str, Tensor]:
        """This rank's share of the micro-batch of a global step: a pure function of (seed, step,
        micro, rank), so a resumed run sees exactly the batches an uninterrupted one would, and
        ``world`` ranks together see what one process with ``world`` times the batch sees."""
        n = len(self.train)
        start = ((step * config.grad_accum + micro) * world + rank) * config.batch_size
        picks = []
        for j in range(start, start + config.batch_size):
            epoch, position = divmod(j, n)
            picks.append(int(_cached_order(n, config.seed, epoch)[position]))
        return self.train.rows(torch.tensor(picks))


_ORDERS: dict[tuple[int, int, int], Tensor] = {}


def _cached_order(n: int, seed: int, epoch: int) -> Tensor:
    key = (n, seed, epoch)
    if key not in _ORDERS:
        _ORDERS.clear()  # only the current epoch is ever needed
        _ORDERS[key] = epoch_order(n, seed, epoch)
    return _ORDERS[key]


def _documents(config: TrainConfig) -> tuple[list, list]:
    if config.resolved_objective == "seq2seq":
        if not config.data:
            raise DataError("data: the seq2seq objective needs JSONL files with 'source' and 'target' fields")
        pairs = load_pairs(config.data)
        cut = max(1, int(len(pairs) * config.validation_fraction))
        if len(pairs) < 2:
            raise DataError(f"data: {len(pairs)} pair(s) are too few to split into training and validation")
        return pairs[cut:], pairs[:cut]
    if config.data:
        docs = load_text(config.data)
        if len(docs) == 1:  # one file: split its text by lines at the validation fraction
            lines = docs[0].splitlines()
            cut = max(1, int(len(lines) * (1 - config.validation_fraction)))
            return ["\n".join(lines[:cut])], ["\n".join(lines[cut:]) or lines[-1]]
        cut = max(1, int(len(docs) * config.validation_fraction))
        return docs[cut:], docs[:cut]
    return split_documents(embedded_documents(config.corpus, config.corpus_max_mb), config.validation_fraction)


# Tokenizers are trained on at most this much text (the first documents, in the corpus's order):
# byte-level BPE merges settle long before, and hundreds of MB would take minutes to count.
TOKENIZER_SAMPLE_CHARS = 32_000_000


def tokenizer_sample(texts: list[str], limit: int = TOKENIZER_SAMPLE_CHARS) -> list[str]:
    """The leading texts up to ``limit`` characters (at least one text)."""
    sample, total = [], 0
    for text in texts:
        if sample and total + len(text) > limit:
            break
        sample.append(text)
        total += len(text)
    return sample


def prepare_data(config: TrainConfig, run_dir: Path) -> Data:
    train_docs, valid_docs = _documents(config)
    tokenizer_file = run_dir / "tokenizer.json"
    if tokenizer_file.exists():
        tok = load_tokenizer(tokenizer_file)
    elif config.tokenizer:
        tok = load_tokenizer(config.tokenizer)
        save_tokenizer(tok, tokenizer_file)
    else:
        texts = [t for pair in train_docs for t in pair] if config.resolved_objective == "seq2seq" else train_docs
        log.info(
            "training a %s tokenizer with %d tokens on the training text", config.tokenizer_kind, config.vocab_size
        )
        tok = train_tokenizer(tokenizer_sample(texts), config.vocab_size, config.tokenizer_kind)
        save_tokenizer(tok, tokenizer_file)
    train = split_from_documents(tok, train_docs, config, config.seed, tokenizer_file)
    valid = split_from_documents(tok, valid_docs, config, config.seed + 1, tokenizer_file)
    log.info("data: %d training and %d validation rows (%s)", len(train), len(valid), config.resolved_objective)
    return Data(train, valid, tok, tok.get_vocab_size())


def split_from_documents(tok, docs: list, config: TrainConfig, seed: int, tokenizer_name="tokenizer") -> Split:
    """Rows of ``config``'s objective made of ``docs`` (texts, or (source, target) pairs for
    seq2seq) with tokenizer ``tok``; ``seed`` draws the noise spans of span corruption."""
    ids = special_ids(tok)
    if ids["eos"] is None or ids["pad"] is None:
        raise DataError(f"{tokenizer_name}: the tokenizer needs '<pad>' and '</s>' tokens")
    objective = config.resolved_objective
    if objective == "causal":
        return Split({"input_ids": pack_causal(_encode(tok, docs), config.seq_len, ids["eos"])})
    if objective == "span_corruption":
        return _span_corruption_split(tok, docs, config, ids, seed)
    return _pairs_split(tok, docs, config, ids)


def evaluation_split(config: TrainConfig, tok, data: list[str] | None = None) -> Split:
    """What ``eval`` scores, reading only: the run's validation split (the same rows training
    evaluated), or every document of the files ``data`` (a user's test set), in ``config``'s
    objective."""
    if not data:
        return split_from_documents(tok, _documents(config)[1], config, config.seed + 1)
    docs = load_pairs(data) if config.resolved_objective == "seq2seq" else load_text(data)
    if not docs:
        raise DataError(f"data: {data} hold no documents")
    return split_from_documents(tok, docs, config, config.seed + 1)


def encoder_text(pair, config: TrainConfig) -> str:
    """The encoder input text of ``pair`` (a :class:`~switchformer.data.formatting.Pair` or a
    ``(source, target)`` tuple) under ``config``'s ``source_prefix``: the pair's own languages, else
    the config's ``source_lang``/``target_lang``. The one formatting training and inference share."""
    source_lang = getattr(pair, "source_lang", None) or config.source_lang
    target_lang = getattr(pair, "target_lang", None) or config.target_lang
    return source_text(pair[0], config.source_prefix, source_lang, target_lang)


def _encode(tok, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts)]


def _span_corruption_split(tok, docs, config: TrainConfig, ids, seed: int) -> Split:
    sentinels = sentinel_ids(tok)
    if not sentinels:
        raise DataError("tokenizer: span corruption needs sentinel tokens <extra_id_0>, <extra_id_1>, ...")
    raw = config.seq_len
    while span_corruption_lengths(raw)[0] > config.seq_len:
        raw -= 1
    target_len = span_corruption_lengths(raw)[1]
    stream = [t for doc in _encode(tok, docs) for t in (*doc, ids["eos"])]
    chunks = [stream[i : i + raw] for i in range(0, len(stream) - raw + 1, raw)]
    if not chunks:
        raise DataError(f"data: {len(stream)} tokens cannot fill one span-corruption example of {raw}")
    g = torch.Generator().manual_seed(seed)
    sources, targets = zip(*(span_corruption(c, sentinels, ids["eos"], g) for c in chunks))
    return Split(
        {
            "input_ids": pad_batch(list(sources), ids["pad"], config.seq_len),
            "attention_mask": pad_batch([[1] * len(s) for s in sources], 0, config.seq_len),
            "labels": pad_batch(list(targets), ids["pad"], target_len + 1, value=-100),
        }
    )


def _pairs_split(tok, pairs, config: TrainConfig, ids) -> Split:
    texts = [encoder_text(pair, config) for pair in pairs]
    sources = [s[: config.seq_len - 1] + [ids["eos"]] for s in _encode(tok, texts)]
    targets = [t[: config.seq_len - 1] + [ids["eos"]] for t in _encode(tok, [p[1] for p in pairs])]
    return Split(
        {
            "input_ids": pad_batch(sources, ids["pad"]),
            "attention_mask": pad_batch([[1] * len(s) for s in sources], 0),
            "labels": pad_batch(targets, ids["pad"], value=-100),
        }
    )
