"""Run directories that survive kills, full disks, damaged files and a second writer.

- One writer at a time: :class:`RunLock` holds ``RUN/.lock`` (an ``flock`` on a file naming the
  writer's pid and host) from the first write to the end; a second writer fails with one line naming
  the run and the pid; a lock left by a killed writer (its ``flock`` is gone with the process) is
  taken over with a warning. Under torchrun only rank 0 takes it (the other ranks write only their
  own parts of a checkpoint, inside its temporary folder).
- Every file is written atomically (:func:`write_file_atomic`: a temporary file, synced, renamed into
  place) or append-safely (:class:`MetricsLog`: one ``write`` per record ending in a newline; a
  record cut short by a full disk is removed at once, one cut by a kill when the file is next opened).
  Files and folders get the user's umask, as every other program's do.
- What killed writers leave (temporary checkpoint folders, temporary files) is removed by the next
  writer under the lock (:func:`remove_leftovers`); a fresh ``train`` over a run that never completed
  a checkpoint starts over (:func:`start_over`). A final-named checkpoint folder (``step_*``) is
  never removed: only complete saves get such a name, so an incomplete one is damage, and
  ``--resume`` stops with one line naming it (:func:`damaged_checkpoint_error`).
- Errors about a file a command reads are :class:`RunFileError`: one line naming the file and what is
  wrong with it.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("switchformer")

LOCK_NAME = ".lock"
CHECKPOINT_PREFIX = "step_"
# files a run writes atomically; `.NAME.XXXXXXXX.tmp` beside them is what a killed write leaves
ATOMIC_FILES = ("config.json", "summary.json", "tokenizer.json", "metrics.jsonl")
_TEMP_FILE = re.compile(r"^\.(" + "|".join(re.escape(n) for n in ATOMIC_FILES) + r")\.[A-Za-z0-9_]+\.tmp$")


class RunFileError(ValueError):
    """A file of a run is missing, damaged or does not fit: the message is one line that names the
    file and what is wrong with it."""

    def __init__(self, file, problem: str):
        self.file = Path(file)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.file}: {self.problem}")


class RunInUseError(FileExistsError):
    """Another process is writing the run directory."""


def one_line(text, limit: int = 300) -> str:
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
    text = one_line(err)
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


def _read_at(fd: int, size: int, offset: int) -> bytes:
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


def write_file_atomic(path, data: bytes) -> None:
    """``data`` to a temporary file beside ``path`` (the user's umask), synced, then renamed over
    ``path``: a kill or a full disk leaves the previous file (or none), never part of one, and on a
    failure the temporary file is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.chmod(tmp, default_file_mode())
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
            chunk = _read_at(self._fd, end - start, start)
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


@dataclass
class _Hold:
    fd: int
    path: Path
    count: int


_held: dict[str, _Hold] = {}
_held_guard = threading.Lock()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _read_holder(fd: int) -> dict:
    try:
        data = _read_at(fd, 4096, 0)
        holder = json.loads(data.decode("utf-8"))
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    pid, host = holder.get("pid", "unknown"), holder.get("host", "unknown host")
    started = f", started {holder['started']}" if holder.get("started") else ""
    return f"pid {pid} on {host}{started}"


def _flock(fd: int) -> bool | None:
    """True: locked; False: another open file holds it; None: this file system has no flock."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP, ...: fall back to the pid in the file


def _take_lock(run_dir: Path, path: Path) -> tuple[int, dict]:
    """Open and lock ``path``; returns the descriptor and the previous holder it replaced (empty
    when there was none)."""
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": one_line(" ".join(sys.argv), 200),
    }
    for _ in range(50):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            locked = _flock(fd)
            holder = _read_holder(fd)
            if locked is False:
                raise RunInUseError(
                    f"{run_dir}: in use by another training ({_describe(holder)}); "
                    "wait for it to finish or stop it (one writer per run directory)"
                )
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:  # released and removed while we opened it: try again
                os.close(fd)
                continue
            previous = {}
            if holder and (holder.get("pid"), holder.get("host")) != (me["pid"], me["host"]):
                previous = holder
            if previous:
                pid = previous.get("pid")
                other_host = previous.get("host") != me["host"]
                alive = isinstance(pid, int) and not other_host and _process_alive(pid)
                if other_host or (locked is None and alive):
                    raise RunInUseError(
                        f"{run_dir}: locked by {_describe(previous)}; if no training runs there any more, "
                        f"delete {path} and try again"
                    )
                log.warning(
                    "%s: took over the lock of %s, which %s",
                    run_dir,
                    _describe(previous),
                    "no longer holds it" if alive else "is no longer running",
                )
            elif holder == {} and os.fstat(fd).st_size:  # unreadable: left by a writer killed while writing it
                previous = {"pid": "unknown"}
                log.warning("%s: took over a damaged lock file left by a stopped writer", run_dir)
            data = (json.dumps(me) + "\n").encode()
            try:
                os.ftruncate(fd, 0)
                write_all(fd, data, path)
            except OSError:
                os.unlink(path)
                raise
            return fd, previous
        except BaseException:
            os.close(fd)
            raise
    raise RunInUseError(f"{run_dir}: could not take {path} (it keeps being replaced)")


def _drop_lock(hold: _Hold) -> None:
    try:
        if os.path.samestat(os.fstat(hold.fd), os.stat(hold.path)):
            os.unlink(hold.path)
    except OSError:
        pass
    os.close(hold.fd)  # releases the flock


class RunLock:
    """The lock of one run directory, held by one process at a time (re-entrant within it: a
    process is one writer however many of its objects hold the lock). ``fresh`` tells whether this
    acquisition took the lock (the caller then removes what earlier writers left); ``took_over``
    names the killed writer whose lock it replaced."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fresh = False
        self.took_over: dict = {}
        self._key: str | None = None

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> RunLock:
        if self._key is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.run_dir)
        with _held_guard:
            hold = _held.get(key)
            if hold is not None:
                hold.count += 1
                self.fresh, self.took_over = False, {}
            else:
                fd, previous = _take_lock(self.run_dir, self.path)
                _held[key] = _Hold(fd, self.path, 1)
                self.fresh, self.took_over = True, previous
            self._key = key
        return self

    def release(self) -> None:
        with _held_guard:
            if self._key is None:
                return
            key, self._key = self._key, None
            hold = _held.get(key)
            if hold is None:
                return
            hold.count -= 1
            if hold.count <= 0:
                del _held[key]
                _drop_lock(hold)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(run_dir) -> dict | None:
    """Who holds the run's lock, without taking it or creating anything (None: nobody)."""
    path = Path(run_dir) / LOCK_NAME
    if os.path.realpath(run_dir) in _held:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if _flock(fd) is False:
            return _read_holder(fd) or {"pid": "unknown"}
        return None
    finally:
        os.close(fd)  # also releases the probe's own flock


