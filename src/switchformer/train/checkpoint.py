"""Checkpoints: a directory per step, written atomically, loaded without unpickling code, checked
on load.

``checkpoints/step_000100/`` holds ``model.safetensors``, ``optimizer.pt`` (tensors and numbers
only, read back with ``weights_only=True``) and ``state.json`` (step, RNG state, counters). It is
written under a temporary name (``checkpoints/.step_*``), synced, and renamed into place, with
``state.json`` last, so a kill or a full disk mid-save leaves the previous checkpoint as the latest
complete one (the temporary folder is removed on an error, or by the next writer after a kill).
Files and folders get the user's umask. The run directory also holds ``config.json`` (how to
rebuild the model) and ``tokenizer.json``.

Every file is validated when read: a damaged, truncated or foreign file, a tensor of the wrong
shape or dtype, or one with non-finite values, is a :class:`RunFileError`: one line naming the file
(and the tensor) and what is wrong, never advice to load unsafely.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from switchformer.runs.checkpoints import damaged_checkpoint_error, damaged_latest_checkpoint, is_complete_checkpoint
from switchformer.runs.files import (
    CHECKPOINT_PREFIX,
    RunFileError,
    default_file_mode,
    fsync_dir,
    fsync_file,
    make_temp_dir,
    named_error,
    short_message,
    write_file_atomic,
    write_json_atomic,
    write_text_atomic,
)

__all__ = [
    "CHECKPOINT_PREFIX",
    "RunFileError",
    "begin_checkpoint",
    "finish_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "model_state",
    "read_safetensors",
    "read_state",
    "restore_rng",
    "resume_checkpoint",
    "save_checkpoint",
    "write_checkpoint_files",
    "with_earlier_hint",
    "write_state_file",
    "write_json_atomic",
    "write_text_atomic",
]

OPTIMIZER_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # AdamW: one value per weight
# second moments (means of squares): never negative; Adafactor's factored ones included
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "row_var", "col_var", "variance")

log = logging.getLogger("switchformer")


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- writing


def save_checkpoint(run_dir: Path, step: int, model, optimizer, extra: dict, keep_last: int) -> Path:
    """One process: model, optimizer and state, renamed into place when complete."""
    tmp = begin_checkpoint(run_dir, step)
    try:
        write_checkpoint_files(tmp, step, model_state(model), optimizer.state_dict(), extra)
        return finish_checkpoint(tmp, keep_last)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """A temporary directory beside the final one (same filesystem, so the rename is atomic)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    return make_temp_dir(root, f".{CHECKPOINT_PREFIX}{step:07d}.")


def _library_write(write, file: Path) -> None:
    """A file written by a library (safetensors, torch.save); its errors name the file."""
    try:
        write()
    except Exception as err:
        raise named_error(err, file) from None


def write_checkpoint_files(
    tmp: Path,
    step: int,
    weights: dict | None,
    optimizer_state: dict | None,
    extra: dict,
    optimizer_name: str = "optimizer.pt",
) -> None:
    """``weights``: the full (consolidated) model state, written by one process; every process of a
    distributed run writes its own optimizer state under ``optimizer_name``."""
    if weights is not None:
        file = tmp / "model.safetensors"
        _library_write(lambda: save_file(weights, str(file)), file)
        write_state_file(tmp, step, extra)
    if optimizer_state is not None:
        file = tmp / optimizer_name
        _library_write(lambda: torch.save(optimizer_state, file), file)


def write_state_file(tmp: Path, step: int, extra: dict) -> None:
    """``state.json.part`` (renamed to ``state.json`` last, by :func:`finish_checkpoint`): ``extra``,
    the step and this process's RNG state."""
    rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
    write_file_atomic(tmp / "state.json.part", json.dumps(dict(extra, step=step, rng=rng), indent=2).encode())


def restore_rng(state: dict) -> None:
    """The CPU RNG state ``state.json`` recorded (see :func:`write_state_file`)."""
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["rng"])), dtype=torch.uint8))


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is first renamed to a temporary name (so it
    never is half-removed under its own name) and then removed."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.replaced"
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def finish_checkpoint(tmp: Path, keep_last: int) -> Path:
    """Sync every file, mark complete (state.json last), rename into place, prune old checkpoints."""
    mode = default_file_mode()
    for file in tmp.rglob("*"):  # libraries create some files 0600; every process's parts are here now
        if file.is_file() and file.name != "state.json.part":
            os.chmod(file, mode)
            fsync_file(file)
        elif file.is_dir():
            fsync_dir(file)
    os.replace(tmp / "state.json.part", tmp / "state.json")
    fsync_dir(tmp)
    final = tmp.parent / tmp.name[1:].rsplit(".", 1)[0]
    _replace_dir(tmp, final)
    fsync_dir(tmp.parent)
    for old in list_checkpoints(tmp.parent.parent)[:-keep_last]:
        # renamed first, so a kill mid-removal leaves a temporary folder, not a damaged checkpoint
        doomed = old.parent / f".{old.name}.removed"
        try:
            os.replace(old, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary, half-written directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if is_complete_checkpoint(p))


