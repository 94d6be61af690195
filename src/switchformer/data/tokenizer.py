"""Tokenizers with Hugging Face ``tokenizers``: train byte-level BPE or Unigram on the training
text (with T5's special tokens and sentinels for span corruption), save and load ``tokenizer.json``."""

from __future__ import annotations

from pathlib import Path

from switchformer.data.files import DataError, decode_text
from switchformer.runs.files import RunFileError, short_message, write_text_atomic

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


def train_tokenizer(texts: list[str], vocab_size: int = 4096, kind: str = "bpe", num_sentinels: int = 100):
    """A tokenizer with ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 (T5's ids), then the sentinels."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < 256 + 3 + num_sentinels and kind == "bpe":
        raise ValueError(f"vocab_size: byte-level BPE needs at least {256 + 3 + num_sentinels}, got {vocab_size}")
    specials = [PAD, EOS, UNK] + [sentinel(i) for i in range(num_sentinels)]
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token=UNK, show_progress=False
        )
    else:
        raise ValueError(f"tokenizer: unknown kind {kind!r}; choose 'bpe' or 'unigram'")
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path):
    """``tokenizer.json`` (or the one in the folder ``path``), checked: a damaged or foreign file is
    one line naming it (``RunFileError``)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: tokenizer file not found")

    try:
        text = decode_text(path.read_bytes(), path)  # as every text file is read (a leading BOM dropped)
    except DataError:
        raise RunFileError(path, "not UTF-8 text (not a tokenizer file, or damaged)") from None
    try:
        tok = Tokenizer.from_str(text)
    except Exception as err:  # the tokenizers library's parse errors are plain Exceptions
        raise RunFileError(path, f"not a valid tokenizer file, or damaged ({short_message(err)})") from None
    if tok.get_vocab_size() == 0:
        raise RunFileError(path, "the tokenizer has no tokens")
    return tok


def save_tokenizer(tok, path: str | Path) -> None:
    """``tok`` as ``tokenizer.json``, written atomically (a kill or a full disk leaves the previous
    file or none, never part of one)."""
    write_text_atomic(Path(path), tok.to_str(pretty=True))


def special_ids(tok) -> dict[str, int | None]:
    return {"pad": tok.token_to_id(PAD), "eos": tok.token_to_id(EOS), "unk": tok.token_to_id(UNK)}


def sentinel_ids(tok) -> list[int]:
    ids = []
    while (i := tok.token_to_id(sentinel(len(ids)))) is not None:
        ids.append(i)
    return ids
