"""What the inference commands read: a run, one checkpoint, or a Hugging Face T5/Switch directory,
loaded for inference (``--dtype``, ``--max-memory``, memory-mapped) with its tokenizer and the
training settings that describe it. Reads only."""

from __future__ import annotations

import logging
from pathlib import Path

from switchformer.data.tokenizer import load_tokenizer
from switchformer.interop.hf import from_hf
from switchformer.interop.tokenizers import source_tokenizer
from switchformer.lifecycle.convert import train_settings_of
from switchformer.runs.directory import is_hugging_face_source
from switchformer.train.run import check_tokenizer_fits, load_run

log = logging.getLogger("switchformer")


def load_source(source: str | Path, need_tokenizer: bool = True, **options):
    """(model, tokenizer, train config) of ``source``, as :func:`~switchformer.train.run.load_run`
    gives them for a run; for a Hugging Face directory the model comes from
    :func:`~switchformer.interop.hf.from_hf` and the settings from its config (a T5 trained on span
    corruption, as a converted run says). ``options``: ``dtype``, ``max_memory``, ``device``."""
    path = Path(source)
    if path.is_file():
        raise ValueError(f"{path}: a file; give a run directory, a checkpoint or a Hugging Face directory")
    if not is_hugging_face_source(path):
        return load_run(path, need_tokenizer, **options)
    model = from_hf(path, **options).eval()
    tokenizer = None
    try:
        file, note = source_tokenizer(path)
    except FileNotFoundError:
        if need_tokenizer:
            raise
    else:
        if note:
            log.info("tokenizer: %s", note)
        tokenizer = load_tokenizer(file)
        check_tokenizer_fits(tokenizer, model, file)
    return model, tokenizer, train_settings_of(model.config)
