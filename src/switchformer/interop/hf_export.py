"""The files beside ``config.json`` and the weights that make a Hugging Face model directory whole:
the tokenizer as transformers' ``AutoTokenizer`` loads it, the generation config, the task prefix."""

from __future__ import annotations

import json
from pathlib import Path

from switchformer.data.formatting import parse_languages, prefix_fields, source_text
from switchformer.data.tokenizer import EOS, PAD, UNK, load_tokenizer, sentinel_ids
from switchformer.interop.tokenizers import appends_special_tokens
from switchformer.runs.files import to_json, write_json_atomic, write_text_atomic


def write_hf_companions(target: Path, model_config, train, tokenizer_file: Path) -> list[str]:
    """What makes ``target`` (written by :func:`~switchformer.interop.hf.to_hf`) a whole Hugging Face
    model directory, used as switchformer uses the run: ``tokenizer.json`` with T5's post-processor
    (``</s>`` after every text, as switchformer appends it), ``tokenizer_config.json`` and
    ``special_tokens_map.json`` (``AutoTokenizer`` then loads the file as it is, whatever its model),
    ``generation_config.json`` with the run's decoding defaults (``translate``'s: beams, length
    penalty, n-gram blocking, at most ``seq_len`` new tokens), and in ``config.json`` the
    ``source_prefix`` as ``prefix`` and ``task_specific_params`` (what transformers' text-to-text and
    translation pipelines prepend). ``train``: the run's ``TrainConfig`` (``seq_len``, the decoding
    defaults, ``source_prefix`` and languages are read). Returns notes for what could not be carried
    over."""
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
