"""User data: text files or folders of them, JSONL (``text``, ``source``/``target`` pairs, or chat
``messages``), TSV pairs, local Hugging Face ``datasets`` files (``.arrow``, ``.parquet``); text,
TSV and JSONL may be gzipped (``.gz``). Sentence pairs and the pairing of line-aligned files:
:mod:`switchformer.data.pairs`; chat conversations: :func:`load_conversations`. Every problem
names the file, and the line where there is one."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from switchformer.data.formatting import unicode_problem

# the one text reading lives with the run format at the ground floor; data's readers use it, and
# DataError and read_json are this module's too, for the readers of a user's files
from switchformer.runs.files import BOM, DataError, decode_text, read_json  # noqa: F401

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}


def file_name(path: Path) -> str:
    """``path``'s name without a ``.gz`` suffix: what says its format (and language)."""
    name = path.name
    return name[:-3] if name.lower().endswith(".gz") and len(name) > 3 else name


def file_kind(path: Path) -> str:
    """``"jsonl"``, ``"tsv"``, ``"dataset"`` (``.arrow``/``.parquet``) or ``"text"``, by the name's
    suffix (before an optional ``.gz``)."""
    suffix = Path(file_name(path)).suffix.lower()
    if suffix in (".arrow", ".parquet") and not path.name.lower().endswith(".gz"):
        return "dataset"
    return {".jsonl": "jsonl", ".tsv": "tsv"}.get(suffix, "text")


def read_bytes(path: Path) -> bytes:
    """The bytes of ``path``, gunzipped when its name ends in ``.gz`` (:class:`DataError` naming
    the file when that is not a complete gzip file)."""
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: not a valid gzip file ({err})") from None
    return data


def read_text(path: str | Path) -> str:
    """The text of ``path`` (gunzipped when its name ends in ``.gz``), as :func:`decode_text` reads it."""
    path = Path(path)
    return decode_text(read_bytes(path), path)


def read_stream_text(stream, name: str = "standard input") -> str:
    """All of ``stream`` (standard input) as one text, read as a file is (:func:`decode_text`)."""
    binary = getattr(stream, "buffer", None)
    return decode_text(binary.read(), name) if binary is not None else stream.read().removeprefix(BOM)


def lines(text: str) -> list[str]:
    """``text``'s lines, split at ``\n`` only (``\r\n`` ends a line too; a last newline ends the
    last line), so line numbers are an editor's and line-aligned files stay aligned: unlike
    ``str.splitlines``, form feeds, U+0085 and U+2028 inside a sentence do not end its line."""
    out = text.split("\n")
    if out and out[-1] == "":
        out.pop()
    return [line[:-1] if line.endswith("\r") else line for line in out]


def files_of(paths: list[str | Path]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such file or directory")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            if not found:
                raise DataError(f"{p}: folder holds no files")
            out.extend(found)
        else:
            out.append(p)
    return out


def read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    return [row for _, row in numbered_jsonl(path, fields)]


def numbered_jsonl(path: Path, fields: tuple[str, ...]) -> list[tuple[int, dict]]:
    """``(line number, row)`` of each non-blank line of a JSONL file; each row must hold
    ``fields`` as non-empty strings."""
    text = read_text(path)
    rows = []
    for number, line in enumerate(lines(text), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        for name in fields:
            if name not in row:
                raise DataError(f"{path}:{number}: missing field {name!r}{_chat_hint(row, fields)}")
            if not isinstance(row[name], str) or not row[name].strip():
                raise DataError(f"{path}:{number}: field {name!r} must be a non-empty string")
            if (problem := unicode_problem(row[name])) is not None:  # a JSON \ud800 escape: no tokenizer reads it
                raise DataError(f"{path}:{number}: field {name!r}: {problem}")
        rows.append((number, row))
    if not rows:
        raise DataError(f"{path}: file is empty")
    return rows


def _chat_hint(row: dict, fields: tuple[str, ...]) -> str:
    """What to do when a row that lacks ``fields`` is a chat conversation (it has ``messages``)."""
    if "messages" in row and "messages" not in fields:
        return (
            " (this row is a chat conversation, 'messages': train a language model on conversations with "
            "--model lm --set objective=chat)"
        )
    return ""


def read_hf_dataset(path: Path, fields: tuple[str, ...]) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading datasets files needs `pip install datasets`") from None
    kind = "arrow" if path.suffix.lower() == ".arrow" else "parquet"
    table = datasets.Dataset.from_file(str(path)) if kind == "arrow" else datasets.Dataset.from_parquet(str(path))
    for name in fields:
        if name not in table.column_names:
            hint = _chat_hint(dict.fromkeys(table.column_names), fields)
            raise DataError(f"{path}: missing column {name!r} (has {table.column_names}){hint}")
    rows = []
    for number, row in enumerate(table, 1):
        for name in fields:
            if not isinstance(row[name], str) or not row[name].strip():
                raise DataError(f"{path}: row {number}: field {name!r} must be a non-empty string")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: dataset is empty")
    return rows


def read_file_lines(path: Path, flag: str = "input") -> list[str]:
    """The lines of ``path``, checked whole, as every command reads a text file
    (:func:`switchformer.data.files.read_text`: UTF-8, a leading byte-order mark dropped, lines at
    ``\n``): ``ValueError`` naming ``path:line`` for bytes that are not UTF-8,
    ``FileNotFoundError`` naming a missing file."""
    if not path.exists():
        raise FileNotFoundError(f"{flag}: {path}: no such file")
    if path.is_dir():
        raise ValueError(f"{flag}: {path} is a folder; give a text file with one line per entry")
    return lines(read_text(path))  # gunzipped when the name ends in .gz, as training reads its data


def read_stream_lines(stream, name: str = "<stdin>") -> Iterator[str]:
    """The lines of ``stream`` as they arrive, by the same rules as a file (bytes decoded as UTF-8,
    naming ``name:line`` when they are not; a byte-order mark at the start dropped; a text stream is
    taken as it is)."""
    binary = getattr(stream, "buffer", None)
    for number, raw in enumerate(binary if binary is not None else stream, 1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                where = f"{name}:{number}"
                raise ValueError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start} of the line)") from None
        if number == 1:
            raw = raw.removeprefix(BOM)
        yield lines(raw)[0]  # one line: its end (\n, \r\n) dropped
