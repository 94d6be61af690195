"""Choosing the next token: the sampling settings (:class:`SamplingConfig`), the logits processors
(repetition penalty, n-gram blocking, temperature, top-k, top-p) and the choice itself."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


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
