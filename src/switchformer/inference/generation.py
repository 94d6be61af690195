"""Text generation with a key/value cache: greedy, sampling (temperature, top-k, top-p),
repetition penalty, n-gram repetition blocking, beam search for the encoder-decoder, EOS handling
and streaming.

Routing at inference: one routing truth per model. By default (``routing="eval"``) generation
routes exactly as the model's forward does in eval mode, with its own configured eval routing
(``eval_capacity_factor``, or Hugging Face's per-sequence ``expert_capacity`` for an imported
checkpoint, so default outputs equal Hugging Face's). ``routing="dropless"`` is the explicit
alternative: no token is ever dropped, so a batch gives the same tokens as its rows one by one. The
choice is logged on the ``switchformer`` logger; :func:`routing_description` names it for outputs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from switchformer.inference.beam import beam_search, check_beam_arguments
from switchformer.inference.inputs import check_mask, check_token_ids, decoder_start
from switchformer.inference.routing import inference_routing
from switchformer.inference.sampling import SamplingConfig, choose, process_logits
from switchformer.inference.scope import DecodingScope
from switchformer.inference.static import check_cache_options, decode_step_fn

log = logging.getLogger("switchformer")


@contextlib.contextmanager
def _eval_routing(model: torch.nn.Module, routing: str):
    """Eval mode and the chosen routing for the duration; training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with inference_routing(model, routing, decoding=True):
            yield
    finally:
        model.train(was_training)


def _run(model: torch.nn.Module, routing: str, fn: Callable[[], Tensor]) -> Tensor:
    """``fn()`` in eval mode under ``torch.inference_mode`` (cheaper per op than ``no_grad``, which
    decoding feels: it runs hundreds of small ops per token); the result is returned as an ordinary
    tensor, so callers may feed it to training later."""
    with _eval_routing(model, routing):
        with torch.inference_mode(), DecodingScope().active():
            result = fn()
    return result.clone()


def _stream(model: torch.nn.Module, routing: str, steps: Iterator[Tensor]) -> Iterator[Tensor]:
    """Each step computed under ``inference_mode``; between steps the caller's own grad mode holds
    (a generator must not leave a grad-mode context open across ``yield``)."""
    scope = DecodingScope()  # derived weights are kept across the steps of one stream
    with _eval_routing(model, routing):
        while True:
            with torch.inference_mode(), scope.active():
                token = next(steps, None)
            if token is None:
                return
            yield token.clone()


def _collect(first: Tensor, steps: Iterator[Tensor], streamer: Callable[[Tensor], None] | None) -> Tensor:
    """``first`` followed by each step's tokens as a column; each step also goes to ``streamer``."""
    tokens = [first]
    for token in steps:
        tokens.append(token[:, None])
        if streamer is not None:
            streamer(token)
    return torch.cat(tokens, 1)


# ----------------------------------------------------------------------------- encoder-decoder


def _sample_steps(logits: Tensor, generated: Tensor, next_logits, cfg: SamplingConfig) -> Iterator[Tensor]:
    """The decoding loop both families and both caches share: choose from the logits ``[B, vocab]``
    (on the device), pad finished rows, stop at EOS; ``next_logits(tokens [B])`` feeds the chosen
    tokens (not after the last step)."""
    finished = torch.zeros(generated.shape[0], dtype=torch.bool, device=generated.device)
    for step in range(cfg.max_new_tokens):
        token = choose(process_logits(logits, generated, cfg), cfg).masked_fill(finished, cfg.pad_token_id)
        generated = torch.cat([generated, token[:, None]], 1)
        yield token
        if cfg.eos_token_id is not None:
            finished |= token == cfg.eos_token_id
            if bool(finished.all()):  # between steps, never inside one
                return
        if step + 1 < cfg.max_new_tokens:
            logits = next_logits(token)


def _seq2seq_steps(model, input_ids, attention_mask, cfg: SamplingConfig, static=False, compile=False):
    """Yields the next token of every row, one step at a time (finished rows yield padding)."""
    memory = model.encode(input_ids, attention_mask)
    start = decoder_start(model, input_ids.shape[0], input_ids.device)
    if static:
        cache = model.new_static_cache(memory, attention_mask, cfg.max_new_tokens + 1)
        step = decode_step_fn(model, compile)

        def next_logits(tokens):
            return step(tokens, cache)[0]

    else:
        cache = model.new_cache(memory, attention_mask, cfg.max_new_tokens + 1)

        def next_logits(tokens):
            return model.project(model.decode(tokens[:, None], memory, attention_mask, cache=cache)[:, -1])

    yield from _sample_steps(next_logits(start[:, 0]), start, next_logits, cfg)


def _sampling_config(model, kwargs) -> SamplingConfig:
    kwargs.setdefault("eos_token_id", model.config.eos_token_id)
    kwargs.setdefault("pad_token_id", model.config.pad_token_id)
    return SamplingConfig(**kwargs)


