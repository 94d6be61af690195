"""``switchformer convert``: a Hugging Face directory into a switchformer run, and a run (or one
checkpoint) back into a Hugging Face directory. Reads its source, writes only its target.

A converted run is an ordinary run directory without checkpoints: ``config.json`` (the model
section is the checkpoint's architecture exactly, ``d_kv``, decoder depth, untied embeddings and
the absolute per-sequence ``expert_capacity`` included; the train section describes it in
training settings), ``model.safetensors`` and the source's tokenizer as ``tokenizer.json`` (as
every command reads a source's: without a post-processor that appends ``</s>``, or converted from
``spiece.model``). The other way, a Hugging Face directory that transformers' own loaders use as
switchformer uses the run (:func:`write_hf_companions`).
``eval``, ``generate``, ``info`` and ``convert`` read it; ``train --resume`` trains it further.
"""

from __future__ import annotations

from pathlib import Path

from switchformer.interop.hf import from_hf, to_hf
from switchformer.interop.hf_export import write_hf_companions
from switchformer.interop.tokenizers import source_tokenizer
from switchformer.runs.directory import is_hugging_face_source, run_dir_of, write_run
from switchformer.train.config import TrainConfig
from switchformer.train.model_settings import train_values
from switchformer.train.run import load_run


def train_settings_of(model_config) -> TrainConfig:
    """Training settings that describe a T5-family model config, by the one settings map (the model
    section stays the truth: these cannot say ``d_kv`` other than ``d_model / num_heads`` or an untied
    head)."""
    return TrainConfig(model="t5", vocab_size=model_config.vocab_size, **train_values(model_config.to_dict(), "t5"))


def convert(source: str | Path, target: str | Path) -> str:
    """Convert ``source`` into ``target`` (a new or empty folder); returns what was written, in
    words. Raises ``FileExistsError`` for a target that already holds files, ``ValueError`` for
    a source that is neither a Hugging Face T5/Switch directory nor a switchformer run."""
    from safetensors.torch import save

    source, target = Path(source), Path(target)
    if target.resolve().is_relative_to(run_dir_of(source).resolve()):
        raise ValueError(f"{target}: inside the source {source}; convert writes nothing into what it reads")
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target}: already holds files; convert writes into a new or empty folder")
    if is_hugging_face_source(source):  # Hugging Face -> switchformer run
        model = from_hf(source)
        weights = save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata={"format": "pt"})
        train = train_settings_of(model.config)
        # the tokenizer as every command reads a source's: without a post-processor that appends </s>
        # (switchformer appends it itself), converted from spiece.model where that is all there is
        try:
            tokenizer, note = source_tokenizer(source)
        except FileNotFoundError:
            tokenizer, note = None, None
        write_run(target, train.run_section(), model.config.to_dict(), weights=weights, tokenizer=tokenizer)
        if tokenizer is None:
            return f"switchformer run {target} (no tokenizer in {source}: give one with --set tokenizer=FILE)"
        return f"switchformer run {target}" + (f"\n  tokenizer: {note}" if note else "")
    model, _, train = load_run(source, need_tokenizer=False)
    if train.model != "t5":
        raise ValueError(f"{source}: only encoder-decoder (t5) models have a Hugging Face format")
    to_hf(model, target)
    notes = write_hf_companions(target, model.config, train, run_dir_of(source) / "tokenizer.json")
    return f"Hugging Face model {target}" + "".join(f"\n  {note}" for note in notes)
