"""The training data of each objective from a user's files: documents for language modelling
(:func:`load_text`) and conversations for chat (:func:`load_conversations`); sentence pairs are
:func:`switchformer.data.pairs.load_pairs`. Every problem names the file, and the line where there
is one."""

from __future__ import annotations

from pathlib import Path

from switchformer.data.chat import Conversation, check_messages, has_assistant
from switchformer.data.files import (
    DataError,
    file_kind,
    files_of,
    numbered_jsonl,
    read_hf_dataset,
    read_jsonl,
    read_text,
)


def load_text(paths: list[str | Path]) -> list[str]:
    """Documents for language modelling: one per text file, one per JSONL line (field ``text``)."""
    docs = []
    for path in files_of(paths):
        kind = file_kind(path)
        if kind == "jsonl":
            docs.extend(row["text"] for row in read_jsonl(path, ("text",)))
        elif kind == "dataset":
            docs.extend(row["text"] for row in read_hf_dataset(path, ("text",)))
        else:
            text = read_text(path).strip()
            if not text:
                raise DataError(f"{path}: file is empty")
            docs.append(text)
    return docs


def load_conversations(paths: list[str | Path]) -> list:
    """Conversations for the chat objective (:class:`~switchformer.data.chat.Conversation`, in file
    and line order): one per non-blank line of JSONL files (``.jsonl``, optionally gzipped), each
    row's ``messages`` checked by :func:`~switchformer.data.chat.check_messages`. Every problem is a
    :class:`DataError` naming the file and line (``chats.jsonl:12: messages[1].content: must be a
    string ...``); a conversation without an assistant message is refused too (it holds no token to
    learn)."""
    conversations = []
    for path in files_of(paths):
        if file_kind(path) != "jsonl":
            raise DataError(
                f"{path}: the chat objective reads conversations from JSONL files (.jsonl or .jsonl.gz), one "
                '{"messages": [{"role": "user", "content": ...}, ...]} a line'
            )
        for number, row in numbered_jsonl(path, ()):
            where = f"{path}:{number}"
            if "messages" not in row:
                raise DataError(
                    f"{where}: missing field 'messages' (a chat row is "
                    '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]})'
                )
            try:
                messages = check_messages(row["messages"])
            except ValueError as err:
                raise DataError(f"{where}: {err}") from None
            if not has_assistant(messages):
                raise DataError(
                    f"{where}: messages: no 'assistant' message; the chat objective learns only the assistant's "
                    "turns, so this conversation teaches nothing (add the answer, or leave the line out)"
                )
            conversations.append(Conversation(messages, where))
    return conversations