def generate_seq2seq(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    routing: str = "eval",
    streamer: Callable[[Tensor], None] | None = None,
    cache_implementation: str = "dynamic",
    compile: bool = False,
    **sampling,
) -> Tensor:
    """Decoder tokens ``[batch, 1 + new]``, starting with ``decoder_start_token_id`` (as HF).

    ``cache_implementation``: ``"dynamic"`` (default) or ``"static"``, the fixed-size cache of the
    model's ``decode_step`` (the same tokens; :mod:`switchformer.inference.static`); ``compile``
    compiles that step whole (``torch.compile(fullgraph=True)``; CUDA graphs on a GPU).

    ``num_beams > 1`` runs :func:`switchformer.inference.beam.beam_search` with ``length_penalty`` and
    ``early_stopping`` (``False``, ``True`` or ``"never"``, as Hugging Face's; what each does is
    said there); it is deterministic, so it takes neither ``do_sample`` nor a ``streamer``. Raises
    ``ValueError`` naming the argument for a ``num_beams`` below 1, a non-finite ``length_penalty``
    or an unknown ``early_stopping``, whatever ``num_beams`` is."""
    cfg = _sampling_config(model, sampling)
    static = check_cache_options(cache_implementation, compile, model)
    check_beam_arguments(num_beams, length_penalty, early_stopping)
    if num_beams > 1 and cfg.do_sample:
        raise ValueError("num_beams: beam search is deterministic; do not combine it with do_sample")
    if num_beams > 1 and streamer is not None:
        raise ValueError("streamer: beam search picks its tokens only at the end; it cannot stream them")
    if num_beams > 1:
        return _run(
            model,
            routing,
            lambda: beam_search(
                model, input_ids, attention_mask, cfg, num_beams, length_penalty, early_stopping,
                step=decode_step_fn(model, compile) if static else None,
            ),
        )  # fmt: skip
    start = decoder_start(model, input_ids.shape[0], input_ids.device)
    steps = _seq2seq_steps(model, input_ids, attention_mask, cfg, static, compile)
    return _run(model, routing, lambda: _collect(start, steps, streamer))


def stream_seq2seq(
    model,
    input_ids,
    attention_mask=None,
    *,
    routing: str = "eval",
    cache_implementation: str = "dynamic",
    compile: bool = False,
    **sampling,
) -> Iterator[Tensor]:
    """Iterator over the new tokens ``[batch]`` of each step, as soon as each is chosen."""
    cfg = _sampling_config(model, sampling)
    static = check_cache_options(cache_implementation, compile, model)
    yield from _stream(model, routing, _seq2seq_steps(model, input_ids, attention_mask, cfg, static, compile))


# ----------------------------------------------------------------------------- decoder-only


def _causal_steps(model, input_ids, attention_mask, cfg: SamplingConfig, static=False, compile=False):
    check_token_ids("input_ids", input_ids, model.config.vocab_size)  # before any cache is sized
    check_mask("attention_mask", attention_mask, input_ids)
    limit = model.config.max_seq_len
    if input_ids.shape[1] > limit:
        raise ValueError(f"input_ids: a prompt of {input_ids.shape[1]} tokens exceeds the model's max_seq_len={limit}")
    if input_ids.shape[1] + cfg.max_new_tokens > limit:
        raise ValueError(
            f"max_new_tokens: a prompt of {input_ids.shape[1]} tokens and {cfg.max_new_tokens} new ones exceed the "
            f"model's max_seq_len={limit} positions; ask for at most {max(limit - input_ids.shape[1], 0)}"
        )
    positions = input_ids.shape[1] + cfg.max_new_tokens
    if static:
        cache = model.new_static_cache(input_ids.shape[0], positions)
    else:
        cache = model.new_cache(input_ids.shape[0], positions)
    h, _ = model.hidden_states(input_ids, attention_mask, cache=cache)  # the prompt: one ordinary pass
    generated = input_ids
    if attention_mask is not None:
        generated = input_ids.masked_fill(~attention_mask.bool(), cfg.pad_token_id)
    if static:
        cache.sync_column()
        step = decode_step_fn(model, compile)

        def next_logits(tokens):
            return step(tokens, cache)[0]

    else:

        def next_logits(tokens):
            return model.project(model.hidden_states(tokens[:, None], None, cache=cache)[0][:, -1])

    yield from _sample_steps(model.project(h[:, -1]), generated, next_logits, cfg)


def generate_causal(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    routing: str = "eval",
    streamer: Callable[[Tensor], None] | None = None,
    cache_implementation: str = "dynamic",
    compile: bool = False,
    **sampling,
) -> Tensor:
    """Prompt plus new tokens, ``[batch, prompt + new]``. Prompts of different lengths are
    left-padded, with ``attention_mask`` marking the real tokens. ``cache_implementation`` and
    ``compile``: as :func:`generate_seq2seq`'s."""
    cfg = _sampling_config(model, sampling)
    static = check_cache_options(cache_implementation, compile, model)
    steps = _causal_steps(model, input_ids, attention_mask, cfg, static, compile)
    return _run(model, routing, lambda: _collect(input_ids, steps, streamer))


def stream_causal(
    model,
    input_ids,
    attention_mask=None,
    *,
    routing: str = "eval",
    cache_implementation: str = "dynamic",
    compile: bool = False,
    **sampling,
) -> Iterator[Tensor]:
    """Iterator over the new tokens ``[batch]`` of each step, as soon as each is chosen."""
    cfg = _sampling_config(model, sampling)
    static = check_cache_options(cache_implementation, compile, model)
    yield from _stream(model, routing, _causal_steps(model, input_ids, attention_mask, cfg, static, compile))
