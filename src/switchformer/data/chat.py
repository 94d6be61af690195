"""The chat template of the decoder-only ``SwitchLM``: training (``objective="chat"``), ``switchformer
generate`` on a chat run and the server's ``/v1/chat/completions`` all format conversations here.

The template. Each message is::

    <|{role}|>\\n{content}</s>\\n

with ``role`` one of ``system``, ``user``, ``assistant``; a generation prompt appends::

    <|assistant|>\\n

so the model writes the assistant's content next. ``</s>`` is the tokenizer's EOS special token
(the id ``switchformer.data.tokenizer.special_ids(tok)["eos"]``), so generation stops at the end
of the assistant's turn. The role markers ``<|system|>``, ``<|user|>``, ``<|assistant|>`` are plain
text, which the BPE tokenizer (trained on the rendered conversations) learns. For example::

    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}]

renders (``render_chat(messages, add_generation_prompt=False)``) as::

    <|system|>\\nBe brief.</s>\\n<|user|>\\nHi</s>\\n<|assistant|>\\nHello.</s>\\n

Tokens: :func:`encode_chat` encodes each piece (role marker with its newline, content, the newline
after ``</s>``) on its own, without the tokenizer's added special tokens, and appends ``</s>`` by
id, so piece boundaries are exact and training and serving tokenize a conversation identically.
Content that holds a special token of the tokenizer as text (``</s>``, ``<pad>``, ...) is refused:
it would end a turn early. Its mask, the tokens the training loss is on, is True exactly on the
tokens of the assistants' contents and their closing ``</s>``; role markers, system and user
contents and the newlines are context only.

Messages are OpenAI's shape: ``{"role": ..., "content": ...}`` (other keys, such as ``name``, are
ignored); ``content`` is a string, or a list of parts ``[{"type": "text", "text": "..."}]`` whose
texts are joined with newlines.
"""

from __future__ import annotations

from dataclasses import dataclass

from switchformer.data.formatting import unicode_problem
from switchformer.data.tokenizer import special_ids

ROLES = ("system", "user", "assistant")
GENERATION_PROMPT = "<|assistant|>\n"


@dataclass
class Conversation:
    """One conversation of chat training data: its checked ``messages`` and where it was read
    (``file:line``), which data errors name."""

    messages: list[dict]
    where: str = "messages"


def role_marker(role: str) -> str:
    """``<|{role}|>\\n``: the text that opens a message of ``role``."""
    return f"<|{role}|>\n"


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _content_text(content, where: str) -> str:
    """A message's content as one string: a string as it is, a list of text parts joined with
    newlines; anything else, or text that is not valid Unicode, is a ``ValueError`` naming ``where``."""
    if isinstance(content, str):
        return _unicode(content, where)
    if not isinstance(content, list):
        raise ValueError(f"{where}: must be a string (or a list of text parts), got {_type_name(content)}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise ValueError(
                f"{where}[{j}]: must be a part object {{'type': 'text', 'text': ...}}, got {_type_name(part)}"
            )
        kind = part.get("type")
        if kind != "text":
            shown = "missing" if "type" not in part else repr(kind)
            raise ValueError(f"{where}[{j}].type: only 'text' parts are supported, got {shown}")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}[{j}].text: must be a string, got {_type_name(part.get('text'))}")
        texts.append(part["text"])
    return _unicode("\n".join(texts), where)


def _unicode(text: str, where: str) -> str:
    problem = unicode_problem(text)
    if problem is not None:
        raise ValueError(f"{where}: {problem}")
    return text


def check_messages(messages, where: str = "messages") -> list[dict]:
    """``messages`` checked and normalised: a new list of ``{"role": str, "content": str}`` (list
    contents joined, extra keys dropped). A problem is a one-line ``ValueError`` naming its place,
    starting with ``where``: ``messages[2].role: must be one of 'system', 'user', 'assistant', got
    'bot'``."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        here = f"{where}[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{here}: must be an object with 'role' and 'content', got {_type_name(message)}")
        for name in ("role", "content"):
            if name not in message:
                raise ValueError(f"{here}: missing field {name!r}")
        role = message["role"]
        if role not in ROLES:  # also a non-string role
            allowed = ", ".join(repr(r) for r in ROLES)
            raise ValueError(f"{here}.role: must be one of {allowed}, got {role!r}")
        out.append({"role": role, "content": _content_text(message["content"], f"{here}.content")})
    return out


def render_chat(messages, add_generation_prompt: bool) -> str:
    """The template (see the module's docstring) as text, ``</s>`` written out."""
    text = "".join(f"{role_marker(m['role'])}{m['content']}</s>\n" for m in check_messages(messages))
    return text + (GENERATION_PROMPT if add_generation_prompt else "")


def _special_tokens(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special and t.content]


def encode_chat(tokenizer, messages, add_generation_prompt: bool) -> tuple[list[int], list[bool]]:
    """``(ids, mask)`` of ``messages`` under the template: each piece encoded on its own (no
    added special tokens) and concatenated, ``</s>`` appended by id; ``mask`` is True exactly on
    the tokens of assistant contents and their closing ``</s>`` (the training loss's tokens).

    Raises ``ValueError`` for bad messages (see :func:`check_messages`), a content holding one of
    the tokenizer's special tokens as text (``messages[1].content: holds the special token
    '</s>'...``) or a tokenizer without ``</s>``."""
    messages = check_messages(messages)
    eos = special_ids(tokenizer)["eos"]
    if eos is None:
        raise ValueError("tokenizer: the chat template needs the '</s>' token")
    specials = _special_tokens(tokenizer)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids if text else []

    ids: list[int] = []
    mask: list[bool] = []
    for i, message in enumerate(messages):
        found = next((s for s in specials if s in message["content"]), None)
        if found is not None:
            raise ValueError(
                f"messages[{i}].content: holds the special token {found!r} as text, which the chat template "
                "reserves (the tokenizer would read it as that token, not as text)"
            )
        content = encode(message["content"])
        scored = message["role"] == "assistant"
        marker = encode(role_marker(message["role"]))
        newline = encode("\n")
        ids += marker + content + [eos] + newline
        mask += [False] * len(marker) + [scored] * (len(content) + 1) + [False] * len(newline)
    if add_generation_prompt:
        prompt = encode(GENERATION_PROMPT)
        ids += prompt
        mask += [False] * len(prompt)
    return ids, mask


def has_assistant(messages: list[dict]) -> bool:
    return any(m["role"] == "assistant" for m in messages)


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The messages before the first assistant message (all of them when there is none): the
    prompt of a conversation's first answer."""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            return messages[:i]
    return list(messages)
