"""A run's weights loaded for inference under ``--dtype`` and ``--max-memory``: memory-mapped, into a
model built on the meta device, placed as :mod:`switchformer.models.placement` plans."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from switchformer.models.placement import place_weights, plan_placement
from switchformer.moe.quantize import Int8Matrix
from switchformer.runs.files import RunFileError, named_error
from switchformer.runs.lazy_tensors import LazyTensors
from switchformer.train.checkpoint import check_finite, check_weights, dtype_kind, dtype_problem


def holds_int8_experts(path: Path) -> bool:
    """Whether a checkpoint folder's (or file's) weights hold int8 experts (``convert --dtype int8``)."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    try:
        return any(k.endswith(".experts.w_in.qweight") for k in LazyTensors([file]))
    except (OSError, ValueError):
        return False  # the checked load names what is wrong with the file


def _stored_shapes(file: Path, lazy: LazyTensors) -> dict[str, torch.Tensor]:
    """Meta tensors of what the file holds, under the model's names: an int8 expert weight
    (``name.qweight [E, out, in]`` int8 and ``name.scale [E, out]``) as ``name`` of the float
    layout ``[E, in, out]``, each part's shape checked."""
    shapes = {k: lazy.meta(k) for k in lazy if not k.endswith((".qweight", ".scale"))}
    for key in lazy:
        if key.endswith(".qweight"):
            name = key.removesuffix(".qweight")
            q = lazy.meta(key)
            scale = lazy.meta(f"{name}.scale") if f"{name}.scale" in lazy else None
            if q.dim() != 3 or q.dtype != torch.int8 or scale is None or tuple(scale.shape) != tuple(q.shape[:2]):
                raise RunFileError(file, f"tensor {key}: int8 experts need {name}.qweight [E, out, in] (int8) and "
                                         f"{name}.scale [E, out]")  # fmt: skip
            shapes[name] = torch.empty(q.shape[0], q.shape[2], q.shape[1], device="meta")
    return shapes


class _Checked(Mapping):
    """``name -> tensor`` of a weight file but the experts, each read and checked finite on access."""

    def __init__(self, file: Path, lazy: LazyTensors):
        self._file, self._lazy = file, lazy
        self._names = [k for k in lazy if ".experts.w_" not in k]  # the experts, float or int8, come apart

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._lazy[name]
        check_finite(self._file, name, tensor)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_placed_weights(
    model: torch.nn.Module, path: Path, dtype: str, max_memory: int | None, device
) -> torch.nn.Module:
    """The weights of a checkpoint folder (or a ``model.safetensors`` file) into ``model``, built on
    the meta device: each resident tensor read once, the experts one at a time (offloaded ones on
    use). Names, shapes and kinds are checked before anything is read, and each tensor is checked
    finite when it is read; errors are one line naming the file."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: model weights not found")
    try:
        lazy = LazyTensors([file])
    except OSError as err:
        raise named_error(err, file) from None
    except ValueError as err:
        raise RunFileError(file, str(err).removeprefix(f"{file}: ")) from None
    expected = model.state_dict()
    stored = _stored_shapes(file, lazy)
    check_weights(file, stored, expected, dtypes=False)
    for name, meta in expected.items():  # a float stored for an integer (or the other way) is refused
        if dtype_kind(stored[name].dtype) != dtype_kind(meta.dtype):
            raise RunFileError(file, f"tensor {name} {dtype_problem(stored[name], meta.dtype)}")
    placement = plan_placement(model, dtype, max_memory, device)
    resident = _Checked(file, lazy)

    def part(name: str, e: int):
        if f"{name}.qweight" in lazy:  # int8 experts (convert --dtype int8)
            m = Int8Matrix(lazy.part(f"{name}.qweight", e), lazy.part(f"{name}.scale", e))
            check_finite(file, f"{name}.scale[{e}]", m.scale)
            return m
        tensor = lazy.part(name, e)
        check_finite(file, f"{name}[{e}]", tensor)
        return tensor

    def source(w_in: str, w_out: str):
        return lambda e: (part(w_in, e), part(w_out, e))

    layers = {k.rsplit(".experts.", 1)[0] for k in expected if k.endswith(".experts.w_in")}
    experts = {layer: source(f"{layer}.experts.w_in", f"{layer}.experts.w_out") for layer in layers}
    return place_weights(model, placement, resident, experts)
