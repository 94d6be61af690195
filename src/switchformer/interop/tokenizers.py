"""A Hugging Face checkpoint's tokenizer as switchformer uses it: its ``tokenizer.json`` without a
post-processor that appends ``</s>`` (switchformer appends it itself wherever a text ends), or T5's
SentencePiece ``spiece.model`` converted by ``transformers``' T5 tokenizer (the same pieces and ids as
T5's own: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``<extra_id_*>`` at the top). A converted or rewritten
tokenizer is kept in a cache folder, never in the source (commands that read a source never write
into it)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from switchformer.data.tokenizer import load_tokenizer
from switchformer.runs.files import short_message

# what converting T5's spiece.model needs: module -> the name pip installs it by
CONVERTER_PACKAGES = {"transformers": "transformers", "sentencepiece": "sentencepiece", "google.protobuf": "protobuf"}


def cache_dir() -> Path:
    """Where converted tokenizers are kept: ``$SWITCHFORMER_CACHE``, else
    ``$XDG_CACHE_HOME/switchformer``, else ``~/.cache/switchformer``."""
    if os.environ.get("SWITCHFORMER_CACHE"):
        return Path(os.environ["SWITCHFORMER_CACHE"]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root).expanduser() / "switchformer"


def source_tokenizer(folder: Path) -> tuple[Path, str]:
    """The tokenizer file a run started from ``folder`` uses, and a note on how it was obtained
    ("" when it is ``folder``'s own ``tokenizer.json`` as it is)."""
    from tokenizers import Tokenizer

    file, spiece = folder / "tokenizer.json", folder / "spiece.model"
    if file.exists():
        tok = load_tokenizer(file)
        if not appends_special_tokens(tok):
            return file, ""
        stripped = Tokenizer.from_str(tok.to_str())
        stripped.post_processor = None
        note = f"{file} without its post-processor (switchformer appends </s> itself)"
        return _cached(stripped, [file]), note
    if spiece.exists():
        tok = convert_sentencepiece(folder)
        note = f"{spiece} converted to tokenizer.json with transformers' T5 tokenizer"
        return _cached(tok, [spiece, *(folder / n for n in _TOKENIZER_SIDE_FILES)]), note
    raise FileNotFoundError(
        f"{file}: not found, and no spiece.model beside it; --init-from needs the checkpoint's tokenizer "
        "(or give one with --set tokenizer=FILE)"
    )


# files beside spiece.model that transformers reads when it builds the tokenizer from it
_TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def appends_special_tokens(tok) -> bool:
    """Whether ``tok``'s post-processor adds tokens (T5's appends ``</s>``) to an encoded text."""
    probe = "a b"
    return tok.encode(probe).ids != tok.encode(probe, add_special_tokens=False).ids


def convert_sentencepiece(folder: Path):
    """T5's ``spiece.model`` in ``folder`` as a ``tokenizers.Tokenizer`` (without the post-processor
    that appends ``</s>``), converted by ``transformers``' T5 tokenizer: the pieces, ids, sentinels and
    normalisation of T5's own tokenizer. Reads ``folder``, writes nothing."""
    import importlib

    missing = []
    for module, package in CONVERTER_PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    spiece = folder / "spiece.model"
    if missing:
        raise ModuleNotFoundError(
            f"{spiece}: converting T5's SentencePiece model to tokenizer.json needs transformers, sentencepiece "
            f"and protobuf (missing: {', '.join(missing)}): pip install {' '.join(missing)} "
            "(or put the checkpoint's tokenizer.json beside it, or give one with --set tokenizer=FILE)"
        )
    from transformers import T5TokenizerFast

    try:
        converted = T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers' and sentencepiece's errors have no common base
        raise ValueError(f"{spiece}: transformers could not convert it ({short_message(err)})") from None
    tok = converted.backend_tokenizer
    if appends_special_tokens(tok):
        tok.post_processor = None
    return tok


def _cached(tok, inputs: list[Path]) -> Path:
    """``tok`` saved under the cache folder, named by a hash of the files it was made from (so every
    rank of a distributed run, and a later run, finds the same file); written atomically."""
    digest = hashlib.sha256(b"switchformer tokenizer v1\0")
    for path in inputs:
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() if path.exists() else b"<absent>")
    target = cache_dir() / "tokenizers" / f"{digest.hexdigest()[:24]}.json"
    text = tok.to_str(pretty=True)
    if target.exists() and target.read_text(encoding="utf-8") == text:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f"{target.name}.{os.getpid()}.part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, target)
    return target
