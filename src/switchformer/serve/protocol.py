"""The OpenAI API's request fields, checked, and its response shapes (API reference:
``/v1/completions``, ``/v1/chat/completions``, error objects).

Unknown fields are ignored, as OpenAI ignores them; a known field of the wrong type or range is a
400 whose error names it (``param``), in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from switchformer.data.formatting import unicode_problem
from switchformer.data.token_bytes import PieceStream, token_text
from switchformer.serve.sampling import SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI
GREEDY_BELOW = 1e-5  # a temperature below this decodes greedily (as vLLM's sampling epsilon)
MAX_LOGPROBS = {"completions": 5, "chat": 20}  # alternatives per token, as OpenAI


class APIError(Exception):
    """An error the server answers with ``status`` and OpenAI's error object."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code=None,
        headers: dict | None = None,
    ):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body; 400 for anything else."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply to be read") from None
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise APIError(400, f"the request body is not valid JSON: {err.msg} ({where})") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def check_text(name: str, text: str) -> str:
    """``text`` if it is valid Unicode (JSON's escapes can carry a lone surrogate, which no
    tokenizer reads); else a 400 naming ``name``."""
    problem = unicode_problem(text)
    if problem is not None:
        raise APIError(400, f"{name}: {problem}", name)
    return text


def _type_name(value) -> str:
    return (
        "null"
        if value is None
        else {bool: "boolean", str: "string", list: "array", dict: "object"}.get(type(value), "number")
    )


def _integer(body: dict, name: str, default, low=None, high=None, high_note: str = ""):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name}: expected an integer, got {_type_name(value)} {json.dumps(value)}", name)
    if low is not None and value < low:
        raise APIError(400, f"{name}: must be >= {low}, got {value}", name)
    if high is not None and value > high:
        raise APIError(400, f"{name}: must be <= {high}{high_note}, got {value}", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise APIError(400, f"{name}: expected a number, got {_type_name(value)} {json.dumps(value)}", name)
    if value < low or (open_low and value == low) or value > high:
        bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise APIError(400, f"{name}: must be in {bounds}, got {value}", name)
    return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"{name}: expected true or false, got {_type_name(value)} {json.dumps(value)}", name)
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise APIError(400, "stop: expected a string or an array of strings", "stop")
    if len(value) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} sequences, got {len(value)}", "stop")
    return [s for s in value if s]


# OpenAI fields that would change the answer and that this server does not implement: refused
# rather than ignored (an ignored logit_bias or response_format gives the client a wrong answer)
UNSUPPORTED = ("logit_bias", "tools", "functions", "tool_choice", "function_call", "suffix", "response_format")


def refuse_unsupported(body: dict) -> None:
    for name in UNSUPPORTED:
        value = body.get(name)
        if name == "response_format" and value in (None, {"type": "text"}):
            continue
        if name in ("tool_choice", "function_call") and value in (None, "none"):
            continue
        if value not in (None, {}, [], ""):
            raise APIError(400, f"{name}: not supported by this server", name)


@dataclass
class Limits:
    """What one request may ask: ``max_prompt_tokens`` (prompt or source), ``max_tokens`` (new
    tokens), ``context`` (prompt and new tokens together: a decoder-only model's positions; None
    for the encoder-decoder)."""

    max_prompt_tokens: int
    max_tokens: int
    context: int | None


def sampling_params(body: dict, endpoint: str, default_max_tokens: int | None, limits: Limits) -> SamplingParams:
    """The sampling fields of a request (``endpoint`` "completions" or "chat"). ``max_tokens`` is
    checked against the limit here and against the prompt later (:func:`fit_max_tokens`)."""
    n = _integer(body, "n", 1)
    if n != 1:
        raise APIError(400, f"n: only 1 choice per request is supported, got {n}", "n")
    if body.get("best_of") not in (None, 1):
        raise APIError(400, "best_of: only 1 is supported", "best_of")
    newer = endpoint == "chat" and body.get("max_completion_tokens") is not None  # chat's newer name for it
    name = "max_completion_tokens" if newer else "max_tokens"
    max_tokens = _integer(body, name, default_max_tokens, 1, limits.max_tokens, " (the server's limit)")
    if endpoint == "chat":
        wants = _boolean(body, "logprobs", False)
        top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS["chat"])
        if top is not None and not wants:
            raise APIError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        logprobs = (top or 0) if wants else None
    else:
        logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS["completions"])
    refuse_unsupported(body)
    top_k = _integer(body, "top_k", 0, -1)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    if temperature < GREEDY_BELOW:  # logits / 1e-40 overflow to inf; so small a temperature is argmax anyway
        temperature = 0.0
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else 0,  # 0: fit_max_tokens fills it in
        temperature=temperature,
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        top_k=max(top_k, 0),  # -1 (vLLM's "off") and 0 both mean no top-k
        seed=_integer(body, "seed", None, -(2**63), 2**63 - 1),
        stop=_stop(body),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, open_low=True),
        logprobs=logprobs,
    )