# ----------------------------------------------------------------------------- run states


_CHECKPOINT_NAME = re.compile(re.escape(CHECKPOINT_PREFIX) + r"\d+")


def is_checkpoint_folder(path: Path) -> bool:
    """A final-named checkpoint folder (``step_0000012``, complete or not; never a ``.step_*``
    temporary): only a complete save is renamed to such a name, so an incomplete one is damage
    (a file deleted or lost), never what a killed save left, and it is never removed."""
    return _CHECKPOINT_NAME.fullmatch(path.name) is not None and path.is_dir() and not path.is_symlink()


def state_value(checkpoint: Path, key: str):
    """``key`` of checkpoint ``checkpoint``'s ``state.json``, or None when the file, its JSON or
    the key is missing: for hints read beside the checked load (``read_state``), never instead."""
    try:
        state = json.loads((Path(checkpoint) / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state.get(key) if isinstance(state, dict) else None


def _dcp_format(path: Path) -> bool:
    """Whether checkpoint ``path`` was written with DCP (its ``dcp/`` folder, or its ``state.json``
    says so: the folder may be what is missing)."""
    return (path / "dcp").is_dir() or state_value(path, "checkpoint_format") == "dcp"


def checkpoint_problem(path: Path) -> str | None:
    """What makes a checkpoint folder incomplete (None: its files are in place)."""
    missing = [name for name in ("model.safetensors", "state.json") if not (path / name).is_file()]
    if _dcp_format(path) and not (path / "dcp" / ".metadata").is_file():  # DCP writes it last
        missing.append("dcp/.metadata")
    return f"incomplete checkpoint: {' and '.join(missing)} missing" if missing else None


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint folder counts once its last file (``state.json``) is in place."""
    return path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and checkpoint_problem(path) is None


def checkpoint_folders(run_dir) -> list[Path]:
    """Every final-named checkpoint folder of a run, complete or not, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_checkpoint_folder(p)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def damaged_latest_checkpoint(run_dir) -> tuple[Path, str, Path | None] | None:
    """``(folder, problem, earlier)`` when the newest final-named checkpoint folder is incomplete
    (``earlier``: the newest complete one before it, or None); None when it is complete or there
    is none."""
    folders = checkpoint_folders(run_dir)
    if not folders:
        return None
    problem = checkpoint_problem(folders[-1])
    if problem is None:
        return None
    earlier = [p for p in folders[:-1] if is_complete_checkpoint(p)]
    return folders[-1], problem, earlier[-1] if earlier else None


def damaged_checkpoint_error(run_dir) -> RunFileError | None:
    """The one-line error of ``--resume`` (and of a fresh ``train``) over a run whose latest
    checkpoint is incomplete: it names the folder and how to go on without it (None: not damaged)."""
    found = damaged_latest_checkpoint(run_dir)
    if found is None:
        return None
    folder, problem, earlier = found
    if earlier is not None:
        hint = f"to resume from {earlier.name} instead, move {folder.name} out of {folder.parent}"
    else:
        hint = (
            f"there is no earlier checkpoint: move {folder.name} out of {folder.parent} and start the run over "
            "with the `switchformer train` command that began it"
        )
    return RunFileError(folder, f"{problem}; {hint}")


def has_complete_checkpoint(run_dir) -> bool:
    root = Path(run_dir) / "checkpoints"
    return root.is_dir() and any(is_complete_checkpoint(p) for p in root.iterdir())


def remove_leftovers(run_dir) -> list[str]:
    """Remove what killed writers left: temporary checkpoint folders (``checkpoints/.step_*``, of
    saves, replacements and prunings cut short) and temporary files of atomic writes. A final-named
    checkpoint folder is never removed, complete or not (see :func:`is_checkpoint_folder`). Only
    the holder of the run's lock may call this."""
    run_dir = Path(run_dir)
    removed = []
    root = run_dir / "checkpoints"
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name.startswith("." + CHECKPOINT_PREFIX):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(f"checkpoints/{p.name}")
    if run_dir.is_dir():
        for p in sorted(run_dir.iterdir()):
            if _TEMP_FILE.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p.name)
    if removed:
        log.info("%s: removed what an interrupted writer left: %s", run_dir, ", ".join(removed))
    return removed


def looks_like_a_run(run_dir) -> bool:
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in ("config.json", "metrics.jsonl", "checkpoints", LOCK_NAME))


