"""Beam search for the encoder-decoder, scored and stopped as Hugging Face's ``generate`` does,
with its three stopping rules (``early_stopping``: ``False``, ``True`` or ``"never"``)."""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import Tensor

from switchformer.inference.inputs import decoder_start
from switchformer.inference.sampling import SamplingConfig, process_logits

EARLY_STOPPING = (False, True, "never")  # the choices of ``early_stopping``


def check_beam_arguments(num_beams, length_penalty, early_stopping) -> None:
    """Raise ``ValueError`` naming the argument for a ``num_beams`` that is not an integer >= 1, a
    ``length_penalty`` that is not a finite number, or an ``early_stopping`` other than ``False``,
    ``True`` or ``"never"``."""
    try:
        beams = operator.index(num_beams)
    except TypeError:
        beams = None
    if beams is None or isinstance(num_beams, bool) or beams < 1:
        raise ValueError(f"num_beams: must be an integer >= 1, got {num_beams!r}")
    real = isinstance(length_penalty, numbers.Real) and not isinstance(length_penalty, bool)
    if not real or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty: must be a finite number, got {length_penalty!r}")
    never = isinstance(early_stopping, str) and early_stopping == "never"
    if not (isinstance(early_stopping, bool) or never):
        raise ValueError(f"early_stopping: must be False, True or 'never', got {early_stopping!r}")