def fit_max_tokens(params: SamplingParams, prompt_tokens: int, limits: Limits, field: str, asked: bool) -> None:
    """Check the prompt against the limits and fill in a ``max_tokens`` the request left out
    (what the context leaves, up to the server's limit)."""
    if prompt_tokens > limits.max_prompt_tokens:
        raise APIError(
            400, f"{field}: {prompt_tokens} tokens, more than the server's limit of {limits.max_prompt_tokens}", field,
            code="context_length_exceeded",
        )  # fmt: skip
    room = limits.max_tokens if limits.context is None else min(limits.max_tokens, limits.context - prompt_tokens)
    if room < 1:
        raise APIError(
            400, f"{field}: {prompt_tokens} tokens leave no room for an answer in the model's context of "
            f"{limits.context} tokens", field, code="context_length_exceeded",
        )  # fmt: skip
    if not asked:
        params.max_tokens = min(params.max_tokens, room) if params.max_tokens else room
    elif params.max_tokens > room:
        raise APIError(
            400,
            f"max_tokens: {params.max_tokens} new tokens and a prompt of {prompt_tokens} exceed the model's context "
            f"of {limits.context} tokens; ask for at most {room}",
            "max_tokens",
            code="context_length_exceeded",
        )


def completion_prompt(body: dict, vocab_size: int) -> str | list[int]:
    """``prompt``: a string, an array of one string, or an array of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt: empty", "prompt")
        return check_text("prompt", prompt)
    if prompt == []:
        raise APIError(400, "prompt: empty", "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt")
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise APIError(400, f"prompt: one prompt per request, got {len(prompt)}", "prompt")
    if prompt is None:
        raise APIError(400, "prompt: missing (a string)", "prompt")
    raise APIError(400, f"prompt: expected a string or an array of token ids, got {_type_name(prompt)}", "prompt")


def chat_messages(body: dict) -> list:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "messages: missing (an array of {role, content})", "messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages: must be a non-empty array of {role, content}", "messages")
    return messages


def stream_options(body: dict) -> bool:
    """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise APIError(400, "stream_options: expected an object", "stream_options")
    return _boolean(options, "include_usage", False)


# ----------------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_object(rid: str, model: str, text: str, finish_reason, logprobs, use: dict | None, chunk=False):
    body = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if use is not None:
        body["usage"] = use
    return body


def chat_object(rid: str, model: str, text: str, finish_reason, logprobs, use: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        ],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, delta: dict, finish_reason=None, logprobs=None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}


class LogprobsBuilder:
    """Log-probabilities of the generated tokens in the endpoint's shape: completions'
    ``{tokens, token_logprobs, top_logprobs, text_offset}`` or chat's ``{content: [...]}``.

    Every field is exact for every token, tokens that are not whole characters included (a byte-level
    BPE splits most non-ASCII characters; :mod:`switchformer.data.token_bytes`):
    - ``bytes`` (chat): the bytes the token writes into the answer, so that they concatenate to the
      answer's UTF-8; ``null`` for a special token, which writes nothing;
    - a token's text (``token``, ``tokens``, the keys of ``top_logprobs``): its text when its bytes are
      whole characters, else OpenAI's ``"bytes:\\xe2\\x80"``; a special token's own name. Two
      candidates with the same text (possible only for distinct ids with equal bytes) keep the higher
      one's key, the other's becomes ``"token_id:N"`` (vLLM's spelling), so a completions position
      always holds as many entries as asked;
    - ``text_offset``: the offset in the returned text of the character holding the token's first
      byte (a token that continues a character points at that character; a special token at where
      the next text goes)."""

    def __init__(self, token_bytes, endpoint: str, offset: int = 0):
        """``token_bytes``: the tokenizer's :class:`~switchformer.data.token_bytes.TokenBytes`;
        ``offset``: where the generated text starts in the returned text (an echoed prompt's length)."""
        import codecs

        self.token_bytes, self.endpoint = token_bytes, endpoint
        self.pieces = PieceStream(token_bytes)
        self.entries: list[dict] = []
        self.offset = offset
        self.characters = codecs.getincrementaldecoder("utf-8")("replace")

    def _describe(self, token: int, piece: bytes | None) -> tuple[bytes | None, str]:
        return piece, token_text(piece, self.token_bytes.name(token))

    def add(self, choice) -> dict | None:
        """Records ``choice`` (a :class:`TokenChoice`); returns the piece for a stream chunk."""
        if choice.logprob is None:
            return None
        top = [(*self._describe(a, self.pieces.piece(a)), a, alp) for a, alp in choice.top or []]
        piece, text = self._describe(choice.token, self.pieces.add(choice.token))
        entry = {"token": choice.token, "text": text, "bytes": piece, "logprob": choice.logprob, "top": top,
                 "offset": self.offset}  # fmt: skip
        if piece:
            self.offset += len(self.characters.decode(piece, final=False))
        self.entries.append(entry)
        return self._shape([entry])

    def result(self) -> dict | None:
        return self._shape(self.entries) if self.entries else None

    def _shape(self, entries: list[dict]) -> dict:
        def as_list(piece):
            return None if piece is None else list(piece)

        if self.endpoint == "chat":
            return {
                "content": [
                    {
                        "token": e["text"],
                        "logprob": e["logprob"],
                        "bytes": as_list(e["bytes"]),
                        "top_logprobs": [
                            {"token": text, "logprob": alp, "bytes": as_list(piece)} for piece, text, _, alp in e["top"]
                        ],
                    }
                    for e in entries
                ]
            }
        return {
            "tokens": [e["text"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [_keyed(e["top"]) for e in entries],
            "text_offset": [e["offset"] for e in entries],
        }


def _keyed(top: list) -> dict:
    """Completions' ``top_logprobs`` dict, one entry per candidate (best first, as given)."""
    out: dict[str, float] = {}
    for _, text, token, logprob in top:
        out[text if text not in out else f"token_id:{token}"] = logprob
    return out