def latest_checkpoint(run_dir: Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint. When a newer final-named folder is incomplete (a file of it
    deleted or lost), ``warn`` logs one line naming it and the checkpoint used instead (``eval``,
    ``generate``); ``--resume`` refuses such a run instead (:func:`resume_checkpoint`)."""
    found = list_checkpoints(run_dir)
    if warn:
        damaged = damaged_latest_checkpoint(run_dir)
        if damaged is not None:
            folder, problem, _ = damaged
            using = f"using {found[-1].name}" if found else "no complete checkpoint to use"
            log.warning("%s: %s; %s", folder, problem, using)
    return found[-1] if found else None


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` continues from: the newest, which must be complete (an
    incomplete newest folder is a one-line :class:`RunFileError` naming it and how to resume from
    the one before it); None when the run has none."""
    damaged = damaged_checkpoint_error(run_dir)
    if damaged is not None:
        raise damaged
    return latest_checkpoint(run_dir, warn=False)


# ----------------------------------------------------------------------------- reading


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    return "integer"


def check_finite(file: Path, name: str, tensor: torch.Tensor, what: str = "tensor") -> None:
    if (tensor.dtype.is_floating_point or tensor.dtype.is_complex) and not bool(torch.isfinite(tensor).all()):
        raise RunFileError(file, f"{what} {name} holds non-finite values (NaN or infinity); the file is damaged")


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked: readable, every floating value finite."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: model weights not found")
    try:
        state = load_file(str(file))
    except OSError as err:
        raise named_error(err, file) from None
    except Exception as err:
        reason = short_message(err).removeprefix("Error while deserializing header: ")
        raise RunFileError(file, f"damaged or not a safetensors file ({reason})") from None
    for name, tensor in state.items():
        check_finite(file, name, tensor)
    return state


