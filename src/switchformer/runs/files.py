"""Files that survive kills, full disks and damage: atomic writes with the user's umask, strict JSON,
and the one reading of text files (UTF-8 by one rule) that every reader of a user's or a run's file uses.
Errors about a file are one line naming it (:class:`RunFileError`, :class:`DataError`)."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
import threading
from pathlib import Path

LOCK_NAME = ".lock"
CHECKPOINT_PREFIX = "step_"
# files a run writes atomically; `.NAME.XXXXXXXX.tmp` beside them is what a killed write leaves
ATOMIC_FILES = ("config.json", "summary.json", "tokenizer.json", "metrics.jsonl")
TEMP_FILE = re.compile(r"^\.(" + "|".join(re.escape(n) for n in ATOMIC_FILES) + r")\.[A-Za-z0-9_]+\.tmp$")


class RunFileError(ValueError):
    """A file of a run is missing, damaged or does not fit: the message is one line that names the
    file and what is wrong with it."""

    def __init__(self, file, problem: str):
        self.file = Path(file)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.file}: {self.problem}")


class RunInUseError(FileExistsError):
    """Another process is writing the run directory."""


def short_message(text, limit: int = 300) -> str:
    """``text`` (an error's) on one line and at most ``limit`` characters: what an error of ours quotes."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- file modes


_umask_guard = threading.Lock()


def current_umask() -> int:
    """The process's umask (from /proc where it can be read without changing it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_guard:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    return 0o777 & ~current_umask()


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` (0700), then the mode any other new folder would have."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, default_dir_mode())
    return path


# ----------------------------------------------------------------------------- writing


def named_error(err: BaseException, path) -> OSError:
    """``err`` (from writing ``path``) as an OSError whose message names ``path``; the errno of a
    library's error message is recovered where it gives one ("code: 28", "No space left")."""
    if isinstance(err, OSError) and err.errno is not None:
        if err.filename is not None:
            return err
        return OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))
    if isinstance(err, OSError):  # a bare OSError("message"): keep the message, add the file
        return OSError(f"{path}: {err}")
    text = short_message(err)
    code = None
    found = re.search(r"(?:code: |os error )(\d+)", text)
    if found:
        code = int(found.group(1))
    elif "No space left" in text or "StorageFull" in text:
        code = errno.ENOSPC
    else:
        try:  # a library that hides the cause: a full file system is the usual one
            stat = os.statvfs(Path(path).parent)
            if stat.f_bavail == 0:
                code = errno.ENOSPC
        except OSError:
            pass
    if code is not None:  # the cause is known: the library's wording adds nothing
        return OSError(code, os.strerror(code), str(path))
    return OSError(errno.EIO, f"{os.strerror(errno.EIO)} ({type(err).__name__}: {text})", str(path))


def read_at(fd: int, size: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # (no pread on Windows; writes here append regardless)
    return os.read(fd, size)


def write_all(fd: int, data: bytes, path) -> None:
    """All of ``data`` to ``fd`` (``os.write`` may write part of it when the disk fills)."""
    view = memoryview(data)
    try:
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written:]
    except OSError as err:
        raise named_error(err, path) from None


def fsync_file(path) -> None:
    """Flush a file written by a library (safetensors, torch.save) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        raise named_error(err, path) from None
    finally:
        os.close(fd)


def fsync_dir(path) -> None:
    """Make renames inside ``path`` durable (ignored where directories cannot be synced)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_atomic(path, data) -> None:
    """``data`` (bytes, or a function that writes to a file descriptor with :func:`write_all`) to a
    temporary file beside ``path`` (the user's umask), synced, then renamed over ``path``: a kill or
    a full disk leaves the previous file (or none), never part of one, and on a failure the
    temporary file is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.chmod(tmp, default_file_mode())
            if callable(data):
                data(fd)
            else:
                write_all(fd, data, path)
            try:
                os.fsync(fd)
            except OSError as err:
                raise named_error(err, path) from None
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def write_text_atomic(path, text: str) -> None:
    write_file_atomic(path, text.encode("utf-8"))


def finite_json(data):
    """``data`` with every non-finite float (NaN, infinity) as ``None``: JSON has no NaN, and
    other readers (jq, browsers) refuse Python's ``NaN``."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data


def to_json(data, **kwargs) -> str:
    """Strict JSON of ``data`` (non-finite numbers as null)."""
    return json.dumps(finite_json(data), allow_nan=False, **kwargs)


def write_json_atomic(path, data) -> None:
    write_text_atomic(path, to_json(data, indent=2))


# ----------------------------------------------------------------------------- reading text

class DataError(ValueError):
    """A file's content is not what it should be (bad training data, text that is not UTF-8, JSON that
    does not parse); the message names the file (and line)."""


# The one reading of text files everywhere (training data, --valid, translate's input, eval's data,
# prompts, config files, tokenizer and model JSON): UTF-8, a byte-order mark at the very start dropped
# (Windows editors and Excel write one; it is no part of the first line), "\r\n" line ends read as
# "\n", lines split at "\n" only.
BOM = "\ufeff"


def decode_text(data: bytes, name: str | Path) -> str:
    """``data`` (a file's bytes) as UTF-8 text without a leading byte-order mark, its ``\r\n`` line
    ends as ``\n``; a :class:`DataError` naming ``name`` and the line for bytes that are not UTF-8,
    and for a file that looks binary (NUL bytes)."""
    if b"\x00" in data[:8192]:
        raise DataError(f"{name}: looks binary (NUL bytes); expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{name}:{line}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    return text.removeprefix(BOM).replace("\r\n", "\n")


def read_json(path: str | Path):
    """The JSON value of a file (a config.json, an index), read as every text file is; a
    :class:`DataError` naming the file, line and column when it is not JSON."""
    path = Path(path)
    try:
        return json.loads(decode_text(path.read_bytes(), path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
