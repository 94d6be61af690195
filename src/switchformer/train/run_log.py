"""What a training run writes as it goes, on the main rank: the run directory's lock (taken before the
first write; one writer per run), ``metrics.jsonl`` (a record per log step, append-safe) and the
optional TensorBoard events."""

from __future__ import annotations

import json
import logging
import weakref
from pathlib import Path

from switchformer.runs.lock import RunLock
from switchformer.runs.metrics_log import MetricsLog, line_numbers, read_json_lines
from switchformer.runs.state import remove_leftovers
from switchformer.train.checkpoint import write_text_atomic

log = logging.getLogger("switchformer")


class RunLog:
    """The main rank's writing into ``run_dir`` (on other ranks every method does nothing).
    ``fresh``: a new run, whose ``metrics.jsonl`` starts empty; ``tensorboard``: also write
    TensorBoard events (needs ``pip install tensorboard``)."""

    def __init__(self, run_dir: Path, is_main: bool, *, fresh: bool, tensorboard: bool = False):
        self.run_dir, self.is_main = Path(run_dir), is_main
        self._lock: RunLock | None = None  # taken before this process's first write
        self._metrics: MetricsLog | None = None  # opened at the first record
        self._fresh = fresh
        self._tensorboard = None  # opened at the first record: a start that fails writes nothing
        self._writer_class = None
        if tensorboard and is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: only when asked for
            except ImportError:
                raise ValueError("tensorboard: needs `pip install tensorboard`") from None
            self._writer_class = SummaryWriter

    def claim(self) -> None:
        """Before the first write into the run directory: its lock (a clear error for a second
        writer), then what killed writers left there is removed. Released by :meth:`close`."""
        if not self.is_main or self._lock is not None:
            return
        lock = RunLock(self.run_dir).acquire()
        weakref.finalize(self, lock.release)  # a RunLog dropped without close() releases it too
        self._lock = lock
        if lock.fresh:
            remove_leftovers(self.run_dir)

    def record(self, record: dict) -> None:
        """One metrics record (its ``step``, numbers by name)."""
        if not self.is_main:
            return
        if self._metrics is None:
            self.claim()
            self._metrics = MetricsLog(self.run_dir / "metrics.jsonl", start_empty=self._fresh)
            self._fresh = False
            if self._writer_class is not None:
                self._tensorboard = self._writer_class(str(self.run_dir / "tensorboard"))
        self._metrics.write(record)
        if self._tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tensorboard.add_scalar(key, value, record["step"])

    def records_up_to(self, step: int) -> list[dict]:
        """On resume: the records of steps up to the checkpoint's, which become the history; the
        file is rewritten without the later ones (the steps about to be run again) and without a
        damaged line (cut short by the kill, not UTF-8, not a record: dropped with a warning naming
        the file and line), so each step appears once and in order."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        records, damaged = read_json_lines(path)
        if damaged:
            log.warning("%s: dropped %d damaged line(s) (cut short, not UTF-8 or not a record): line %s",
                        path, len(damaged), line_numbers(damaged))  # fmt: skip
        kept = [record for record in records if record["step"] <= step]
        if self.is_main:
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def finish(self) -> None:
        """The end of training: TensorBoard's events flushed and closed."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def close(self) -> None:
        """Close metrics.jsonl and release the run directory's lock."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
