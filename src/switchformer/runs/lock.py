"""One writer per run directory: ``RUN/.lock``, an ``flock`` on a file naming the writer."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from switchformer.runs.files import LOCK_NAME, RunInUseError, read_at, short_message, write_all

log = logging.getLogger("switchformer")


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
        data = read_at(fd, 4096, 0)
        holder = json.loads(data.decode("utf-8"))
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
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
        "command": short_message(" ".join(sys.argv), 200),
    }
    for _ in range(50):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            locked = _flock(fd)
            holder = _read_holder(fd)
            if locked is False:
                raise RunInUseError(
                    f"{run_dir}: in use by another training ({describe_holder(holder)}); "
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
                        f"{run_dir}: locked by {describe_holder(previous)}; if no training runs there any more, "
                        f"delete {path} and try again"
                    )
                log.warning(
                    "%s: took over the lock of %s, which %s",
                    run_dir,
                    describe_holder(previous),
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
