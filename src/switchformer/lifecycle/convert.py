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

import torch

from switchformer.interop.hf import to_hf
from switchformer.interop.hf_config import config_from_hf
from switchformer.interop.hf_export import write_hf_companions
from switchformer.interop.hf_weights import expert_sources_from_hf, load_directory_weights, state_dict_from_hf
from switchformer.interop.tokenizers import source_tokenizer
from switchformer.models.placement import keeps_float32
from switchformer.models.t5 import SwitchT5
from switchformer.moe.quantize import quantize_int8
from switchformer.runs.directory import is_hugging_face_source, run_dir_of, write_run
from switchformer.runs.files import read_json
from switchformer.runs.safetensors_stream import StreamedTensor, streamed_safetensors
from switchformer.train.config import TrainConfig
from switchformer.train.model_settings import train_values
from switchformer.train.run import load_run


def train_settings_of(model_config) -> TrainConfig:
    """Training settings that describe a T5-family model config, by the one settings map (the model
    section stays the truth: these cannot say ``d_kv`` other than ``d_model / num_heads`` or an untied
    head)."""
    return TrainConfig(model="t5", vocab_size=model_config.vocab_size, **train_values(model_config.to_dict(), "t5"))


def convert(source: str | Path, target: str | Path, dtype: str | None = None) -> str:
    """Convert ``source`` into ``target`` (a new or empty folder); returns what was written, in
    words. Raises ``FileExistsError`` for a target that already holds files, ``ValueError`` for
    a source that is neither a Hugging Face T5/Switch directory nor a switchformer run.

    A Hugging Face directory is streamed into the run's ``model.safetensors`` one tensor (one
    expert) at a time, never held whole; ``dtype`` (float32, bfloat16; None: the checkpoint's) is
    what the run stores, and ``int8`` stores the experts quantised per output channel
    (:mod:`switchformer.moe.quantize`) beside the rest in the checkpoint's precision."""
    source, target = Path(source), Path(target)
    if target.resolve().is_relative_to(run_dir_of(source).resolve()):
        raise ValueError(f"{target}: inside the source {source}; convert writes nothing into what it reads")
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target}: already holds files; convert writes into a new or empty folder")
    if is_hugging_face_source(source):  # Hugging Face -> switchformer run
        config, weights = streamed_run_weights(source, dtype)
        train = train_settings_of(config)
        # the tokenizer as every command reads a source's: without a post-processor that appends </s>
        # (switchformer appends it itself), converted from spiece.model where that is all there is
        try:
            tokenizer, note = source_tokenizer(source)
        except FileNotFoundError:
            tokenizer, note = None, None
        write_run(target, train.run_section(), config.to_dict(), weights=weights, tokenizer=tokenizer)
        if tokenizer is None:
            return f"switchformer run {target} (no tokenizer in {source}: give one with --set tokenizer=FILE)"
        return f"switchformer run {target}" + (f"\n  tokenizer: {note}" if note else "")
    if dtype == "int8":
        raise ValueError(
            "--dtype: int8 experts have no Hugging Face format; int8 is for a Hugging Face directory converted into "
            "a switchformer run"
        )
    model, _, train = load_run(source, need_tokenizer=False)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    if train.model != "t5":
        raise ValueError(f"{source}: only encoder-decoder (t5) models have a Hugging Face format")
    to_hf(model, target)
    notes = write_hf_companions(target, model.config, train, run_dir_of(source) / "tokenizer.json")
    return f"Hugging Face model {target}" + "".join(f"\n  {note}" for note in notes)


def streamed_run_weights(source: Path, dtype: str | None):
    """(model config, the writer of the run's ``model.safetensors``) for a Hugging Face directory,
    read memory-mapped: everything but the experts converted first (a few percent of a Switch
    model), each expert when the writer reaches it."""
    hf_config = read_json(source / "config.json")
    config, flavour = config_from_hf(hf_config), hf_config.get("model_type")
    lazy = load_directory_weights(source)
    with torch.device("meta"):
        model = SwitchT5(config)
    dense = state_dict_from_hf(lazy, config, flavour, experts=False)  # every name checked here
    experts = expert_sources_from_hf(lazy, config, flavour)
    stored = lazy.meta(next(iter(lazy))).dtype
    floats = getattr(torch, dtype) if dtype in ("float32", "bfloat16") else stored
    entries = []
    for name, meta in model.state_dict().items():
        layer, _, weight = name.rpartition(".experts.")
        if layer in experts:
            index, source_of = ("w_in", "w_out").index(weight), experts[layer]
            if dtype == "int8":
                entries += _int8_entries(name, meta.shape, lambda e, s=source_of, i=index: s(e)[i])
            else:
                pieces = lambda s=source_of, i=index, n=meta.shape[0]: (s(e)[i].to(floats) for e in range(n))  # noqa: E731
                entries.append(StreamedTensor(name, floats, tuple(meta.shape), pieces))
            continue
        tensor = dense[name]
        kind = meta.dtype if keeps_float32(name) or not tensor.dtype.is_floating_point else floats
        entries.append(StreamedTensor(name, kind, tuple(meta.shape), lambda t=tensor, k=kind: [t.to(k)]))
    metadata = {"format": "pt", **({"experts": "int8"} if dtype == "int8" else {})}
    return config, streamed_safetensors(entries, metadata)


def _int8_entries(name: str, shape, expert) -> list[StreamedTensor]:
    """``name.qweight [E, out, in]`` int8 and ``name.scale [E, out]`` float32 of a stacked expert
    weight ``[E, in, out]``: each expert quantised once, its scales kept for the second tensor."""
    count, d_in, d_out = shape
    scales = []

    def weights():
        for e in range(count):
            m = quantize_int8(expert(e))
            scales.append(m.scale)
            yield m.qweight

    return [
        StreamedTensor(f"{name}.qweight", torch.int8, (count, d_out, d_in), weights),
        StreamedTensor(f"{name}.scale", torch.float32, (count, d_out), lambda: scales),
    ]