def not_a_run_because(run_dir) -> str | None:
    """Why the folder's run-named files are not a switchformer run's (None: they are): a
    ``config.json`` without the ``train`` and ``model`` sections, or a ``checkpoints/`` holding
    anything but checkpoint folders."""
    run_dir = Path(run_dir)
    config = run_dir / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_bytes())
        except (ValueError, UnicodeDecodeError):
            return "config.json is not JSON"
        if not (isinstance(data, dict) and isinstance(data.get("train"), dict) and isinstance(data.get("model"), dict)):
            return "config.json is not a switchformer run's config"
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        other = [p.name for p in checkpoints.iterdir() if not p.name.lstrip(".").startswith("step_")]
        if other:
            return f"checkpoints/ holds {other[0]}"
    return None


def start_over(run_dir, writer_died: bool = False) -> list[str]:
    """A fresh ``train`` over a run that stopped before completing a checkpoint (killed, out of
    disk, failed): nothing in it can be resumed, so what it wrote is removed and the run starts
    over. Other files in the folder are left alone. Only the holder of the lock may call this."""
    run_dir = Path(run_dir)
    if has_complete_checkpoint(run_dir) or checkpoint_folders(run_dir) or (run_dir / "model.safetensors").exists():
        raise FileExistsError(f"{run_dir}: holds a run with a checkpoint; it is not started over")
    if not (writer_died or looks_like_a_run(run_dir)):
        return []
    foreign = not_a_run_because(run_dir)
    if foreign:  # never delete what switchformer did not write
        raise FileExistsError(f"{run_dir}: holds files that are not a switchformer run ({foreign}); choose another "
                              "--run-name or --out-dir")  # fmt: skip
    removed = []
    for name in ("config.json", "metrics.jsonl", "summary.json", "tokenizer.json"):
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
            removed.append(name)
    for name in ("checkpoints", "tensorboard"):
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)
            removed.append(name + "/")
    removed += remove_leftovers(run_dir)
    if removed:
        log.warning(
            "%s: starting over: the run there stopped before saving a complete checkpoint; removed %s",
            run_dir,
            ", ".join(removed),
        )
    return removed


