"""Tensors of weight files by name, read on access: safetensors through ``safe_open`` (memory-mapped;
one slice of a tensor reads only that slice) and PyTorch's zip ``.bin`` files through
``torch.load(mmap=True, weights_only=True)`` (tensors only, no pickled code; pages read when
touched). Names, shapes and dtypes are known without reading any weight.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("switchformer")


def _reason(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text.removeprefix("Error while deserializing header: ")


class _Safetensors:
    def __init__(self, file: Path):
        from safetensors import safe_open

        self.file = file
        try:
            self._handle = safe_open(str(file), framework="pt", device="cpu")
            self.keys = list(self._handle.keys())
        except OSError:
            raise
        except Exception as err:  # safetensors' own error type (a Rust panic for a bad header)
            raise ValueError(f"{file}: damaged or not a safetensors file ({_reason(err)})") from None

    def get(self, key: str) -> Tensor:
        return self._handle.get_tensor(key)

    def part(self, key: str, index: int) -> Tensor:
        return self._handle.get_slice(key)[index]

    def meta(self, key: str) -> Tensor:
        view = self._handle.get_slice(key)
        dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
        if dtype is None:
            raise ValueError(f"{self.file}: tensor {key} has dtype {view.get_dtype()}, which switchformer cannot read")
        return torch.empty(view.get_shape(), dtype=dtype, device="meta")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class _TorchZip:
    def __init__(self, file: Path):
        self.file = file
        try:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                # the legacy (pre-zip) format cannot be memory-mapped: read it whole, and say so
                log.warning("%s: an old PyTorch format that cannot be memory-mapped; reading it whole", file)
                state = torch.load(file, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as err:  # a cut or foreign file: unpickling, zip or weights-only errors
            raise ValueError(f"{file}: damaged, or holds more than tensors ({_reason(err)})") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{file}: expected a dictionary of tensors (a state dict)")
        self._state = state
        self.keys = list(state)

    def get(self, key: str) -> Tensor:
        return self._state[key]

    def part(self, key: str, index: int) -> Tensor:
        return self._state[key][index]

    def meta(self, key: str) -> Tensor:
        t = self._state[key]
        return torch.empty(t.shape, dtype=t.dtype, device="meta")


class LazyTensors(Mapping):
    """``name -> tensor`` over one or more weight files (``.safetensors``, or PyTorch's ``.bin``),
    each tensor read when asked for. A file that cannot be opened is a ``ValueError`` naming it;
    a name held by two files is refused naming both."""

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        self._where: dict[str, _Safetensors | _TorchZip] = {}
        for file in self.files:
            opened = _Safetensors(file) if file.suffix == ".safetensors" else _TorchZip(file)
            for key in opened.keys:
                if key in self._where:
                    raise ValueError(f"{file}: tensor {key} is also in {self._where[key].file}")
                self._where[key] = opened

    def __getitem__(self, key: str) -> Tensor:
        return self._where[key].get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def file_of(self, key: str) -> Path:
        return self._where[key].file

    def part(self, key: str, index: int) -> Tensor:
        """``self[key][index]``, reading only that part (one expert of a stacked ``[E, ...]`` tensor)."""
        return self._where[key].part(key, index)

    def meta(self, key: str) -> Tensor:
        """A meta tensor of ``key``'s shape and dtype (nothing read)."""
        return self._where[key].meta(key)
