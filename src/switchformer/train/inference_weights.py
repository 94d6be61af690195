"""A run's weights loaded for inference under ``--dtype`` and ``--max-memory``: memory-mapped, into a
model built on the meta device, placed as :mod:`switchformer.models.placement` plans."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from switchformer.models.placement import place_weights, plan_placement
from switchformer.runs.files import RunFileError, named_error
from switchformer.runs.lazy_tensors import LazyTensors
from switchformer.train.checkpoint import check_finite, check_weights, dtype_kind, dtype_problem


class _Checked(Mapping):
    """``name -> tensor`` of a weight file but the experts, each read and checked finite on access."""

    def __init__(self, file: Path, lazy: LazyTensors):
        self._file, self._lazy = file, lazy
        self._names = [k for k in lazy if ".experts.w_" not in k]

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
    check_weights(file, {k: lazy.meta(k) for k in lazy}, expected, dtypes=False)
    for name, meta in expected.items():  # a float stored for an integer (or the other way) is refused
        if dtype_kind(lazy.meta(name).dtype) != dtype_kind(meta.dtype):
            raise RunFileError(file, f"tensor {name} {dtype_problem(lazy.meta(name), meta.dtype)}")
    placement = plan_placement(model, dtype, max_memory, device)
    resident = _Checked(file, lazy)

    def source(w_in: str, w_out: str):
        def expert(e: int):
            pair = lazy.part(w_in, e), lazy.part(w_out, e)
            for name, tensor in zip((w_in, w_out), pair):
                check_finite(file, f"{name}[{e}]", tensor)
            return pair

        return expert

    layers = {k.rsplit(".experts.", 1)[0] for k in expected if k.endswith(".experts.w_in")}
    experts = {layer: source(f"{layer}.experts.w_in", f"{layer}.experts.w_out") for layer in layers}
    return place_weights(model, placement, resident, experts)