def dtype_problem(tensor: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why ``tensor`` cannot be loaded into a model tensor of ``dtype`` (None: it can). Another
    precision of the same kind is accepted only when converting it changes no value (bfloat16
    weights into a float32 model: yes; float64 ones with more digits than float32 holds: no)."""
    if tensor.dtype == dtype:
        return None
    if dtype_kind(tensor.dtype) != dtype_kind(dtype):
        return f"is {str(tensor.dtype).removeprefix('torch.')}; the model's is {str(dtype).removeprefix('torch.')}"
    if not torch.equal(tensor.to(dtype).to(tensor.dtype), tensor):
        return (
            f"is {str(tensor.dtype).removeprefix('torch.')}, and converting it to the model's "
            f"{str(dtype).removeprefix('torch.')} would change its values"
        )
    return None


def check_weights(
    file: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], dtypes: bool = True
) -> None:
    """``state`` (read from ``file``) against the model's own tensors: the same names, shapes and
    (with ``dtypes``) dtypes (see :func:`dtype_problem`); one line naming the file and the first
    tensor that differs."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {_names(missing)}"] if missing else []) + (
            [f"unexpected {_names(unexpected)}"] if unexpected else []
        )
        raise RunFileError(file, f"tensors do not match the model: {'; '.join(parts)}")
    wrong = [name for name in expected if tuple(state[name].shape) != tuple(expected[name].shape)]
    if wrong:
        name = wrong[0]
        more = f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""
        raise RunFileError(
            file, f"tensor {name} has shape {_shape(state[name])}; the model expects {_shape(expected[name])}{more}"
        )
    for name, tensor in expected.items() if dtypes else ():
        problem = dtype_problem(state[name], tensor.dtype)
        if problem:
            raise RunFileError(file, f"tensor {name} {problem}")


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """The weights of a checkpoint folder (or a ``model.safetensors`` file) into ``model``, checked
    first (see :func:`read_safetensors` and :func:`check_weights`)."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    state = read_safetensors(file)
    check_weights(file, state, model.state_dict())
    model.load_state_dict(state, strict=True)


def read_state(checkpoint: Path) -> dict:
    """``state.json`` of a checkpoint folder, checked: a JSON object with a non-negative integer
    ``step`` (the folder's), the RNG state ``rng`` (base64 of torch's CPU generator state) and, when
    present, well-typed counters."""
    file = Path(checkpoint) / "state.json"
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RunFileError(file, "not UTF-8 text; the file is damaged") from None
    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        raise RunFileError(file, f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(state, dict):
        raise RunFileError(file, "expected a JSON object")

    def integer(key: str, minimum: int, required: bool = False) -> None:
        if key not in state:
            if required:
                raise RunFileError(file, f"'{key}' is missing")
            return
        value = state[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise RunFileError(file, f"'{key}' must be an integer >= {minimum}, got {value!r}")

    integer("step", 0, required=True)
    integer("bad_steps", 0)
    integer("world_size", 1)
    if "train_time" in state:
        value = state["train_time"]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise RunFileError(file, f"'train_time' must be a finite number of seconds >= 0, got {value!r}")
    folder = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", Path(checkpoint).name)
    if folder and int(folder.group(1)) != state["step"]:
        raise RunFileError(file, f"says step {state['step']}, but it is in {Path(checkpoint).name}")
    if "rng" not in state:
        raise RunFileError(file, "'rng' is missing")
    if not isinstance(state["rng"], str):
        raise RunFileError(file, f"'rng' must be a base64 string, got {type(state['rng']).__name__}")
    try:
        rng = base64.b64decode(state["rng"], validate=True)
    except (binascii.Error, ValueError):
        raise RunFileError(file, "'rng' is not valid base64") from None
    expected = torch.get_rng_state().numel()
    if len(rng) != expected:
        raise RunFileError(file, f"'rng' holds {len(rng)} bytes; torch's generator state has {expected}")
    return state


def read_optimizer_state(file: Path) -> dict:
    """An optimizer state written by ``torch.save``, read with ``weights_only=True``: a file holding
    anything else (code to run, another format) is refused with one line, never advice to load it
    unsafely."""
    file = Path(file)
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(file):
            raise RunFileError(file, "damaged or not a PyTorch checkpoint (not a zip archive)") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise RunFileError(
            file,
            f"refused: it holds objects other than tensors and plain values{what}, which could run code when "
            "loaded; switchformer never writes such a file",
        ) from None
    except OSError as err:
        if isinstance(err, FileNotFoundError) or err.errno is not None:
            raise named_error(err, file) from None
        raise RunFileError(file, f"damaged or not a PyTorch checkpoint ({short_message(err)})") from None
    except Exception as err:  # RuntimeError (zip reader), EOFError, ...
        reason = short_message(err).split(". ")[0] or "it ends early"
        raise RunFileError(file, f"damaged or not a PyTorch checkpoint ({reason})") from None
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("state"), dict)
        or not isinstance(saved.get("param_groups"), list)
        or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved["param_groups"])
    ):
        raise RunFileError(file, "not an optimizer state (expected 'state' and 'param_groups')")
    return saved


def check_optimizer_state(file: Path, saved: dict, optimizer, names: dict[int, str] | None = None) -> None:
    """``saved`` against ``optimizer``: the same groups and parameter counts, per-weight moments of
    each parameter's shape, every floating value finite, second moments never negative."""
    names = names or {}
    groups, saved_groups = optimizer.param_groups, saved["param_groups"]
    if len(saved_groups) != len(groups):
        raise RunFileError(file, f"has {len(saved_groups)} parameter groups; this model's optimizer has {len(groups)}")
    params = {}
    for i, (group, saved_group) in enumerate(zip(groups, saved_groups)):
        if len(saved_group["params"]) != len(group["params"]):
            raise RunFileError(
                file,
                f"parameter group {i} has {len(saved_group['params'])} tensors; this model's has "
                f"{len(group['params'])} (a checkpoint of another model?)",
            )
        params.update(zip(saved_group["params"], group["params"]))
    for key, entry in saved["state"].items():
        if key not in params or not isinstance(entry, dict):
            raise RunFileError(file, f"state entry {key!r} matches no parameter")
        param = params[key]
        label = names.get(id(param), f"parameter {key}")
        for field, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            check_finite(file, f"{field} of {label}", value, what="state")
            if field in SECOND_MOMENTS and value.dtype.is_floating_point and bool((value < 0).any()):
                raise RunFileError(
                    file,
                    f"state {field} of {label} holds negative values (a second moment never is); the file is damaged",
                )
            if field in OPTIMIZER_MOMENTS:
                if not value.dtype.is_floating_point:
                    raise RunFileError(file, f"state {field} of {label} is {value.dtype}; expected floating point")
                if tuple(value.shape) != tuple(param.shape):
                    raise RunFileError(
                        file, f"state {field} of {label} has shape {_shape(value)}; the parameter has {_shape(param)}"
                    )


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG of a single-process checkpoint; returns ``state.json``. Every
    file is checked before it is used (see the module's docstring); a damaged checkpoint's error says
    how to resume from the one before it, when there is one."""
    path = Path(path)
    try:
        return _load_checkpoint(path, model, optimizer)
    except RunFileError as err:
        raise with_earlier_hint(path, err) from None


def with_earlier_hint(path: Path, err: RunFileError) -> RunFileError:
    """``err`` (a file of checkpoint ``path`` cannot be used) with how to resume from the
    checkpoint before it, when there is one."""
    earlier = [p for p in list_checkpoints(path.parent.parent) if p.name < path.name]
    if not earlier:
        return err
    hint = f"to resume from {earlier[-1].name} instead, move {path.name} out of {path.parent}"
    return RunFileError(err.file, f"{err.problem}; {hint}")


def _load_checkpoint(path: Path, model, optimizer) -> dict:
    state = read_state(path)
    load_model_weights(model, path)
    file = path / "optimizer.pt"
    if not file.exists():
        raise FileNotFoundError(f"{file}: missing; the checkpoint holds no optimizer state to resume with")
    saved = read_optimizer_state(file)
    check_optimizer_state(file, saved, optimizer, {id(p): n for n, p in model.named_parameters()})
    try:
        optimizer.load_state_dict(saved)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as err:
        raise RunFileError(file, f"does not fit this model's optimizer ({short_message(err)})") from None
    restore_rng(state)
    return state
