"""Text in, text out: a prompt (or a source, or a chat message) through a model and its tokenizer, for
either family, with the run's decoding defaults (``generate``, a run's end-of-training sample)."""

from __future__ import annotations

import torch

from switchformer.data.chat import encode_chat
from switchformer.inference.translation import check_languages, encode_sources


def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int | None = None,
    *,
    seed: int = 0,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    streamer=None,
    routing: str = "eval",
    config=None,
    source_lang: str | None = None,
    target_lang: str | None = None,
    messages: list[dict] | None = None,
    cache_implementation: str = "dynamic",
    compile: bool = False,
) -> str:
    """Prompt in, continuation out, for either model family; ``routing`` as in
    :mod:`switchformer.inference.generation` (default: the model's own eval routing). A setting left ``None``
    takes the default of the run's objective (``config``; without it, the model family's):

    - language model or span corruption: sampling (``temperature`` 0.8, ``top_p`` 0.95,
      ``top_k`` 0, ``repetition_penalty`` 1.1), 64 new tokens; a T5 prompt is followed by the
      sentinel ``<extra_id_0>`` and EOS, the span-corruption input whose span the model fills;
    - seq2seq: the prompt is a source, formatted exactly as in training (the run's
      ``source_prefix`` with ``source_lang``/``target_lang`` or the run's, EOS; see
      :mod:`switchformer.inference.translation`); decoding is deterministic: greedy, or beam search with the
      run's ``num_beams``, ``length_penalty`` and ``no_repeat_ngram_size``, no repetition
      penalty, up to ``seq_len`` new tokens. Giving ``temperature``, ``top_k`` or ``top_p``
      samples instead (one beam); ``do_sample=False`` with one of them is refused by name;
    - chat (a language model trained on conversations): the prompt is one user message, or
      ``messages`` (a conversation, OpenAI's shape) when given, formatted with the chat template and
      its generation prompt (:mod:`switchformer.data.chat`); the answer alone is returned, up to
      its ``</s>``. Sampling as a language model's, but no repetition penalty (``1.0``: an answer
      often repeats the question's words).

    ``no_repeat_ngram_size`` left ``None`` is the run's (``config``; 0 without it) for every
    objective. Beam search cannot stream: its tokens go to ``streamer`` once the search has ended.
    ``cache_implementation`` and ``compile``: the decoding cache and step, as ``model.generate``'s
    (:mod:`switchformer.inference.static`)."""
    # long by design: most of it is the signature and the contract of every objective's defaults
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    if no_repeat_ngram_size is None:
        no_repeat_ngram_size = config.no_repeat_ngram_size if config is not None else 0
    cache = dict(cache_implementation=cache_implementation, compile=compile)
    if config is not None and config.resolved_objective == "seq2seq":
        return _generate_seq2seq_text(
            model, tokenizer, prompt, max_new_tokens, config, generator, do_sample, temperature, top_k, top_p,
            repetition_penalty, num_beams, length_penalty, no_repeat_ngram_size, streamer, routing, source_lang,
            target_lang, cache,
        )  # fmt: skip
    chat = config is not None and config.resolved_objective == "chat"
    if messages is not None and not chat:
        raise ValueError("messages: a conversation is answered only by a chat run (objective 'chat')")
    if chat:
        ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}] if messages is None else messages, True)[0]
        if repetition_penalty is None:
            repetition_penalty = 1.0
    else:
        ids = tokenizer.encode(prompt).ids
    if num_beams is not None and num_beams > 1 and do_sample is None and model.is_encoder_decoder:
        _refuse_beams_with_sampling(_sampling_given(temperature, top_k, top_p))
        do_sample = False  # beams asked for: decode with them instead of the objective's sampling
    sampling = dict(
        max_new_tokens=64 if max_new_tokens is None else max_new_tokens,
        do_sample=True if do_sample is None else do_sample,
        temperature=0.8 if temperature is None else temperature,
        top_k=0 if top_k is None else top_k,
        top_p=0.95 if top_p is None else top_p,
        repetition_penalty=1.1 if repetition_penalty is None else repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        generator=generator,
        streamer=streamer,
        routing=routing,
        **cache,
    )
    if model.is_encoder_decoder:
        return _generate_span_text(model, tokenizer, ids, sampling, num_beams, length_penalty)
    if num_beams not in (None, 1):
        raise ValueError("num_beams: beam search is for encoder-decoder (t5) runs; this is a language model")
    ids = ids or [model.config.eos_token_id]  # an empty prompt: the model starts from EOS
    out = model.generate(torch.tensor([ids], device=device), **sampling)
    new = out[0, len(ids) :].tolist()
    eos = model.config.eos_token_id
    if chat and eos in new:  # the answer ends at its </s> (what follows is padding)
        new = new[: new.index(eos)]
    return tokenizer.decode(new, skip_special_tokens=True)


