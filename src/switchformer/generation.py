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
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from switchformer.models.common import DecodingScope, check_mask, check_token_ids
from switchformer.moe.layer import SwitchMoE, switch_layers

log = logging.getLogger("switchformer")
ROUTING_MODES = ("eval", "dropless")


@dataclass
class SamplingConfig:
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this many tokens occurs twice (HF's name)
    eos_token_id: int | None = None
    pad_token_id: int = 0
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature: must be a finite number > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty: must be a finite number > 0, got {self.repetition_penalty}")
        check_no_repeat_ngram_size(self.no_repeat_ngram_size)


def check_no_repeat_ngram_size(size) -> None:
    """``ValueError`` naming ``no_repeat_ngram_size`` unless it is an integer >= 0 (0: off)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"no_repeat_ngram_size: must be an integer >= 0 (0: off), got {size!r}")


def routing_description(model: torch.nn.Module, routing: str = "eval") -> str:
    """How ``routing`` makes ``model``'s Switch layers route at inference, in words, for outputs and
    logs: ``"eval: capacity factor 2.0"``, ``"eval: expert_capacity 64 per sequence"``,
    ``"dropless"``; ``"dense"`` for a model without Switch layers.

    Raises ``ValueError`` for a ``routing`` not in :data:`ROUTING_MODES`."""
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing: unknown {routing!r}; choose one of {ROUTING_MODES}")
    layers = switch_layers(model)
    if not layers:
        return "dense"
    if routing == "dropless":
        return "dropless (no token dropped)"
    kinds = []
    for m in layers:
        if m.routing == "expert_choice":
            kind = f"expert choice, capacity factor {m.eval_capacity_factor:g}"
        elif m.expert_capacity is not None:
            kind = f"expert_capacity {m.expert_capacity} per sequence"
        elif m.eval_capacity_factor is None:
            kind = "dropless (eval_capacity_factor None)"
        else:
            kind = f"capacity factor {m.eval_capacity_factor:g}"
        if kind not in kinds:
            kinds.append(kind)
    return "eval: " + "; ".join(kinds)


@contextlib.contextmanager
def inference_routing(
    model: torch.nn.Module, routing: str = "eval", decoding: bool = False, layers: list[SwitchMoE] | None = None
):
    """Run the model's Switch layers with their own eval routing (default: exactly as ``forward``
    in eval mode) or dropless (``"dropless"``), restoring the layers' settings afterwards.

    ``decoding``: the calls are generation steps, whose token counts (the rows of a step) are no
    multiple of a fixed ``group_size``: each call's tokens form one routing group, with the eval
    capacity factor (or per-sequence ``expert_capacity``) as configured. ``layers``: the model's
    Switch layers, from a caller that enters this for every step (a server): the model is then
    not walked, and nothing is logged.

    Raises ``ValueError`` for a ``routing`` not in :data:`ROUTING_MODES`."""
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing: unknown {routing!r}; choose one of {ROUTING_MODES}")
    if layers is None:
        layers = switch_layers(model)
        if layers:
            log.info("inference routing: %s", routing_description(model, routing))
    saved = [(m.eval_capacity_factor, m.expert_capacity, m.group_size) for m in layers]
    try:
        if routing == "dropless":
            for m in layers:
                if m.routing != "expert_choice":  # without capacity, groups do not matter either
                    m.eval_capacity_factor, m.expert_capacity, m.group_size = None, None, None
        elif decoding:
            for m in layers:
                m.group_size = None
        yield
    finally:
        for m, (factor, capacity, group_size) in zip(layers, saved):
            m.eval_capacity_factor, m.expert_capacity, m.group_size = factor, capacity, group_size


def process_logits(logits: Tensor, generated: Tensor, cfg: SamplingConfig) -> Tensor:
    """Repetition penalty (CTRL / HF convention), n-gram blocking, temperature, top-k and top-p
    filtering. ``logits`` ``[rows, vocab]``, ``generated`` ``[rows, tokens]`` (the tokens so far);
    float32 logits out."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and generated.numel():
        seen = logits.gather(1, generated)
        seen = torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        logits = logits.scatter(1, generated, seen)
    if cfg.no_repeat_ngram_size:
        banned = repeated_ngram_ends(generated, cfg.no_repeat_ngram_size, logits.shape[-1])
        logits = logits.masked_fill(banned, float("-inf"))
    if not cfg.do_sample:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) >= cfg.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def repeated_ngram_ends(generated: Tensor, n: int, vocab_size: int) -> Tensor:
    """Boolean ``[rows, vocab_size]``: the tokens that would complete an ``n``-gram already in the
    row's ``generated`` ``[rows, tokens]`` (its last ``n - 1`` tokens followed by the token occur
    earlier in the row). Banning them is Hugging Face's ``no_repeat_ngram_size`` (fairseq's
    ``--no-repeat-ngram-size``): the cure for decoding loops such as "a man holding a man holding
    ..." that beam search falls into on an undertrained model. ``n = 1`` bans every token seen."""
    rows, length = generated.shape
    banned = torch.zeros(rows, vocab_size, dtype=torch.bool, device=generated.device)
    if n < 1 or length < n - 1 or length == 0:
        return banned
    windows = generated.unfold(1, n, 1) if length >= n else generated.new_empty(rows, 0, n)
    prefix = generated[:, length - (n - 1) :]  # the last n - 1 tokens: the n-gram's beginning
    matches = (windows[:, :, : n - 1] == prefix[:, None, :]).all(-1)  # [rows, windows]
    hits = torch.zeros(rows, vocab_size, device=generated.device)
    hits.scatter_add_(1, windows[:, :, n - 1], matches.float())  # several windows may end in one token
    return hits > 0


