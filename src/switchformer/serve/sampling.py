"""One request's decoding: its sampling settings, the choice of each next token from the model's
logits, and its text as it grows (incremental detokenisation and stop strings).

The choice reuses :func:`switchformer.inference.sampling.process_logits` and
:func:`~switchformer.inference.sampling.choose`, the functions ``generate`` uses, so a request served in a
batch picks the tokens ``generate`` picks for it alone (greedy always; sampling too, for the same
``seed``). OpenAI's additive ``presence_penalty`` and ``frequency_penalty`` come first, over the
tokens generated so far (OpenAI API reference, "Parameter details"); ``repetition_penalty``
(CTRL's, as Hugging Face's) is over the prompt and the generated tokens, as in ``generate``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor

from switchformer.inference.sampling import SamplingConfig, choose, process_logits


@dataclass
class SamplingParams:
    """A request's decoding settings (OpenAI's field names). ``temperature`` 0 is greedy.
    ``logprobs``: ``None`` for none, else how many alternatives (0-20) beside the chosen token."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the row alone: the argmax of the whole batch serves it."""
        return (
            self.greedy
            and self.repetition_penalty == 1.0
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
            and self.logprobs is None
        )


@dataclass
class TokenChoice:
    token: int
    logprob: float | None = None  # under the model's distribution (before penalties and temperature)
    top: list[tuple[int, float]] | None = None  # the most likely alternatives, most likely first


class RowSampler:
    """Chooses the next tokens of one request from its rows of logits. ``history``: the ids
    ``generate``'s repetition penalty looks at (a decoder-only prompt, or the decoder start token)."""

    def __init__(self, params: SamplingParams, history: list[int], device: torch.device | str):
        self.params = params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = None if params.greedy else torch.Generator(device=device).manual_seed(seed)
        self.config = SamplingConfig(
            max_new_tokens=params.max_tokens,
            do_sample=not params.greedy,
            temperature=params.temperature if not params.greedy else 1.0,
            top_k=max(params.top_k, 0),
            top_p=params.top_p,
            repetition_penalty=params.repetition_penalty,
            generator=self.generator,
        )
        self.history = list(history)
        self.generated: Counter[int] = Counter()
        self.device = device

    def choose(self, logits: Tensor) -> TokenChoice:
        """``logits``: ``[vocab]`` of this request's last position (any float dtype)."""
        params = self.params
        row = logits.float()[None]
        adjusted = row
        if self.generated and (params.presence_penalty or params.frequency_penalty):
            ids = torch.tensor(list(self.generated), device=row.device)
            counts = torch.tensor(list(self.generated.values()), device=row.device, dtype=row.dtype)
            penalty = counts * params.frequency_penalty + params.presence_penalty
            adjusted = row.index_put((torch.zeros_like(ids), ids), -penalty, accumulate=True)
        history = torch.tensor([self.history], dtype=torch.long, device=row.device)
        processed = process_logits(adjusted, history, self.config)
        token = int(choose(processed, self.config)[0])
        choice = TokenChoice(token)
        if params.logprobs is not None:
            logprobs = torch.log_softmax(row[0], -1)
            choice.logprob = float(logprobs[token])
            if params.logprobs:
                values, ids = torch.topk(logprobs, params.logprobs)
                choice.top = list(zip(ids.tolist(), values.tolist()))
        return choice

    def record(self, token: int) -> None:
        self.history.append(token)
        self.generated[token] += 1


class TextStream:
    """The text of a request's generated tokens as it grows: what may be sent now, held back while
    it could still turn into a stop string or ends inside a multi-byte character.

    ``add(token)`` returns the new text that is safe to send; once a stop string appears,
    ``stopped`` is True and the text ends before it (OpenAI leaves the stop string out)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""  # the text already returned by add()
        self.text = ""  # the whole text so far (to the stop string, once stopped)
        self.decoded = ""  # the decoding of all the tokens, an incomplete last character included
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.decoded = text
        if text.endswith("\ufffd"):  # the rest of a multi-byte character comes with the next token
            return ""
        self.text = text
        cut = self._stop_position(text)
        if cut is not None:
            self.stopped = True
            self.text = text[:cut]
            return self._release(len(self.text))
        return self._release(len(text) - self._held_back(text))

    def finish(self) -> str:
        """What was held back, at the end of the request: a partial stop string is text after all,
        and so is an incomplete last character (as the decoder gives it: U+FFFD), so the whole
        text is the decoding of all the tokens, as ``generate``'s."""
        if not self.stopped:
            self.text = self.decoded
            cut = self._stop_position(self.text)
            if cut is not None:
                self.stopped, self.text = True, self.text[:cut]
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        end = max(end, len(self.sent))
        new = self.text[len(self.sent) : end]
        self.sent = self.text[:end]
        return new

    def _stop_position(self, text: str) -> int | None:
        start = max(len(self.sent) - max((len(s) for s in self.stop), default=0), 0)
        found = [i for s in self.stop if (i := text.find(s, start)) >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
