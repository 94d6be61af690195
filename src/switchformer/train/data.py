"""Turning a training config into tokenised, batched tensors, deterministically."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from switchformer.data.chat import encode_chat, prompt_messages, render_chat
from switchformer.data.corpus import embedded_documents, split_documents
from switchformer.data.files import DataError, lines
from switchformer.data.formatting import encoder_text
from switchformer.data.loaders import load_conversations, load_text
from switchformer.data.objectives import (
    epoch_order,
    length_bucketed,
    pack_causal,
    pad_batch,
    span_corruption,
    span_corruption_lengths,
)
from switchformer.data.pairs import load_pairs
from switchformer.data.tokenizer import load_tokenizer, save_tokenizer, sentinel_ids, special_ids, train_tokenizer
from switchformer.train.config import TrainConfig

log = logging.getLogger("switchformer")


@dataclass
class Split:
    """Rows of one split: ``input_ids`` always; ``labels`` and ``attention_mask`` for seq2seq and
    chat. For seq2seq, how many source and target sides were longer than ``seq_len`` tokens (EOS
    included) and cut to it; for chat, how many conversations were. ``aligned_labels``: ``labels``
    are position by position those of ``input_ids`` (chat: the ids themselves where scored, -100
    elsewhere; the model shifts them), not a separate target sequence."""

    tensors: dict[str, Tensor]
    truncated_sources: int = 0
    truncated_targets: int = 0
    truncated_conversations: int = 0
    aligned_labels: bool = False

    def __len__(self) -> int:
        return self.tensors["input_ids"].shape[0]

    def rows(self, index: Tensor) -> dict[str, Tensor]:
        """The rows ``index``, padded only as far as their own longest source and target: a
        split's rows are padded to its longest row, and a batch of short sentences must not pay
        for it (the loss is the same: padding is masked and takes no expert capacity)."""
        rows = {k: v.index_select(0, index) for k, v in self.tensors.items()}
        if "attention_mask" in rows:  # real tokens are a prefix of each row
            width = max(int(rows["attention_mask"].sum(1).max()), 1)
            rows["input_ids"], rows["attention_mask"] = rows["input_ids"][:, :width], rows["attention_mask"][:, :width]
            if self.aligned_labels:  # chat: labels go with the input positions
                rows["labels"] = rows["labels"][:, :width]
        if "labels" in rows and not self.aligned_labels:
            width = max(int((rows["labels"] != -100).sum(1).max()), 1)
            rows["labels"] = rows["labels"][:, :width]
        return rows

    def lengths(self) -> Tensor:
        """Each row's real tokens (source and target; a text row's own length), cached."""
        if getattr(self, "_lengths", None) is None:
            mask = self.tensors.get("attention_mask")
            ids = self.tensors["input_ids"]
            lengths = mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])
            if "labels" in self.tensors and not self.aligned_labels:
                lengths = lengths + (self.tensors["labels"] != -100).sum(1)
            self._lengths = lengths
        return self._lengths

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
    sample_pair: object = None  # seq2seq: the first validation pair, which the end-of-run sample translates
    # seq2seq: (source languages in first-seen order, the one target language) of the training
    # pairs, when every pair says them; else None
    languages: tuple = (None, None)
    # chat: the messages before the first answer of the first validation conversation, which the
    # end-of-run sample answers
    sample_messages: list | None = None

    def batch(self, config: TrainConfig, step: int, micro: int, rank: int = 0, world: int = 1) -> dict[str, Tensor]:
        """This rank's share of the micro-batch of a global step: a pure function of (seed, step,
        micro, rank), so a resumed run sees exactly the batches an uninterrupted one would, and
        ``world`` ranks together see what one process with ``world`` times the batch sees."""
        n = len(self.train)
        start = ((step * config.grad_accum + micro) * world + rank) * config.batch_size
        lengths = self.train.lengths() if config.bucket_by_length else None
        picks = []
        for j in range(start, start + config.batch_size):
            epoch, position = divmod(j, n)
            picks.append(int(_cached_order(n, config.seed, epoch, lengths, config.batch_size)[position]))
        return self.train.rows(torch.tensor(picks))


_ORDERS: dict[tuple, Tensor] = {}
BUCKET_POOL_BATCHES = 50  # bucket_by_length sorts windows of this many batches


def _cached_order(n: int, seed: int, epoch: int, lengths: Tensor | None = None, batch_size: int = 1) -> Tensor:
    key = (n, seed, epoch, None if lengths is None else (id(lengths), batch_size))
    if key not in _ORDERS:
        _ORDERS.clear()  # only the current epoch is ever needed
        order = epoch_order(n, seed, epoch)
        if lengths is not None:  # batches j * batch_size ... run on across epochs: where this one's start
            phase = (-epoch * n) % batch_size
            order = length_bucketed(order, lengths, batch_size, BUCKET_POOL_BATCHES * batch_size, phase, seed, epoch)
        _ORDERS[key] = order
    return _ORDERS[key]


def _documents(config: TrainConfig) -> tuple[list, list]:
    """(training, validation) documents: texts, sentence pairs for seq2seq, or conversations
    (:class:`~switchformer.data.chat.Conversation`) for chat. The validation documents are the
    files of ``valid_data`` when given (all of ``data`` then trains), else carved from ``data``: the
    first ``validation_fraction`` of the pairs, conversations or files (the last lines of a single
    text file), or the hash split of the embedded corpus."""
    if config.valid_data:
        return _all_documents(config), _valid_documents(config)
    return _carved_documents(config)


def _validation_documents(config: TrainConfig) -> list:
    """The validation documents of :func:`_documents` (reading only ``valid_data`` when given)."""
    return _valid_documents(config) if config.valid_data else _carved_documents(config)[1]


def _read_pairs(config: TrainConfig, paths: list[str], label: str, require_every_language: bool) -> list:
    return load_pairs(
        paths, config.source_lang, config.target_lang, label=label, require_every_language=require_every_language
    )


def _all_documents(config: TrainConfig) -> list:
    if config.resolved_objective == "chat":
        if not config.data:
            raise DataError(
                "data: the chat objective needs conversations: JSONL files with a 'messages' list a line "
                '({"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]})'
            )
        return load_conversations(config.data)
    if config.resolved_objective == "seq2seq":
        if not config.data:
            raise DataError(
                "data: the seq2seq objective needs sentence pairs: .jsonl ('source'/'target'), .tsv, or line-aligned "
                "text files (train.de train.en)"
            )
        return _read_pairs(config, config.data, "--data", True)
    if config.data:
        return load_text(config.data)
    return [doc.text for doc in embedded_documents(config.corpus, config.corpus_max_mb)]


def _valid_documents(config: TrainConfig) -> list:
    if config.resolved_objective == "chat":
        return load_conversations(config.valid_data)
    if config.resolved_objective == "seq2seq":
        return _read_pairs(config, config.valid_data, "--valid", False)
    return load_text(config.valid_data)


def _carved_documents(config: TrainConfig) -> tuple[list, list]:
    if config.resolved_objective in ("seq2seq", "chat"):  # the first validation_fraction of the pairs
        pairs = _all_documents(config)
        cut = max(1, int(len(pairs) * config.validation_fraction))
        if len(pairs) < 2:
            what = "conversation(s)" if config.resolved_objective == "chat" else "pair(s)"
            raise DataError(f"data: {len(pairs)} {what} are too few to split into training and validation")
        return pairs[cut:], pairs[:cut]
    if config.data:
        docs = load_text(config.data)
        if len(docs) == 1:  # one file: split its text by lines at the validation fraction
            rows = lines(docs[0])  # the line rule every reader uses
            cut = max(1, int(len(rows) * (1 - config.validation_fraction)))
            return ["\n".join(rows[:cut])], ["\n".join(rows[cut:]) or rows[-1]]
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
        seq2seq = config.resolved_objective == "seq2seq"
        texts = [t for pair in train_docs for t in pair[:2]] if seq2seq else train_docs
        if config.resolved_objective == "chat":  # the role markers are plain text the tokenizer learns
            texts = [render_chat(conversation.messages, False) for conversation in train_docs]
        log.info(
            "training a %s tokenizer with %d tokens on the training text", config.tokenizer_kind, config.vocab_size
        )
        tok = train_tokenizer(tokenizer_sample(texts), config.vocab_size, config.tokenizer_kind)
        save_tokenizer(tok, tokenizer_file)
    train = split_from_documents(tok, train_docs, config, config.seed, tokenizer_file, "training")
    valid = split_from_documents(tok, valid_docs, config, config.seed + 1, tokenizer_file, "validation")
    log.info("data: %d training and %d validation rows (%s)", len(train), len(valid), config.resolved_objective)
    seq2seq = config.resolved_objective == "seq2seq"
    sample_pair = valid_docs[0] if seq2seq and valid_docs else None
    languages = pair_languages(train_docs) if seq2seq else (None, None)
    sample_messages = chat_sample_messages(tok, valid_docs, config) if config.resolved_objective == "chat" else None
    return Data(train, valid, tok, tok.get_vocab_size(), sample_pair, languages, sample_messages)


def chat_sample_messages(tok, conversations: list, config: TrainConfig) -> list[dict] | None:
    """The prompt the end-of-run sample of a chat run answers: the messages before the first answer
    of the first validation conversation that has some and whose prompt fits in ``seq_len`` tokens
    (None when none does)."""
    for conversation in conversations:
        messages = prompt_messages(conversation.messages)
        if messages and len(encode_chat(tok, messages, True)[0]) <= config.seq_len:
            return messages
    return None


def pair_languages(pairs: list) -> tuple[list[str] | None, str | None]:
    """(source languages in first-seen order, target language) of ``pairs``: each ``None`` unless
    every pair says it (and, for the target, all say the same one)."""
    sources = [getattr(p, "source_lang", None) for p in pairs]
    targets = {getattr(p, "target_lang", None) for p in pairs}
    source_langs = list(dict.fromkeys(sources)) if sources and all(sources) else None
    target = next(iter(targets)) if len(targets) == 1 and None not in targets else None
    if source_langs and target in source_langs:  # a pair set that also translates into its sources
        return None, None
    return source_langs, target


def split_from_documents(
    tok, docs: list, config: TrainConfig, seed: int, tokenizer_name="tokenizer", split_name: str = "data"
) -> Split:
    """Rows of ``config``'s objective made of ``docs`` (texts, (source, target) pairs for seq2seq,
    conversations for chat) with tokenizer ``tok``; ``seed`` draws the noise spans of span corruption.
    ``split_name`` names the split in the truncation warning."""
    ids = special_ids(tok)
    if ids["eos"] is None or ids["pad"] is None:
        raise DataError(f"{tokenizer_name}: the tokenizer needs '<pad>' and '</s>' tokens")
    objective = config.resolved_objective
    if objective == "causal":
        return Split({"input_ids": pack_causal(_encode(tok, docs), config.seq_len, ids["eos"])})
    if objective == "span_corruption":
        return _span_corruption_split(tok, docs, config, ids, seed)
    if objective == "chat":
        return _chat_split(tok, docs, config, ids, split_name)
    return _pairs_split(tok, docs, config, ids, split_name)


def evaluation_documents(config: TrainConfig, data: list[str] | None = None) -> list:
    """The documents ``eval`` scores, reading only: the run's validation documents (``valid_data``,
    or those carved from ``data``: what training evaluated), or every document of the files ``data``
    (a user's test set, read with the run's languages). Texts, sentence pairs for seq2seq, or
    conversations for chat."""
    if not data:
        return _validation_documents(config)
    seq2seq = config.resolved_objective == "seq2seq"
    if config.resolved_objective == "chat":
        docs = load_conversations(data)
    else:
        docs = _read_pairs(config, data, "--data", False) if seq2seq else load_text(data)
    if not docs:
        raise DataError(f"data: {data} hold no documents")
    return docs


def evaluation_split(config: TrainConfig, tok, data: list[str] | None = None, docs: list | None = None) -> Split:
    """What ``eval`` scores (:func:`evaluation_documents`, or ``docs`` when the caller has read
    them already) as rows of ``config``'s objective: the same rows training evaluated when ``data``
    is not given."""
    docs = evaluation_documents(config, data) if docs is None else docs
    return split_from_documents(tok, docs, config, config.seed + 1, split_name="evaluation" if data else "validation")


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


def _pairs_split(tok, pairs, config: TrainConfig, ids, split_name: str = "data") -> Split:
    """Each side cut to ``seq_len`` tokens with its EOS (longer sides are counted, and reported)."""
    limit = config.seq_len - 1  # tokens before EOS
    encoded_sources = _encode(tok, [encoder_text(pair, config) for pair in pairs])
    encoded_targets = _encode(tok, [p[1] for p in pairs])
    sources = [s[:limit] + [ids["eos"]] for s in encoded_sources]
    targets = [t[:limit] + [ids["eos"]] for t in encoded_targets]
    long_sources = sum(len(s) > limit for s in encoded_sources)
    long_targets = sum(len(t) > limit for t in encoded_targets)
    if long_sources or long_targets:
        log.warning(
            "%s data: %d of %d source sides and %d of %d target sides longer than seq_len=%d tokens were truncated",
            split_name,
            long_sources,
            len(pairs),
            long_targets,
            len(pairs),
            config.seq_len,
        )
    return Split(
        {
            "input_ids": pad_batch(sources, ids["pad"]),
            "attention_mask": pad_batch([[1] * len(s) for s in sources], 0),
            "labels": pad_batch(targets, ids["pad"], value=-100),
        },
        truncated_sources=long_sources,
        truncated_targets=long_targets,
    )


def _chat_split(tok, conversations, config: TrainConfig, ids, split_name: str = "data") -> Split:
    """One conversation a row (:func:`~switchformer.data.chat.encode_chat`), cut to ``seq_len``
    tokens (longer ones are counted, and reported) and right-padded; ``labels`` are the ids on the
    assistants' tokens (their contents and closing ``</s>``) and -100 elsewhere. The first position
    has no earlier token to predict it from, so its label is always -100: every label that is not
    -100 is one the model scores (the counts of ``scored_tokens`` are exact)."""
    rows, masks = [], []
    for conversation in conversations:
        try:
            row, mask = encode_chat(tok, conversation.messages, False)
        except ValueError as err:
            raise DataError(f"{conversation.where}: {err}") from None
        rows.append(row)
        masks.append(mask)
    if not rows:
        raise DataError(f"{split_name} data: no conversations")
    long = sum(len(row) > config.seq_len for row in rows)
    if long:
        log.warning(
            "%s data: %d of %d conversations longer than seq_len=%d tokens were truncated (the rest of each is not "
            "trained on)",
            split_name,
            long,
            len(rows),
            config.seq_len,
        )
    rows = [row[: config.seq_len] for row in rows]
    labels = [[t if m else -100 for t, m in zip(row, mask)] for row, mask in zip(rows, masks)]
    for label in labels:
        label[0] = -100
    return Split(
        {
            "input_ids": pad_batch(rows, ids["pad"]),
            "attention_mask": pad_batch([[1] * len(row) for row in rows], 0),
            "labels": pad_batch(labels, ids["pad"], value=-100),
        },
        truncated_conversations=long,
        aligned_labels=True,
    )


def with_data_languages(config: TrainConfig, data: Data) -> TrainConfig:
    """``config`` with ``source_lang``/``target_lang`` filled from the training pairs' languages
    where the user gave none (line-aligned files named by language, JSONL rows that say theirs)."""
    from dataclasses import replace

    sources, target = getattr(data, "languages", (None, None))
    changes = {}
    if config.source_lang is None and sources:
        changes["source_lang"] = ",".join(sources)
    if config.target_lang is None and target:
        changes["target_lang"] = target
    return replace(config, **changes) if changes else config