def _generate_span_text(model, tokenizer, ids: list[int], sampling: dict, num_beams, length_penalty) -> str:
    """A T5 that is no translator (span corruption, an import): the prompt, the sentinel
    ``<extra_id_0>`` and EOS in; the span it fills out."""
    streamer = sampling["streamer"]
    if num_beams is not None:
        sampling["num_beams"] = num_beams
        if num_beams > 1:
            sampling["streamer"] = None  # beams pick their tokens at the end: streamed after
    if length_penalty is not None:
        sampling["length_penalty"] = length_penalty
    sentinel = tokenizer.token_to_id("<extra_id_0>")
    source = ids + ([sentinel] if sentinel is not None else []) + [model.config.eos_token_id]
    out = model.generate(torch.tensor([source], device=next(model.parameters()).device), **sampling)
    _stream_after(out[0, 1:], streamer, model.config.eos_token_id, sampling["streamer"] is None)
    return tokenizer.decode(out[0, 1:].tolist(), skip_special_tokens=True)


def _sampling_given(temperature, top_k, top_p) -> list[str]:
    """The names of the sampling settings given (not None)."""
    settings = (("temperature", temperature), ("top_k", top_k), ("top_p", top_p))
    return [name for name, value in settings if value is not None]


def _refuse_beams_with_sampling(given: list[str]) -> None:
    """``ValueError`` naming ``num_beams`` when sampling settings come with beam search."""
    if given:
        raise ValueError(
            f"num_beams: beam search is deterministic; it cannot be combined with sampling ({', '.join(given)})"
        )


def _stream_after(tokens, streamer, eos: int, missed: bool) -> None:
    """Give ``streamer`` the tokens it did not see as they were chosen (beam search picks them at
    the end), up to and including EOS, one ``[1]`` tensor each."""
    if streamer is None or not missed:
        return
    for token in tokens.tolist():
        streamer(torch.tensor([token]))
        if token == eos:
            break


def _generate_seq2seq_text(
    model, tokenizer, prompt, max_new_tokens, config, generator, do_sample, temperature, top_k, top_p,
    repetition_penalty, num_beams, length_penalty, no_repeat_ngram_size, streamer, routing, source_lang, target_lang,
    cache,
) -> str:  # fmt: skip
    """:func:`generate_text` on a seq2seq run (see there)."""
    given = _sampling_given(temperature, top_k, top_p)
    if do_sample is None:
        do_sample = bool(given)
    elif not do_sample and given:
        raise ValueError(f"{given[0]}: a sampling setting, but decoding was asked to be greedy; give one of them")
    if do_sample and num_beams is not None and num_beams > 1:
        _refuse_beams_with_sampling(given)
    if num_beams is None:
        num_beams = 1 if do_sample else config.num_beams
    check_languages(config, source_lang, target_lang)
    source = encode_sources(tokenizer, config, [prompt], source_lang, target_lang)[0]
    settings = dict(
        max_new_tokens=config.seq_len if max_new_tokens is None else max_new_tokens,
        do_sample=do_sample,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        num_beams=num_beams,
        length_penalty=config.length_penalty if length_penalty is None else length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        routing=routing,
        streamer=streamer if num_beams == 1 else None,
        **cache,
    )
    if do_sample:
        settings.update(
            temperature=1.0 if temperature is None else temperature,
            top_k=0 if top_k is None else top_k,
            top_p=1.0 if top_p is None else top_p,
            generator=generator,
        )
    device = next(model.parameters()).device
    out = model.generate(torch.tensor([source], device=device), **settings)
    eos = model.config.eos_token_id
    _stream_after(out[0, 1:], streamer, eos, settings["streamer"] is None)
    row = out[0, 1:].tolist()
    return tokenizer.decode(row[: row.index(eos)] if eos in row else row, skip_special_tokens=True)