def no_checkpoint_message(run_dir) -> str:
    return (
        f"{run_dir}: no complete checkpoint to resume from: the run stopped before saving its first one; "
        "start it over with the `switchformer train` command that began it (the same --run-name: "
        "what the stopped run left is replaced)"
    )


def check_resumable(run_dir, probe_lock: bool = True) -> None:
    """Before ``train --resume``: one clear line when ``run_dir`` cannot be resumed (in use by
    another writer, when ``probe_lock``; no complete checkpoint; not a run)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not found; --resume takes a run directory")
    holder = lock_holder(run_dir) if probe_lock else None
    if holder is not None:
        raise RunInUseError(
            f"{run_dir}: in use by another training ({_describe(holder)}); wait for it to finish or stop it"
        )
    damaged = damaged_checkpoint_error(run_dir)
    if damaged is not None:
        raise damaged
    if has_complete_checkpoint(run_dir) or (run_dir / "model.safetensors").exists():
        return
    if looks_like_a_run(run_dir) or (run_dir / "tokenizer.json").exists():
        raise FileNotFoundError(no_checkpoint_message(run_dir))
    raise FileNotFoundError(f"{run_dir}: not a switchformer run (no config.json, no checkpoint)")


def claim_run(run_dir, *, resume: bool, main: bool = True) -> RunLock | None:
    """What ``train`` does before anything else: the run's lock (rank 0 only), then, under it, the
    run's state: a fresh ``train`` refuses a run that holds a checkpoint (``--resume`` it) and
    starts over one that stopped before its first; ``--resume`` needs a complete checkpoint.
    Returns the held lock (None on other ranks); the caller releases it."""
    run_dir = Path(run_dir)
    lock = RunLock(run_dir).acquire() if main else None
    try:
        if resume:
            check_resumable(run_dir, probe_lock=main)  # rank 0 holds it; the other ranks must not probe
        elif has_complete_checkpoint(run_dir) or checkpoint_folders(run_dir):
            raise FileExistsError(f"{run_dir}: already holds a run; use --resume {run_dir} or another --run-name")
        elif (run_dir / "model.safetensors").exists():
            raise FileExistsError(f"{run_dir}: holds a model (model.safetensors); choose another --run-name")
        elif lock is not None:
            start_over(run_dir, writer_died=bool(lock.took_over))
        if lock is not None and lock.fresh:
            remove_leftovers(run_dir)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock
