"""User data: text files or folders of them, JSONL (``text``, or ``source``/``target`` pairs) and
local Hugging Face ``datasets`` files (``.arrow``, ``.parquet``). Every problem names the file,
and the line where there is one."""

from __future__ import annotations

import json
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}


class DataError(ValueError):
    """Bad training data; the message names the file (and line)."""


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise DataError(f"{path}: looks binary (NUL bytes); expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _files(paths: list[str | Path]) -> list[Path]:
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


def load_text(paths: list[str | Path]) -> list[str]:
    """Documents for language modelling: one per text file, one per JSONL line (field ``text``)."""
    docs = []
    for path in _files(paths):
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            docs.extend(row["text"] for row in read_jsonl(path, ("text",)))
        elif suffix in (".arrow", ".parquet"):
            docs.extend(row["text"] for row in read_hf_dataset(path, ("text",)))
        else:
            text = _read_utf8(path).strip()
            if not text:
                raise DataError(f"{path}: file is empty")
            docs.append(text)
    return docs


def load_pairs(paths: list[str | Path]) -> list[tuple[str, str]]:
    """``(source, target)`` pairs for seq2seq (translation-style) from JSONL or datasets files."""
    pairs = []
    for path in _files(paths):
        if path.suffix.lower() in (".arrow", ".parquet"):
            rows = read_hf_dataset(path, ("source", "target"))
        elif path.suffix.lower() == ".jsonl":
            rows = read_jsonl(path, ("source", "target"))
        else:
            raise DataError(f"{path}: seq2seq pairs need a .jsonl file with 'source' and 'target' fields")
        pairs.extend((row["source"], row["target"]) for row in rows)
    return pairs


def read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    text = _read_utf8(path)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
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
                raise DataError(f"{path}:{number}: missing field {name!r}")
            if not isinstance(row[name], str) or not row[name].strip():
                raise DataError(f"{path}:{number}: field {name!r} must be a non-empty string")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: file is empty")
    return rows


def read_hf_dataset(path: Path, fields: tuple[str, ...]) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading datasets files needs `pip install datasets`") from None
    kind = "arrow" if path.suffix.lower() == ".arrow" else "parquet"
    table = datasets.Dataset.from_file(str(path)) if kind == "arrow" else datasets.Dataset.from_parquet(str(path))
    for name in fields:
        if name not in table.column_names:
            raise DataError(f"{path}: missing column {name!r} (has {table.column_names})")
    rows = []
    for number, row in enumerate(table, 1):
        for name in fields:
            if not isinstance(row[name], str) or not row[name].strip():
                raise DataError(f"{path}: row {number}: field {name!r} must be a non-empty string")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: dataset is empty")
    return rows
