"""``metrics.jsonl``: a log of JSON records that survives kills and full disks."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from switchformer.runs.files import named_error, read_at, to_json, write_all

log = logging.getLogger("switchformer")


class MetricsLog:
    """``metrics.jsonl``, append-safe: each record is one ``write`` of one line ending in a newline;
    a write cut short by a full disk is cut back at once (the error is raised), and a line cut short
    by a kill is removed when the file is next opened, so the next record never joins it."""

    def __init__(self, path, *, start_empty: bool = False):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            if start_empty:
                os.ftruncate(self._fd, 0)
            else:
                self._cut_partial_line()
        except OSError as err:
            os.close(self._fd)
            raise named_error(err, self.path) from None
        except BaseException:
            os.close(self._fd)
            raise

    def _cut_partial_line(self) -> None:
        size = os.fstat(self._fd).st_size
        end = size
        while end > 0:
            start = max(0, end - 65536)
            chunk = read_at(self._fd, end - start, start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end != size:
            log.warning("%s: removed a record cut short at its end (%d bytes)", self.path, size - end)
            os.ftruncate(self._fd, end)

    def write(self, record: dict) -> None:
        data = (to_json(record) + "\n").encode("utf-8")
        start = os.fstat(self._fd).st_size
        try:
            write_all(self._fd, data, self.path)
        except OSError:
            try:  # no part of a record stays
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_json_lines(path) -> tuple[list[dict], list[int]]:
    """The records of a JSON-lines file and the numbers of the lines that are not records (cut
    short by a kill or a full disk, not UTF-8 text, or joined to one by an older version)."""
    records, damaged = [], []
    for number, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            damaged.append(number)
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            damaged.append(number)
    return records, damaged


def line_numbers(numbers: list[int], limit: int = 5) -> str:
    """``3, 7, 9`` (and `` ...`` past ``limit``): the damaged lines a warning names."""
    return ", ".join(map(str, numbers[:limit])) + (" ..." if len(numbers) > limit else "")


# ----------------------------------------------------------------------------- one writer
