"""Run directories under failure: kills at every phase of a
run and of a checkpoint save, a full disk at each kind of write, every run file damaged in each way,
two writers, and the modes of what a run writes.

A kill is simulated by copying the run directory at the moment it would happen (what a SIGKILL
leaves is exactly what is on disk then; every write here is unbuffered or atomic), with the copy's
lock naming a process that has exited. A full disk is simulated by failing ``os.write`` for the
file in question with ENOSPC after part of the data (or the library writers after half a file).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import shared
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from switchformer.analysis.plots import read_metrics
from switchformer.cli import main
from switchformer.data import tokenizer as tokenizer_module
from switchformer.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from switchformer.runs import directory as run_directory
from switchformer.runs import files as run_files
from switchformer.runs import metrics_log as metrics_log_module
from switchformer.runs import state as run_state
from switchformer.runs.files import LOCK_NAME, RunFileError, RunInUseError
from switchformer.runs.lock import RunLock
from switchformer.runs.metrics_log import MetricsLog
from switchformer.train import checkpoint as checkpoint_module
from switchformer.train import trainer as trainer_module
from switchformer.train.checkpoint import latest_checkpoint, list_checkpoints

pytestmark = [pytest.mark.slow]

TEXT = shared.TEXT * 30
CORPUS_DOCS, CORPUS_REPEATS = 4, 30  # the conftest corpus: 4 documents
STEPS = 12


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory) -> list[str]:
    """`train` flags of every run here: the test preset, a tokenizer trained once, checkpoints at
    4, 8, 12 (one kept), evaluations at 4, 8, 12, dropout and jitter (so the RNG state matters)."""
    tokenizer = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_tokenizer([TEXT], vocab_size=400), tokenizer)
    sets = dict(
        vocab_size=400,
        tokenizer=tokenizer,
        keep_last=1,
        eval_every=4,
        checkpoint_every=4,
        log_every=1,
        router_jitter_noise=0.05,
        dropout=0.1,
    )
    flags = ["--preset", "test", "--data", str(corpus), "--no-progress", "--max-steps", str(STEPS)]
    return flags + [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def train(base, run: Path, *extra) -> int:
    return main(["train", *base, "--out-dir", str(run.parent), "--run-name", run.name, *extra])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("switchformer: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "weights_only" not in err, err
    return lines[0]


def assert_clean(run: Path) -> None:
    """Nothing left behind: no lock, no temporary file or checkpoint folder, every checkpoint
    complete, every metrics line a whole record. A run that could not start may leave no folder."""
    if not run.exists():
        return
    assert not (run / LOCK_NAME).exists()
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    if (run / "checkpoints").exists():
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert names == [p.name for p in list_checkpoints(run)], names
    if (run / "metrics.jsonl").exists():
        text = (run / "metrics.jsonl").read_text()
        assert not text or text.endswith("\n")
        records(run)  # every line parses


def assert_same_run(run: Path, reference: Path) -> None:
    """The recovered run logs what the uninterrupted one did: each step once, in order, the same
    losses; one evaluation at 4, 8 and 12; time never goes backwards; nothing left behind."""
    got, want = records(run), records(reference)
    train_got = [r for r in got if "ce_loss" in r]
    train_want = [r for r in want if "ce_loss" in r]
    assert [r["step"] for r in train_got] == list(range(1, STEPS + 1))
    for a, b in zip(train_got, train_want):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a["step"], a["loss"], b["loss"])
    evals = [r for r in got if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]
    for a, b in zip(evals, [r for r in want if "eval_loss" in r]):
        assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-6
    times = [r["time"] for r in got]
    assert times == sorted(times)
    assert json.loads((run / "summary.json").read_text())["step"] == STEPS
    assert [p.name for p in list_checkpoints(run)] == ["step_0000012"]
    assert_clean(run)


def recover(base, run: Path, capsys) -> None:
    """What a user does after a kill or a full disk: --resume; if that says there is no complete
    checkpoint, the same `train` command again (which starts over)."""
    capsys.readouterr()
    if main(["train", "--resume", str(run), "--no-progress"]) != 0:
        line = error_line(capsys)
        stopped = "no complete checkpoint to resume from" in line and "start it over" in line
        assert stopped or "not a switchformer run" in line or ": not found" in line, line  # (a start that failed early)
        assert train(base, run) == 0
    capsys.readouterr()


# ----------------------------------------------------------------------------- kills


SNAPSHOTS = [
    "after-tokenizer",
    "after-config",
    "before-first-checkpoint",
    *[f"save4-{phase}" for phase in ("begin", "model", "state", "optimizer", "marked", "renamed")],
    "between-checkpoints",
    "cut-metrics-line",
    *[f"save8-{phase}" for phase in ("begin", "model", "state", "optimizer", "marked", "renamed", "pruning")],
    "after-final-checkpoint",
    "finished",
]


@pytest.fixture(scope="module")
def killed(base, tmp_path_factory):
    """One uninterrupted run (umask 022), copied at every moment a kill could stop it: between its
    first writes, inside each phase of a checkpoint save, between checkpoints, after the last."""
    root = tmp_path_factory.mktemp("killed")
    run = root / "straight" / "run"
    pid = dead_pid()
    taken: dict[str, Path] = {}

    def snapshot(label: str) -> None:
        if label in taken or label not in SNAPSHOTS:
            return
        copy = root / label / "run"
        shutil.copytree(run, copy, symlinks=True)
        lock = copy / LOCK_NAME
        if lock.exists():  # the copy's writer is gone: its lock names a process that has exited
            holder = json.loads(lock.read_text())
            lock.write_text(json.dumps(dict(holder, pid=pid)))
        taken[label] = copy

    def step_of(path) -> int:
        return int(re.search(r"step_(\d+)", str(path)).group(1))

    real = types.SimpleNamespace(
        make_temp_dir=checkpoint_module.make_temp_dir,
        save_file=checkpoint_module.save_file,
        write_file_atomic=checkpoint_module.write_file_atomic,
        replace_dir=checkpoint_module._replace_dir,
        torch_save=torch.save,
        text_atomic=run_files.write_text_atomic,
        json_atomic=trainer_module.write_json_atomic,
        metrics_write=MetricsLog.write,
        rmtree=shutil.rmtree,
    )

    def make_temp_dir(parent, prefix):
        path = real.make_temp_dir(parent, prefix)
        snapshot(f"save{step_of(path)}-begin")
        return path

    def save_file_hook(weights, file):
        real.save_file(weights, file)
        snapshot(f"save{step_of(file)}-model")

    def write_file_atomic(path, data):
        real.write_file_atomic(path, data)
        if Path(path).name == "state.json.part":
            snapshot(f"save{step_of(path)}-state")

    def torch_save(obj, file, *args, **kwargs):
        real.torch_save(obj, file, *args, **kwargs)
        if "step_" in str(file):
            snapshot(f"save{step_of(file)}-optimizer")

    def replace_dir(src, dst):
        snapshot(f"save{step_of(dst)}-marked")
        real.replace_dir(src, dst)
        snapshot(f"save{step_of(dst)}-renamed")

    def rmtree(path, *args, **kwargs):
        if str(path).endswith(".removed"):  # pruning: killed with part of the folder gone
            next(p for p in Path(path).iterdir() if p.name == "model.safetensors").unlink()
            snapshot("save8-pruning")
        real.rmtree(path, *args, **kwargs)

    def text_atomic(path, text):
        real.text_atomic(path, text)
        if Path(path).name == "tokenizer.json":
            snapshot("after-tokenizer")

    def json_atomic(path, data):
        if Path(path).name == "summary.json":
            snapshot("after-final-checkpoint")
        real.json_atomic(path, data)
        if Path(path).name == "config.json":
            snapshot("after-config")

    def metrics_write(self, record):
        real.metrics_write(self, record)
        if record.get("step") == 2:
            snapshot("before-first-checkpoint")
        if record.get("step") == 6:
            snapshot("between-checkpoints")

    mask = os.umask(0o022)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(checkpoint_module, "make_temp_dir", make_temp_dir)
            mp.setattr(checkpoint_module, "save_file", save_file_hook)
            mp.setattr(checkpoint_module, "write_file_atomic", write_file_atomic)
            mp.setattr(checkpoint_module, "_replace_dir", replace_dir)
            mp.setattr(checkpoint_module, "shutil", types.SimpleNamespace(rmtree=rmtree))
            mp.setattr(torch, "save", torch_save)
            mp.setattr(tokenizer_module, "write_text_atomic", text_atomic)  # the tokenizer is saved with it
            mp.setattr(trainer_module, "write_json_atomic", json_atomic)  # summary.json
            mp.setattr(run_directory, "write_json_atomic", json_atomic)  # config.json, by the run's one writer
            mp.setattr(MetricsLog, "write", metrics_write)
            assert train(base, run) == 0
    finally:
        os.umask(mask)
    snapshot("finished")
    cut = root / "cut-metrics-line" / "run"
    shutil.copytree(taken["between-checkpoints"], cut)
    with (cut / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 2.')  # killed in the middle of a record
    taken["cut-metrics-line"] = cut
    assert sorted(taken) == sorted(SNAPSHOTS)
    return run, taken


def test_the_uninterrupted_run_is_whole(killed):
    run, _ = killed
    assert_same_run(run, run)


@pytest.mark.parametrize("moment", SNAPSHOTS)
def test_a_kill_at_any_moment_is_resumed_or_restarted_exactly(killed, base, moment, tmp_path, capsys, caplog):
    """--resume continues from the last complete checkpoint (or, with none, the same `train`
    starts over): the same losses as the uninterrupted run, each step and evaluation once, the final
    evaluation never twice, and nothing the killed writer left behind (temporary checkpoint
    folders, half-pruned ones, temporary files, its lock) survives."""
    reference, taken = killed
    run = tmp_path / "run"
    shutil.copytree(taken[moment], run)  # (the snapshots stay as they are for other tests)
    had_checkpoint = latest_checkpoint(run) is not None
    recover(base, run, capsys)
    assert_same_run(run, reference)
    if moment != "finished":
        assert "took over the lock of pid" in caplog.text  # the dead writer's lock, with a warning
    if not had_checkpoint:
        assert "starting over" in caplog.text


# ----------------------------------------------------------------------------- full disk


class FullDisk:
    """``os.write`` to files named like ``pattern`` fails with ENOSPC once ``skip`` such writes
    have gone through: the failing one writes part of its data first, as a filling disk does."""

    def __init__(self, monkeypatch, pattern: str, skip: int = 0):
        self.pattern, self.skip, self.hits = re.compile(pattern), skip, 0
        real = os.write

        def write(fd, data):
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            if self.pattern.fullmatch(name):
                self.hits += 1
                if self.hits > self.skip:
                    real(fd, bytes(data)[: max(1, len(data) // 2)])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data)

        monkeypatch.setattr(os, "write", write)


def full_disk_library(monkeypatch, which: str, skip: int) -> None:
    """safetensors or torch.save on a full disk: half the file written, then the library's own error."""
    count = {"n": 0}
    real_save_file, real_torch_save = checkpoint_module.save_file, torch.save

    def half(file) -> None:
        data = Path(file).read_bytes()
        Path(file).write_bytes(data[: len(data) // 2])

    def save_file(weights, file):
        count["n"] += 1
        real_save_file(weights, file)
        if count["n"] > skip:
            half(file)
            message = 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
            raise SafetensorError(f"Error while serializing: {message}")

    def torch_save(obj, file, *args, **kwargs):
        real_torch_save(obj, file, *args, **kwargs)
        if "step_" in str(file):
            count["n"] += 1
            if count["n"] > skip:
                half(file)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    if which == "model.safetensors":
        monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    else:
        monkeypatch.setattr(torch, "save", torch_save)


# (name in the error, how the disk fills, how many such writes succeed first)
FULL_DISK = {
    "tokenizer.json": (r"\.tokenizer\.json\..*\.tmp", 0),
    "lock": (r"\.lock", 0),
    "config.json": (r"\.config\.json\..*\.tmp", 0),
    "metrics.jsonl-first-record": (r"metrics\.jsonl", 0),
    "metrics.jsonl-after-a-checkpoint": (r"metrics\.jsonl", 7),
    "model.safetensors-first-save": ("library", 0),
    "state.json-second-save": (r"\.state\.json\.part\..*\.tmp", 1),
    "optimizer.pt-second-save": ("library", 1),
    "summary.json": (r"\.summary\.json\..*\.tmp", 0),
}


@pytest.mark.parametrize("case", sorted(FULL_DISK))
def test_a_full_disk_at_each_kind_of_write(killed, base, tmp_path, case, capsys, monkeypatch):
    """The write fails with one line naming the file; what was being written is gone (no partial
    file, no partial metrics line, no temporary folder, no lock); after space is freed, --resume
    (or the same `train`, with no complete checkpoint) ends as the uninterrupted run did."""
    reference, _ = killed
    run = tmp_path / "run"
    pattern, skip = FULL_DISK[case]
    file = case.split("-")[0]
    with monkeypatch.context() as mp:
        if pattern == "library":
            full_disk_library(mp, file, skip)
        else:
            FullDisk(mp, pattern, skip)
        assert train(base, run) == 2
    line = error_line(capsys)
    assert (LOCK_NAME if file == "lock" else file) in line, line
    if pattern != "library":
        assert "No space left on device" in line, line
    assert_clean(run)
    if (run / "tokenizer.json").exists():
        load_tokenizer(run / "tokenizer.json")  # whole, never truncated
    recover(base, run, capsys)
    assert_same_run(run, reference)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of a few hundred kB (only where the tests run as root and may mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a real full disk needs root (the simulated ones above run everywhere)")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")

    def resize(kb: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kb}k", str(mount)], check=True, capture_output=True)

    try:
        yield mount, resize
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_real_full_disk_at_every_size(killed, base, small_tmpfs, capsys):
    """A real small file system filled by a run at different points (the tokenizer, metrics, each
    checkpoint file): one line naming the file, nothing left behind, and once the disk is
    enlarged the run is recovered to the same losses."""
    reference, _ = killed
    mount, resize = small_tmpfs
    failed = set()
    for kb in (24, 40, 100, 250, 400, 700, 900, 1100, 1300):
        resize(kb)
        run = mount / f"run{kb}"
        if train(base, run) == 2:
            line = error_line(capsys)
            assert "No space left on device" in line and str(run) in line, line
            failed.add(Path(line.split("error: ", 1)[1].split(": No space left on device")[0]).name)
            assert_clean(run)
        resize(8192)
        recover(base, run, capsys)
        assert_same_run(run, reference)
        shutil.rmtree(run)
    assert {"model.safetensors", "optimizer.pt"} <= failed and len(failed) >= 4, failed


def test_a_full_disk_while_resume_rewrites_metrics(killed, base, tmp_path, capsys, monkeypatch):
    reference, taken = killed
    run = tmp_path / "run"
    shutil.copytree(taken["between-checkpoints"], run)
    before = (run / "metrics.jsonl").read_bytes()
    with monkeypatch.context() as mp:
        FullDisk(mp, r"\.metrics\.jsonl\..*\.tmp")
        assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "metrics.jsonl" in error_line(capsys)
    assert (run / "metrics.jsonl").read_bytes() == before
    assert_clean(run)
    recover(base, run, capsys)
    assert_same_run(run, reference)


def test_metrics_log_never_glues_records(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # a record cut by a kill
    log = MetricsLog(path)
    log.write({"step": 2, "loss": 2.0})
    with monkeypatch.context() as mp:
        FullDisk(mp, r"metrics\.jsonl")
        with pytest.raises(OSError, match="No space left on device.*metrics.jsonl"):
            log.write({"step": 3, "loss": 3.0})
    log.write({"step": 3, "loss": 3.0})
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_report_reads_metrics_with_damaged_lines(tmp_path, capsys):
    """A line cut short at the end, or one an older version glued to the next, is skipped (with a
    warning); the rest is read."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "ce_loss": 3.0}\n{"step": 2, "ce_lo{"step": 3, "ce_loss": 2.5}\n{"step": 4, "ce_loss": 2.0}\n{"st'
    )
    assert [r["step"] for r in read_metrics(run)] == [1, 4]
    (run / "metrics.jsonl").write_text('{"st')
    with pytest.raises(ValueError, match="metrics.jsonl: no readable record"):
        read_metrics(run)


# ----------------------------------------------------------------------------- damaged files


def _tensor_swap(name_filter, change):
    def damage(file: Path) -> None:
        state = load_file(str(file))
        name = sorted(n for n in state if name_filter(n, state[n]))[0]
        state[name] = change(state[name])
        save_file(state, str(file))

    return damage


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _optimizer_moment(change, field="exp_avg"):
    def damage(file: Path) -> None:
        saved = torch.load(file, weights_only=True)
        entry = saved["state"][min(saved["state"])]
        entry[field] = change(entry[field])
        torch.save(saved, file)

    return damage


class _Planted:
    """A pickle that would create a file if it ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _state(change):
    def damage(file: Path) -> None:
        state = json.loads(file.read_text())
        change(state)
        file.write_text(json.dumps(state))

    return damage


def _weights_2d(n, t):
    return t.dim() == 2 and t.dtype == torch.float32


# file -> damage -> what the one-line error says
DAMAGES = {
    "model.safetensors": {
        "truncated": (_truncate, r"damaged or not a safetensors file \(incomplete metadata"),
        "garbage": (lambda f: f.write_bytes(b"\x93garbage" * 100), "damaged or not a safetensors file"),
        "empty": (lambda f: f.write_bytes(b""), "damaged or not a safetensors file"),
        "wrong shape": (
            _tensor_swap(_weights_2d, lambda t: torch.zeros(t.shape[0] + 1, t.shape[1])),
            r"tensor \S+ has shape \[\d+, \d+\]; the model expects \[\d+, \d+\]",
        ),
        "wrong dtype": (_tensor_swap(_weights_2d, lambda t: t.to(torch.int64)), r"tensor \S+ is int64; the model's"),
        "lossy dtype": (
            _tensor_swap(_weights_2d, lambda t: t.double() + 1e-12),
            r"tensor \S+ is float64, and converting it to the model's float32 would change its values",
        ),
        "nan": (
            _tensor_swap(_weights_2d, lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
            r"tensor \S+ holds non-finite values",
        ),
        "missing tensor": (
            lambda f: save_file(dict(list(load_file(str(f)).items())[1:]), str(f)),
            "tensors do not match the model: missing",
        ),
    },
    "optimizer.pt": {
        "truncated": (_truncate, "damaged or not a PyTorch checkpoint"),
        "garbage": (lambda f: f.write_bytes(b"garbage" * 50), "damaged or not a PyTorch checkpoint"),
        "planted pickle": (
            lambda f: torch.save({"state": _Planted(f.parent / "PWNED"), "param_groups": []}, f),
            r"refused: it holds objects other than tensors and plain values \(\w+\.system\)",
        ),
        "wrong shape": (_optimizer_moment(lambda t: torch.zeros(3)), r"state exp_avg of \S+ has shape \[3\]"),
        "nan": (
            _optimizer_moment(lambda t: torch.full_like(t, float("inf"))),
            r"state exp_avg of \S+ holds non-finite",
        ),
        "not a state": (lambda f: torch.save({"x": torch.zeros(1)}, f), "not an optimizer state"),
        "negative second moment": (
            _optimizer_moment(lambda t: t.flatten().index_fill(0, torch.tensor([0]), -1.0).view_as(t), "exp_avg_sq"),
            r"state exp_avg_sq of \S+ holds negative values",
        ),
    },
    "state.json": {
        "bad JSON": (lambda f: f.write_text('{"step": 4,'), r"invalid JSON at line 1, column \d+"),
        "not an object": (lambda f: f.write_text("[4]"), "expected a JSON object"),
        "missing step": (_state(lambda s: s.pop("step")), "'step' is missing"),
        "step a string": (_state(lambda s: s.update(step="12")), "'step' must be an integer >= 0, got '12'"),
        "other step": (_state(lambda s: s.update(step=8)), "says step 8, but it is in step_0000012"),
        "missing rng": (_state(lambda s: s.pop("rng")), "'rng' is missing"),
        "bad rng": (_state(lambda s: s.update(rng="!!")), "'rng' is not valid base64"),
        "short rng": (_state(lambda s: s.update(rng="AAAA")), "'rng' holds 3 bytes"),
        "nan time": (_state(lambda s: s.update(train_time=float("nan"))), "'train_time' must be a finite number"),
    },
    "tokenizer.json": {
        "truncated": (_truncate, r"not a valid tokenizer file, or damaged \(EOF while parsing"),
        "garbage": (lambda f: f.write_bytes(b"\xff\xfe" * 40), "not UTF-8 text"),
        "empty": (lambda f: f.write_text(""), "not a valid tokenizer file"),
        "other JSON": (lambda f: f.write_text('{"model": 1}'), "not a valid tokenizer file"),
    },
}
DAMAGE_CASES = [(file, how) for file, hows in DAMAGES.items() for how in hows]


@pytest.mark.parametrize("file,how", DAMAGE_CASES, ids=[f"{f}-{h}" for f, h in DAMAGE_CASES])
def test_a_damaged_file_is_one_line_naming_it(killed, tmp_path, file, how, capsys):
    """Every file `train --resume` reads (and `eval`, `generate`, `info` of the model and
    tokenizer) is checked on load; a damaged one is one line naming the file and what is wrong,
    never advice to load unsafely, nothing of a planted pickle runs, and the run is not changed."""
    finished, _ = killed
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    target = run / file if file == "tokenizer.json" else latest_checkpoint(run) / file
    damage, expected = DAMAGES[file][how]
    damage(target)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    line = error_line(capsys)
    assert f"{target}: " in line and re.search(expected, line), line
    if file in ("model.safetensors", "tokenizer.json"):
        assert main(["generate", str(run), "--prompt", "The", "--max-new-tokens", "2"]) == 2
        line = error_line(capsys)
        assert f"{target}: " in line and re.search(expected, line), line
    assert not (run / "PWNED").exists() and not (target.parent / "PWNED").exists()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert_clean(run)


def test_a_damaged_checkpoint_names_the_one_before_it(killed, base, tmp_path, capsys):
    """With an earlier complete checkpoint, the error says how to resume from it; doing so works."""
    _, taken = killed
    run = tmp_path / "run"
    shutil.copytree(taken["save8-renamed"], run)  # step_0000004 and step_0000008, both complete
    (run / "checkpoints" / "step_0000008" / "optimizer.pt").write_bytes(b"garbage")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    line = error_line(capsys)
    assert "optimizer.pt: damaged" in line and "to resume from step_0000004 instead, move step_0000008 out of" in line
    shutil.move(run / "checkpoints" / "step_0000008", tmp_path / "damaged")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0


def test_a_lossless_dtype_is_accepted(killed, tmp_path, capsys):
    """bfloat16 weights in a float32 model lose nothing when converted: loaded."""
    finished, _ = killed
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    file = latest_checkpoint(run) / "model.safetensors"
    state = load_file(str(file))
    name = sorted(n for n in state if _weights_2d(n, state[n]))[0]
    state[name] = state[name].bfloat16()
    save_file(state, str(file))
    assert main(["generate", str(run), "--prompt", "The", "--max-new-tokens", "2", "--greedy"]) == 0


def test_run_file_errors_are_value_errors_of_one_line(tmp_path):
    err = RunFileError(tmp_path / "x.json", "bad\nthing   here")
    assert isinstance(err, ValueError) and str(err) == f"{tmp_path / 'x.json'}: bad thing here"


# ----------------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_and_the_first_is_intact(base, tmp_path, capsys):
    """A run being trained (another process) cannot be trained or resumed by a second: one line
    naming the run and the writer's pid; the first's metrics have each step once, in order."""
    run = tmp_path / "run"
    steps = 400
    args = [a if a != str(STEPS) else str(steps) for a in base]
    args = [*args, "--set", "checkpoint_every=100", "--set", "eval_every=1000"]
    first = subprocess.Popen(
        [sys.executable, "-m", "switchformer", "train", *args, "--out-dir", str(tmp_path), "--run-name", "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (run / "config.json").exists():  # holding the lock, training
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline
            time.sleep(0.02)
        assert main(["train", *args, "--out-dir", str(tmp_path), "--run-name", "run"]) == 2
        line = error_line(capsys)
        assert f"{run}: in use by another training (pid {first.pid} on " in line, line
        if first.poll() is None:
            assert main(["train", "--resume", str(run), "--no-progress"]) == 2
            assert f"(pid {first.pid} on " in error_line(capsys)
        assert first.wait(timeout=240) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    train_steps = [r["step"] for r in records(run) if "ce_loss" in r]
    assert train_steps == list(range(1, steps + 1))
    assert_clean(run)


def test_lock_is_reentrant_in_one_process_and_exclusive_across(tmp_path):
    run = tmp_path / "run"
    with RunLock(run) as outer:
        assert outer.fresh and (run / LOCK_NAME).exists()
        holder = json.loads((run / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
        with RunLock(run) as inner:
            assert not inner.fresh
        assert (run / LOCK_NAME).exists()  # still held by the outer one
        code = (
            "import sys\nfrom switchformer.runs.lock import RunLock\n"
            "from switchformer.runs.files import RunInUseError\n"
            f"try:\n    RunLock({str(run)!r}).acquire()\nexcept RunInUseError as e:\n    print(e); sys.exit(3)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 3 and f"pid {os.getpid()} on" in out.stdout
    assert not (run / LOCK_NAME).exists()


def test_a_dead_writers_lock_is_taken_over_another_hosts_is_not(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / LOCK_NAME
    lock.write_text(json.dumps({"pid": dead_pid(), "host": os.uname().nodename}))
    with RunLock(run) as taken:
        assert taken.took_over
    assert "took over the lock of pid" in caplog.text and "no longer running" in caplog.text
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(RunInUseError, match=r"locked by pid 1 on elsewhere\.example.*delete .*\.lock"):
        RunLock(run).acquire()
    assert lock.exists()  # not ours to remove


def test_only_rank_0_locks(tmp_path):
    from switchformer.runs.state import claim_run

    assert claim_run(tmp_path / "run", resume=False, main=False) is None
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_fresh_train_over_a_run_with_a_checkpoint_is_refused(killed, base, tmp_path, capsys):
    finished, _ = killed
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    assert train(base, run) == 2
    assert f"{run}: already holds a run; use --resume {run}" in error_line(capsys)
    assert main(["train", "--resume", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "not found; --resume takes a run directory" in error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "not a switchformer run" in error_line(capsys)


# ----------------------------------------------------------------------------- file modes


def _modes(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mode & 0o777 for p in [run, *run.rglob("*")]}


def test_files_and_folders_get_the_umask(killed, base, tmp_path):
    """config.json, summary.json, model.safetensors, checkpoint folders: like every other file."""
    finished, _ = killed  # written under umask 022
    modes = _modes(finished)
    assert {name for name, mode in modes.items() if mode not in (0o644, 0o755)} == set(), modes
    assert modes["checkpoints/step_0000012"] == 0o755 and modes["config.json"] == 0o644
    assert modes["checkpoints/step_0000012/model.safetensors"] == 0o644
    mask = os.umask(0o027)
    try:
        assert train(base, tmp_path / "run", "--max-steps", "4") == 0
    finally:
        os.umask(mask)
    modes = _modes(tmp_path / "run")
    files = {name for name in modes if (tmp_path / "run" / name).is_file()}
    assert {modes[n] for n in files} == {0o640} and {m for n, m in modes.items() if n not in files} == {0o750}


# ----------------------------------------------------------------------------- non-finite and damaged checkpoints


def test_a_non_finite_model_is_never_saved(base, tmp_path, capsys, caplog):
    """lr=1e39 makes the weights infinite after step 1: steps 2-4 are skipped (the warning numbers
    them as metrics.jsonl does), the save at step 4 stops with one line, nothing is saved, and the
    same command can be run again (it starts over rather than being refused)."""
    run = tmp_path / "run"
    bad = ("--set", "lr=1e39", "--set", "warmup_steps=0")
    assert train(base, run, *bad) == 2
    line = error_line(capsys)
    assert "step 4: weight " in line and "holds non-finite values" in line, line
    assert "its checkpoint is not saved and no checkpoint was saved before it" in line, line
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())
    skipped = [r["step"] for r in records(run) if r.get("skipped")]
    warned = [int(n) for n in re.findall(r"step (\d+): non-finite loss or gradient, step skipped", caplog.text)]
    assert skipped and warned == skipped, (warned, skipped)
    caplog.clear()
    assert train(base, run, *bad) == 2  # started over, not "already holds a run"
    assert "step 4: weight " in error_line(capsys)
    assert "starting over" in caplog.text


def test_a_non_finite_model_keeps_the_last_good_checkpoint(killed, tmp_path, capsys, monkeypatch):
    """Weights turned NaN after step 7 of a resumed run: the save at step 8 is refused naming the
    step and the kept checkpoint; step_0000004 is neither replaced nor pruned, and still resumes."""
    _, taken = killed
    run = tmp_path / "run"
    shutil.copytree(taken["between-checkpoints"], run)
    real_step = trainer_module.Trainer.train_step

    def poisoned(self):
        result = real_step(self)
        if self.step == 7:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return result

    monkeypatch.setattr(trainer_module.Trainer, "train_step", poisoned)
    before = (run / "checkpoints" / "step_0000004" / "model.safetensors").read_bytes()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    line = error_line(capsys)
    assert "step 8: " in line and "non-finite" in line, line
    assert f"the last good checkpoint, {run / 'checkpoints' / 'step_0000004'}, is kept" in line, line
    assert [p.name for p in list_checkpoints(run)] == ["step_0000004"]
    assert (run / "checkpoints" / "step_0000004" / "model.safetensors").read_bytes() == before
    assert_clean(run)
    monkeypatch.setattr(trainer_module.Trainer, "train_step", real_step)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0


def test_negative_adafactor_second_moments_are_refused(tmp_path):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adafactor(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    checkpoint_module.check_optimizer_state(tmp_path / "optimizer.pt", saved, optimizer)
    for field in ("row_var", "variance"):
        entry = next(e for e in saved["state"].values() if field in e)
        good = entry[field].clone()
        entry[field].view(-1)[0] = -1.0
        with pytest.raises(RunFileError, match=rf"optimizer.pt: state {field} of \S+ \S+ holds negative values"):
            checkpoint_module.check_optimizer_state(tmp_path / "optimizer.pt", saved, optimizer)
        entry[field] = good


@pytest.mark.parametrize("missing", ["model.safetensors", "state.json"])
def test_a_damaged_latest_checkpoint_is_named_not_skipped(killed, base, tmp_path, missing, capsys, caplog):
    """An incomplete final-named checkpoint is damage, not a killed save's leftover: --resume
    stops naming it and how to resume from the one before (nothing is removed), generate warns
    naming the one it uses, and resuming works once the damaged folder is moved out."""
    _, taken = killed
    run = tmp_path / "run"
    shutil.copytree(taken["save8-renamed"], run)  # step_0000004 and step_0000008, both complete
    damaged = run / "checkpoints" / "step_0000008"
    (damaged / missing).unlink()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    line = error_line(capsys)
    assert f"{damaged}: incomplete checkpoint: {missing} missing" in line, line
    assert f"to resume from step_0000004 instead, move step_0000008 out of {run / 'checkpoints'}" in line, line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # optimizer.pt too
    assert train(base, run) == 2 and "already holds a run" in error_line(capsys)
    caplog.clear()
    assert main(["generate", str(run), "--prompt", "The", "--max-new-tokens", "2"]) == 0
    assert f"{damaged}: incomplete checkpoint: {missing} missing; using step_0000004" in caplog.text
    shutil.move(damaged, tmp_path / "damaged")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0


def test_a_damaged_only_checkpoint_says_to_start_over(killed, tmp_path, capsys):
    finished, _ = killed
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "checkpoints" / "step_0000012" / "state.json").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    line = error_line(capsys)
    assert "step_0000012: incomplete checkpoint: state.json missing; there is no earlier checkpoint" in line, line
    assert "start the run over" in line
    assert (run / "checkpoints" / "step_0000012" / "optimizer.pt").exists()


def test_leftover_cleanup_removes_only_temporaries(tmp_path):
    root = tmp_path / "checkpoints"
    for name in (".step_0000004.abc", ".step_0000008.removed", "step_0000012"):
        (root / name).mkdir(parents=True)
        (root / name / "optimizer.pt").write_bytes(b"x")
    removed = run_state.remove_leftovers(tmp_path)
    assert sorted(removed) == ["checkpoints/.step_0000004.abc", "checkpoints/.step_0000008.removed"]
    assert [p.name for p in root.iterdir()] == ["step_0000012"]


def test_a_metrics_line_that_is_not_utf8_is_dropped_with_a_warning(killed, base, tmp_path, capsys, caplog):
    """A byte that is not UTF-8 in metrics.jsonl: --resume drops the line (a step after the
    checkpoint, so it is run again) with a warning naming the file and line; report skips it too."""
    reference, taken = killed
    run = tmp_path / "run"
    shutil.copytree(taken["between-checkpoints"], run)
    path = run / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    number = next(i for i, line in enumerate(lines, 1) if json.loads(line)["step"] == 5)
    lines[number - 1] = lines[number - 1].replace(b'"loss"', b'"lo\xffss"')
    path.write_bytes(b"".join(lines))
    records_before, damaged = metrics_log_module.read_json_lines(path)
    assert damaged == [number]
    caplog.clear()
    read_metrics(run)
    assert f"{path}: skipped 1 damaged line(s): {number}" in caplog.text
    caplog.clear()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert f"{path}: dropped 1 damaged line(s)" in caplog.text and f"line {number}" in caplog.text
    assert_same_run(run, reference)