def choose(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    if not cfg.do_sample:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=cfg.generator).squeeze(1)


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


def _sample_steps(model, h: Tensor, generated: Tensor, next_hidden, cfg: SamplingConfig) -> Iterator[Tensor]:
    """The decoding loop both families share: choose from the last hidden state, pad finished
    rows, stop at EOS; ``next_hidden(tokens)`` feeds the chosen tokens (not after the last step)."""
    finished = torch.zeros(generated.shape[0], dtype=torch.bool, device=generated.device)
    for step in range(cfg.max_new_tokens):
        logits = process_logits(model.project(h[:, -1]), generated, cfg)
        token = choose(logits, cfg).masked_fill(finished, cfg.pad_token_id)
        generated = torch.cat([generated, token[:, None]], 1)
        yield token
        if cfg.eos_token_id is not None:
            finished |= token == cfg.eos_token_id
            if bool(finished.all()):
                return
        if step + 1 < cfg.max_new_tokens:
            h = next_hidden(token[:, None])


def _decoder_start(model, rows: int, device) -> Tensor:
    """``[rows, 1]`` of the decoder start token: the first decoder input and first output column."""
    return torch.full((rows, 1), model.config.decoder_start_token_id, dtype=torch.long, device=device)


def _seq2seq_steps(model, input_ids, attention_mask, cfg: SamplingConfig) -> Iterator[Tensor]:
    """Yields the next token of every row, one step at a time (finished rows yield padding)."""
    memory = model.encode(input_ids, attention_mask)
    cache = model.new_cache(memory, attention_mask, cfg.max_new_tokens + 1)
    start = _decoder_start(model, input_ids.shape[0], input_ids.device)

    def next_hidden(tokens):
        return model.decode(tokens, memory, attention_mask, cache=cache)

    yield from _sample_steps(model, next_hidden(start), start, next_hidden, cfg)


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
    **sampling,
) -> Tensor:
    """Decoder tokens ``[batch, 1 + new]``, starting with ``decoder_start_token_id`` (as HF).

    ``num_beams > 1`` runs :func:`switchformer.beam.beam_search` with ``length_penalty`` and
    ``early_stopping`` (``False``, ``True`` or ``"never"``, as Hugging Face's; what each does is
    said there); it is deterministic, so it takes neither ``do_sample`` nor a ``streamer``. Raises
    ``ValueError`` naming the argument for a ``num_beams`` below 1, a non-finite ``length_penalty``
    or an unknown ``early_stopping``, whatever ``num_beams`` is."""
    from switchformer.beam import beam_search, check_beam_arguments  # beam imports this module

    cfg = _sampling_config(model, sampling)
    check_beam_arguments(num_beams, length_penalty, early_stopping)
    if num_beams > 1 and cfg.do_sample:
        raise ValueError("num_beams: beam search is deterministic; do not combine it with do_sample")
    if num_beams > 1 and streamer is not None:
        raise ValueError("streamer: beam search picks its tokens only at the end; it cannot stream them")
    if num_beams > 1:
        return _run(
            model,
            routing,
            lambda: beam_search(model, input_ids, attention_mask, cfg, num_beams, length_penalty, early_stopping),
        )
    start = _decoder_start(model, input_ids.shape[0], input_ids.device)
    return _run(
        model, routing, lambda: _collect(start, _seq2seq_steps(model, input_ids, attention_mask, cfg), streamer)
    )


def stream_seq2seq(model, input_ids, attention_mask=None, *, routing: str = "eval", **sampling) -> Iterator[Tensor]:
    """Iterator over the new tokens ``[batch]`` of each step, as soon as each is chosen."""
    cfg = _sampling_config(model, sampling)
    yield from _stream(model, routing, _seq2seq_steps(model, input_ids, attention_mask, cfg))


# ----------------------------------------------------------------------------- decoder-only


def _causal_steps(model, input_ids, attention_mask, cfg: SamplingConfig) -> Iterator[Tensor]:
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
    cache = model.new_cache(input_ids.shape[0], input_ids.shape[1] + cfg.max_new_tokens)
    h, _ = model.hidden_states(input_ids, attention_mask, cache=cache)
    generated = input_ids
    if attention_mask is not None:
        generated = input_ids.masked_fill(~attention_mask.bool(), cfg.pad_token_id)

    def next_hidden(tokens):
        return model.hidden_states(tokens, None, cache=cache)[0]

    yield from _sample_steps(model, h, generated, next_hidden, cfg)


def generate_causal(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    routing: str = "eval",
    streamer: Callable[[Tensor], None] | None = None,
    **sampling,
) -> Tensor:
    """Prompt plus new tokens, ``[batch, prompt + new]``. Prompts of different lengths are
    left-padded, with ``attention_mask`` marking the real tokens."""
    cfg = _sampling_config(model, sampling)
    return _run(
        model, routing, lambda: _collect(input_ids, _causal_steps(model, input_ids, attention_mask, cfg), streamer)
    )


def stream_causal(model, input_ids, attention_mask=None, *, routing: str = "eval", **sampling) -> Iterator[Tensor]:
    """Iterator over the new tokens ``[batch]`` of each step, as soon as each is chosen."""
    cfg = _sampling_config(model, sampling)
    yield from _stream(model, routing, _causal_steps(model, input_ids, attention_mask, cfg))