def beam_search(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    cfg: SamplingConfig,
    num_beams: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    step=None,
) -> Tensor:
    """Beam search over ``model``'s decoder; returns each row's best hypothesis as decoder tokens
    ``[batch, 1 + new]`` (the ``decoder_start_token_id``, the new tokens, ``pad_token_id`` after a
    shorter hypothesis), the same tokens as Hugging Face's ``generate(num_beams=...,
    length_penalty=..., early_stopping=...)``.

    Each step extends every live beam of a row by every token. A token's log-probability is the
    log-softmax of the model's logits, then ``repetition_penalty`` applied to it (Hugging Face's
    order for beam search); a candidate's score is its beam's summed log-probability plus the
    token's. Of the ``2 * num_beams`` best candidates of a row, the ``num_beams`` best that do not
    end the hypothesis stay live. A candidate ends the hypothesis when its token is ``eos_token_id``
    or it is the ``max_new_tokens``-th token; it joins the row's finished hypotheses only if it is
    among the row's ``num_beams`` best candidates, scored ``sum_logprob / length ** length_penalty``
    with ``length`` its number of new tokens (EOS included). A row keeps its ``num_beams`` best
    finished hypotheses and returns the best one.

    A row stops (takes no more finished hypotheses; the search ends when every row has stopped or
    after ``max_new_tokens`` tokens) as ``early_stopping`` says. With ``live`` the best live beam's
    summed log-probability, ``length`` its number of tokens and ``worst`` the score of the worst of
    ``num_beams`` finished hypotheses:

    - ``True``: as soon as the row has ``num_beams`` finished hypotheses.
    - ``False`` (default, as Hugging Face's default): once it has ``num_beams`` finished hypotheses
      and ``live / length ** length_penalty <= worst``, i.e. the best live beam, were it to finish
      at its current length, would not beat the worst finished one. For ``length_penalty <= 0`` this
      is exact (no live beam can ever beat ``worst``); for ``length_penalty > 0`` it is a heuristic: a
      longer hypothesis is divided by a larger ``length ** length_penalty`` and may still win, and
      the row may stop before finding it.
    - ``"never"``: once it has ``num_beams`` finished hypotheses and no live beam can ever beat
      ``worst``, taking the length penalty's best possible future into account: for
      ``length_penalty > 0`` the test is ``live / max_new_tokens ** length_penalty <= worst`` (a
      hypothesis can only lose log-probability as it grows, and gains most from finishing as late
      as possible), otherwise as for ``False``. The result is then the same as if the search ran
      for all ``max_new_tokens`` steps (Hugging Face's ``early_stopping="never"``); with enough
      beams that none is ever pruned, it is the best-scoring of all hypotheses.

    Degenerate sizes: ``max_new_tokens=0`` or an empty batch gives the decoder start tokens alone
    (``[batch, 1]``); more beams than a row can fill (``num_beams`` beyond the vocabulary at the
    first step) leave the extra beams empty: they never finish and never count (Hugging Face runs
    them as copies scored -1e9, which can count towards its ``num_beams`` finished hypotheses, so
    there its result can differ). Raises ``ValueError`` naming the argument for a
    ``num_beams`` below 1, a non-finite ``length_penalty``, an unknown ``early_stopping`` or
    ``do_sample`` (beam search is deterministic).

    ``step``: a static decoding step (``model.decode_step`` or its compiled form,
    :func:`switchformer.inference.static.decode_step_fn`) over a static cache, whose buffers the
    beams' reordering rewrites in place; the search itself is the same."""
    # long by design: one step loop of the algorithm, read top to bottom as the docstring tells it
    check_beam_arguments(num_beams, length_penalty, early_stopping)
    if cfg.do_sample:
        raise ValueError("do_sample: beam search is deterministic; do not combine it with do_sample")
    batch, device = input_ids.shape[0], input_ids.device
    steps = cfg.max_new_tokens
    if steps == 0 or batch == 0:
        return decoder_start(model, batch, device)
    penalty = float(length_penalty)
    expand = torch.arange(batch, device=device).repeat_interleave(num_beams)
    memory = model.encode(input_ids, attention_mask).index_select(0, expand)
    mask = None if attention_mask is None else attention_mask.index_select(0, expand)
    if step is None:
        cache = model.new_cache(memory, mask, steps + 1)

        def next_logits(tokens: Tensor) -> Tensor:
            return model.project(model.decode(tokens[:, None], memory, mask, cache=cache)[:, -1])

    else:
        cache = model.new_static_cache(memory, mask, steps + 1)

        def next_logits(tokens: Tensor) -> Tensor:
            return step(tokens, cache)[0]

    sequences = decoder_start(model, batch * num_beams, device)
    scores = torch.full((batch, num_beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live beam to start from; the others empty until there are candidates
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(batch)]
    done = [False] * batch
    for length in range(1, steps + 1):
        logprobs = process_logits(next_logits(sequences[:, -1]).float().log_softmax(-1), sequences, cfg)
        vocab = logprobs.shape[-1]
        candidates = (scores.view(-1, 1) + logprobs).view(batch, num_beams * vocab)
        top_scores, top_index = candidates.topk(min(2 * num_beams, num_beams * vocab), dim=-1)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        next_rows, next_tokens, next_scores = [], [], []
        for b in range(batch):
            live: list[tuple[int, int, float]] = []
            if not done[b]:
                for rank, (score, index) in enumerate(zip(top_scores[b], top_index[b])):
                    if score == float("-inf") or len(live) == num_beams:
                        break  # sorted: what follows is empty beams or not needed
                    beam, token = divmod(index, vocab)
                    row = b * num_beams + beam
                    if length == steps or token == cfg.eos_token_id:
                        if rank < num_beams:  # as HF: only a row's num_beams best candidates finish
                            hypothesis = torch.cat([sequences[row], sequences.new_tensor([token])])
                            finished[b].append((score / length**penalty, hypothesis))
                    else:
                        live.append((row, token, score))
                finished[b] = sorted(finished[b], key=lambda item: -item[0])[:num_beams]
                done[b] = _row_done(finished[b], live, num_beams, length, steps, penalty, early_stopping)
            live += [(b * num_beams, cfg.pad_token_id, float("-inf"))] * (num_beams - len(live))
            for row, token, score in live:
                next_rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
        if all(done) or length == steps:
            break
        order = torch.tensor(next_rows, device=device)
        tokens = torch.tensor(next_tokens, dtype=torch.long, device=device)
        sequences = torch.cat([sequences.index_select(0, order), tokens[:, None]], 1)
        scores = torch.tensor(next_scores, device=device).view(batch, num_beams)
        cache.reorder(order)
    start = decoder_start(model, 1, device)[0]
    results = [max(pool, key=lambda item: item[0])[1] if pool else start for pool in finished]
    out = torch.full((batch, max(r.numel() for r in results)), cfg.pad_token_id, dtype=torch.long, device=device)
    for b, r in enumerate(results):
        out[b, : r.numel()] = r
    return out


def _row_done(
    finished: list[tuple[float, Tensor]],
    live: list[tuple[int, int, float]],
    num_beams: int,
    length: int,
    steps: int,
    penalty: float,
    early_stopping: bool | str,
) -> bool:
    """Whether a row stops taking finished hypotheses (see :func:`beam_search`); ``live`` is sorted
    best first and ``finished`` best first, at most ``num_beams`` long."""
    if not live:
        return True  # nothing left that could finish
    if len(finished) < num_beams:
        return False
    if early_stopping is True:
        return True
    horizon = steps if early_stopping == "never" and penalty > 0 else length
    return live[0][2] / horizon**penalty <= finished[-1][0]
