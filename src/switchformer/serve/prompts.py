"""Request text to model input, as the model saw its input in training.

- Decoder-only ``SwitchLM``: ``/v1/completions`` continues the prompt's tokens;
  ``/v1/chat/completions`` applies the chat template (:mod:`switchformer.data.chat`).
- Encoder-decoder ``SwitchT5`` (text-to-text): the prompt is the source. A translation run
  (``objective="seq2seq"``) formats it exactly as training did (its ``source_prefix`` and
  languages, see :func:`switchformer.train.data.encoder_text`); any other T5 (an imported Hugging
  Face checkpoint, a span-corruption run) reads the prompt as it is. EOS ends the source. A chat
  request's source is its last user message.
"""

from __future__ import annotations

from switchformer.data.chat import check_messages, encode_chat
from switchformer.data.formatting import Pair, encoder_text
from switchformer.data.tokenizer import special_ids
from switchformer.inference.translation import check_languages
from switchformer.serve.protocol import APIError


class PromptFormatter:
    """``completion_ids(prompt, source_lang, target_lang)`` and ``chat_ids(messages)``: token ids
    of the model's input. ``config``: the run's :class:`TrainConfig` (None for a Hugging Face
    directory)."""

    def __init__(self, tokenizer, model, config=None):

        self.tokenizer, self.config = tokenizer, config
        self.family = "t5" if model.is_encoder_decoder else "lm"
        self.eos = special_ids(tokenizer)["eos"]
        if self.family == "t5" and self.eos is None:
            raise ValueError("tokenizer: no '</s>' token to end a source with")
        self.seq2seq = config is not None and config.resolved_objective == "seq2seq"

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def language_error(self, err: ValueError) -> APIError:
        """A language error of the run's formatting, in the request's terms (fields, not flags)."""
        text = str(err)
        side = "target" if text.startswith("--target-lang") or "the target language" in text else "source"
        field = f"{side}_lang"
        if text.startswith("source_prefix"):
            return APIError(400, f"{field}: the run's source_prefix {self.config.source_prefix!r} names the {side} "
                            f"language; give \"{field}\" in the request", field)  # fmt: skip
        return APIError(400, f"{field}: {text.split(': ', 1)[-1]}", field)

    def completion_ids(self, prompt: str | list[int], source_lang=None, target_lang=None) -> list[int]:
        if self.family == "lm":
            return list(prompt) if isinstance(prompt, list) else self._encode(prompt)
        if isinstance(prompt, list):
            return list(prompt) if prompt[-1:] == [self.eos] else [*prompt, self.eos]
        return self._encode(self.source_text(prompt, source_lang, target_lang)) + [self.eos]

    def source_text(self, text: str, source_lang=None, target_lang=None) -> str:
        if not self.seq2seq:
            return text

        try:
            check_languages(self.config, source_lang, target_lang)
            return encoder_text(Pair(text, "", source_lang, target_lang), self.config)
        except ValueError as err:
            raise self.language_error(err) from None

    def chat_ids(self, messages: list, source_lang=None, target_lang=None) -> list[int]:

        try:
            checked = check_messages(messages, "messages")  # lone surrogates in a content too
        except ValueError as err:
            raise APIError(400, str(err), "messages") from None
        if self.family == "t5":
            users = [m for m in checked if m["role"] == "user"]
            if not users:
                raise APIError(400, "messages: a text-to-text model answers the last user message; there is none",
                               "messages")  # fmt: skip
            return self._encode(self.source_text(users[-1]["content"], source_lang, target_lang)) + [self.eos]
        try:
            return encode_chat(self.tokenizer, checked, True)[0]
        except ValueError as err:
            raise APIError(400, str(err), "messages") from None
