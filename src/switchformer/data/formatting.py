"""How a sentence pair becomes the encoder's input text: one function, used alike by training
(seq2seq rows), ``translate``, ``generate`` and ``eval --metric``, so a model never sees at
inference an input formatted otherwise than in training.

The encoder input is ``source_prefix`` (a ``str.format`` template) followed by the source text,
then EOS (added by the tokenising code, not here). The template may name the pair's languages:
``{source_lang}``/``{target_lang}`` (codes as given, e.g. ``de``) and
``{source_language}``/``{target_language}`` (English names, e.g. ``German``), so T5's task prefix
is ``"translate {source_language} to {target_language}: "`` and a multilingual tag is
``"<{source_lang}> "``.
"""

from __future__ import annotations

import string
from typing import NamedTuple

# ISO 639-1 codes -> the English names T5's task prefixes use ("translate German to English: ")
LANGUAGE_NAMES = {
    "ar": "Arabic",
    "cs": "Czech",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "fi": "Finnish",
    "fr": "French",
    "hi": "Hindi",
    "it": "Italian",
    "ja": "Japanese",
    "nl": "Dutch",
    "pl": "Polish",
    "pt": "Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "sv": "Swedish",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "zh": "Chinese",
}

PREFIX_FIELDS = ("source_lang", "target_lang", "source_language", "target_language")


class Pair(NamedTuple):
    """One sentence pair; the languages are ``None`` when the data does not say them."""

    source: str
    target: str
    source_lang: str | None = None
    target_lang: str | None = None


def lone_surrogate(text: str) -> int | None:
    """The position of the first lone surrogate in ``text`` (JSON's ``\\ud800`` escapes make
    them; no tokenizer reads one), or None when ``text`` is valid Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def unicode_problem(text: str) -> str | None:
    """What makes ``text`` unfit for a tokenizer, in words, for errors that name where it came
    from (a file's line, a message, an HTTP field); None when it is valid Unicode."""
    position = lone_surrogate(text)
    return None if position is None else f"not valid Unicode (a lone surrogate at character {position})"


def is_language_code(value) -> bool:
    """Whether ``value`` can be a language code: letters and digits, with ``-`` or ``_`` between
    (``de``, ``pt-br``, ``zh_Hans``). The one check of every language a user or a file gives."""
    return isinstance(value, str) and bool(value) and value.replace("-", "").replace("_", "").isalnum()


def prefix_fields(prefix: str) -> set[str]:
    """The template fields ``prefix`` names. Raises ``ValueError`` naming ``source_prefix`` for a
    malformed template or a field other than :data:`PREFIX_FIELDS`."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(prefix) if name is not None}
    except ValueError as err:
        raise ValueError(f"source_prefix: {prefix!r} is not a valid template ({err}); write {{{{ for a brace") from None
    unknown = sorted(names - set(PREFIX_FIELDS))
    if unknown:
        raise ValueError(
            f"source_prefix: unknown field {{{unknown[0]}}} in {prefix!r}; the fields are "
            + ", ".join(f"{{{f}}}" for f in PREFIX_FIELDS)
        )
    return names


def language_name(code: str) -> str:
    """English name of an ISO 639-1 ``code``; ``ValueError`` naming the code when unknown."""
    try:
        return LANGUAGE_NAMES[code]
    except KeyError:
        raise ValueError(
            f"source_prefix: no language name for the code {code!r} (known: {', '.join(sorted(LANGUAGE_NAMES))}); "
            "use {source_lang}/{target_lang} (the codes) in the template instead"
        ) from None


def source_text(text: str, prefix: str = "", source_lang: str | None = None, target_lang: str | None = None) -> str:
    """The encoder input text of ``text``: ``prefix`` filled in with the languages, then ``text``.

    Raises ``ValueError`` naming ``source_prefix`` when the template needs a language that is not
    given (say ``--source-lang``/``--target-lang``, or give the data's languages)."""
    if not prefix:
        return text
    names = prefix_fields(prefix)
    if not names:
        return prefix + text
    values = {}
    for side, code in (("source", source_lang), ("target", target_lang)):
        if {f"{side}_lang", f"{side}_language"} & names:
            if not code:
                raise ValueError(
                    f"source_prefix: {prefix!r} names the {side} language, which is not known for this input; "
                    f"give --{side}-lang (or data that carries it)"
                )
            values[f"{side}_lang"] = code
            if f"{side}_language" in names:
                values[f"{side}_language"] = language_name(code)
    return prefix.format(**values) + text


def parse_languages(value: str | None) -> list[str]:
    """The codes of a ``source_lang`` setting: ``"de,fr,cs"`` -> ``["de", "fr", "cs"]``; none -> ``[]``."""
    return [code for code in (value or "").split(",") if code]


def encoder_text(pair, config) -> str:
    """The encoder input text of ``pair`` (a :class:`~switchformer.data.formatting.Pair` or a
    ``(source, target)`` tuple) under ``config``'s ``source_prefix`` (``config``: a run's
    ``TrainConfig``, or anything with ``source_prefix``, ``source_lang`` and ``target_lang``): the
    pair's own languages, else the config's ``source_lang``/``target_lang`` (a ``source_lang`` of
    several codes says no one pair's language). The one formatting training and inference share."""
    config_sources = parse_languages(config.source_lang)
    source_lang = getattr(pair, "source_lang", None) or (config_sources[0] if len(config_sources) == 1 else None)
    target_lang = getattr(pair, "target_lang", None) or config.target_lang
    return source_text(pair[0], config.source_prefix, source_lang, target_lang)
