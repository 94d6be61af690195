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

import json
from pathlib import Path

from switchformer.train.config import TrainConfig


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

    from switchformer.interop.hf import from_hf, to_hf
    from switchformer.runs.directory import is_hugging_face_source, run_dir_of
    from switchformer.runs.files import write_file_atomic, write_json_atomic
    from switchformer.train.run import load_run

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
        from switchformer.train.init_from import source_tokenizer

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


def write_hf_companions(target: Path, model_config, train: TrainConfig, tokenizer_file: Path) -> list[str]:
    """What makes ``target`` (written by :func:`~switchformer.interop.hf.to_hf`) a whole Hugging Face
    model directory, used as switchformer uses the run: ``tokenizer.json`` with T5's post-processor
    (``</s>`` after every text, as switchformer appends it), ``tokenizer_config.json`` and
    ``special_tokens_map.json`` (``AutoTokenizer`` then loads the file as it is, whatever its model),
    ``generation_config.json`` with the run's decoding defaults (``translate``'s: beams, length
    penalty, n-gram blocking, at most ``seq_len`` new tokens), and in ``config.json`` the
    ``source_prefix`` as ``prefix`` and ``task_specific_params`` (what transformers' text-to-text and
    translation pipelines prepend). Returns notes for what could not be carried over."""
    from switchformer.data.formatting import parse_languages, prefix_fields, source_text
    from switchformer.data.tokenizer import EOS, PAD, UNK, load_tokenizer, sentinel_ids
    from switchformer.runs.files import to_json, write_json_atomic, write_text_atomic
    from switchformer.train.init_from import appends_special_tokens

    notes = []
    if not tokenizer_file.exists():
        return [f"no tokenizer: {tokenizer_file} is missing, so the directory has weights and config only"]
    tok = load_tokenizer(tokenizer_file)
    eos = tok.token_to_id(EOS)
    if eos is not None and not appends_special_tokens(tok):
        from tokenizers.processors import TemplateProcessing

        tok.post_processor = TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                special_tokens=[(EOS, eos)])  # fmt: skip
    write_text_atomic(target / "tokenizer.json", tok.to_str(pretty=True))
    specials = {"eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    specials = {name: token for name, token in specials.items() if tok.token_to_id(token) is not None}
    sentinels = [tok.id_to_token(i) for i in sentinel_ids(tok)]
    special_map = {**specials, **({"additional_special_tokens": sentinels} if sentinels else {})}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as it is (not T5's SentencePiece class)
        "model_max_length": train.seq_len,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,  # decoded text as switchformer decodes it
        **special_map,
    }
    write_json_atomic(target / "tokenizer_config.json", tokenizer_config)
    write_json_atomic(target / "special_tokens_map.json", special_map)
    generation = {
        "decoder_start_token_id": model_config.decoder_start_token_id,
        "eos_token_id": model_config.eos_token_id,
        "pad_token_id": model_config.pad_token_id,
        "max_new_tokens": train.seq_len,
        "num_beams": train.num_beams,
        "length_penalty": train.length_penalty,
        "no_repeat_ngram_size": train.no_repeat_ngram_size,
        "early_stopping": False,
        "do_sample": False,
    }
    write_json_atomic(target / "generation_config.json", generation)
    if train.source_prefix and train.resolved_objective == "seq2seq":
        config = json.loads((target / "config.json").read_text(encoding="utf-8"))
        sources, target_lang = parse_languages(train.source_lang), train.target_lang
        names = prefix_fields(train.source_prefix)
        tasks = {
            f"translation_{lang}_to_{target_lang}": {"prefix": source_text("", train.source_prefix, lang, target_lang)}
            for lang in (sources if target_lang else [])
        }
        if not names:
            config["prefix"] = train.source_prefix
        elif len(tasks) == 1:
            config["prefix"] = next(iter(tasks.values()))["prefix"]
        else:
            notes.append(f"source_prefix {train.source_prefix!r} names languages the run does not fix: prepend it "
                         "to each source yourself, as switchformer translate does")  # fmt: skip
        if tasks:
            config["task_specific_params"] = tasks
        write_text_atomic(target / "config.json", to_json(config, indent=2) + "\n")
    return notes
