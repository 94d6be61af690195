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
from switchformer.runs.directory import is_hugging_face_source, run_dir_of
from switchformer.runs.files import write_file_atomic, write_json_atomic
from switchformer.train.config import TrainConfig
from switchformer.train.run import load_run


def train_settings_of(model_config) -> TrainConfig:
    """Training settings that describe a T5-family model config (the model section stays the truth:
    these cannot say ``d_kv`` other than ``d_model / num_heads`` or an untied head)."""
    c = model_config
    sparse = c.num_experts > 0 and c.encoder_sparse_step > 0
    return TrainConfig(
        model="t5",
        d_model=c.d_model,
        num_layers=c.num_layers,
        num_heads=c.num_heads,
        d_ff=c.d_ff,
        vocab_size=c.vocab_size,
        num_experts=c.num_experts if sparse else 0,
        sparse_step=c.encoder_sparse_step if sparse else 0,
        activation=c.activation,
        top_k=c.top_k,
        capacity_factor=c.capacity_factor,
        eval_capacity_factor=c.eval_capacity_factor,
        router_jitter_noise=c.router_jitter_noise,
        aux_loss_coef=c.router_aux_loss_coef,
        z_loss_coef=c.router_z_loss_coef,
        dropout=c.dropout_rate,
    )


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
        target.mkdir(parents=True, exist_ok=True)
        weights = save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata={"format": "pt"})
        write_file_atomic(target / "model.safetensors", weights)
        train = train_settings_of(model.config)
        write_json_atomic(target / "config.json", {"train": train.to_dict(), "model": model.config.to_dict()})
        # the tokenizer as every command reads a source's: without a post-processor that appends </s>
        # (switchformer appends it itself), converted from spiece.model where that is all there is

        try:
            tokenizer, note = source_tokenizer(source)
        except FileNotFoundError:
            return f"switchformer run {target} (no tokenizer in {source}: give one with --set tokenizer=FILE)"
        write_file_atomic(target / "tokenizer.json", tokenizer.read_bytes())
        return f"switchformer run {target}" + (f"\n  tokenizer: {note}" if note else "")
    model, _, train = load_run(source, need_tokenizer=False)
    if train.model != "t5":
        raise ValueError(f"{source}: only encoder-decoder (t5) models have a Hugging Face format")
    to_hf(model, target)
    notes = write_hf_companions(target, model.config, train, run_dir_of(source) / "tokenizer.json")
    return f"Hugging Face model {target}" + "".join(f"\n  {note}" for note in notes)
