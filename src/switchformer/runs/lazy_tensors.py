"""Tensors of weight files by name, read on access: safetensors through ``safe_open`` (memory-mapped;
one slice of a tensor reads only that slice) and PyTorch's zip ``.bin`` files through
``torch.load(mmap=True, weights_only=True)`` (tensors only, no pickled code; pages read when
touched). Names, shapes and dtypes are known without reading any weight.

Both map a file privately and writably (copy-on-write, so a tensor written in place never reaches
the file), and Linux's default overcommit heuristic refuses such a mapping when it is larger than
the machine's memory and swap (safetensors/safetensors#528): a 25 GiB run on a 24 GiB machine. A
safetensors file is then read with ``pread`` instead (each tensor, or one expert of a stacked
tensor, read into memory of its own when asked for); a ``.bin`` file is refused naming its size
(Google's come in shards of a few GiB).
"""

from __future__ import annotations

import json
import logging
import math
import os
import weakref
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
            if _too_big_to_map(err):
                raise _TooBigToMap from None
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


class _TooBigToMap(Exception):
    pass


def _too_big_to_map(err: Exception) -> bool:
    return "unable to mmap" in str(err) and "Cannot allocate memory" in str(err)


class _UnmappedSafetensors:
    """A safetensors file read with ``pread``: the header parsed here, each tensor, or one index of a
    stacked ``[E, ...]`` tensor (one expert), read alone into memory of its own. For files the
    kernel will not map (safetensors' own ``pread`` backend reads a whole tensor to slice it)."""

    def __init__(self, file: Path):
        self.file = file
        self._fd = os.open(file, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        size = os.fstat(self._fd).st_size
        try:
            length = int.from_bytes(os.pread(self._fd, 8, 0), "little")
            if not 2 <= length <= min(size - 8, 100 * 2**20):
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(os.pread(self._fd, length, 8))
            header.pop("__metadata__", None)
            self._base = 8 + length
            self._entries = {}
            for key, entry in header.items():
                begin, end = entry["data_offsets"]
                dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
                shape = tuple(int(n) for n in entry["shape"])
                if dtype is not None and end - begin != math.prod(shape) * dtype.itemsize:
                    raise ValueError(f"tensor {key}: {end - begin} bytes for shape {list(shape)}")
                if not 0 <= begin <= end <= size - self._base:
                    raise ValueError(f"tensor {key} ends past the end of the file (truncated?)")
                self._entries[key] = (entry["dtype"], dtype, shape, begin)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{file}: damaged or not a safetensors file ({_reason(err)})") from None
        self.keys = sorted(self._entries)  # as safe_open lists them
        log.info("%s: %.1f GiB, more than this machine maps privately; reading tensors with pread", file, size / 2**30)

    def _entry(self, key: str):
        name, dtype, shape, begin = self._entries[key]
        if dtype is None:
            raise ValueError(f"{self.file}: tensor {key} has dtype {name}, which switchformer cannot read")
        return dtype, shape, begin

    def _read(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
        buffer = bytearray(math.prod(shape) * dtype.itemsize)
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            got = os.preadv(self._fd, [view[done:]], self._base + offset + done)
            if got == 0:
                raise ValueError(f"{self.file}: ends inside a tensor (truncated?)")
            done += got
        return torch.frombuffer(buffer, dtype=dtype).view(shape) if buffer else torch.empty(shape, dtype=dtype)

    def get(self, key: str) -> Tensor:
        dtype, shape, begin = self._entry(key)
        return self._read(begin, dtype, shape)

    def part(self, key: str, index: int) -> Tensor:
        dtype, shape, begin = self._entry(key)
        if not 0 <= index < shape[0]:
            raise IndexError(f"{self.file}: tensor {key} has {shape[0]} entries, not an index {index}")
        return self._read(begin + index * math.prod(shape[1:]) * dtype.itemsize, dtype, shape[1:])

    def meta(self, key: str) -> Tensor:
        dtype, shape, _ = self._entry(key)
        return torch.empty(shape, dtype=dtype, device="meta")


def _open_safetensors(file: Path) -> _Safetensors | _UnmappedSafetensors:
    try:
        return _Safetensors(file)
    except _TooBigToMap:
        return _UnmappedSafetensors(file)


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
                if _too_big_to_map(err):
                    size = file.stat().st_size / 2**30
                    raise MemoryError(
                        f"{file}: {size:.1f} GiB is more than this machine can memory-map privately; split it into "
                        "shards (save_pretrained's max_shard_size) or convert it to safetensors"
                    ) from None
                if "_use_new_zipfile_serialization" not in str(err):
                    raise
                # the legacy (pre-zip) format cannot be memory-mapped: read it whole, and say so
                log.warning("%s: an old PyTorch format that cannot be memory-mapped; reading it whole", file)
                state = torch.load(file, map_location="cpu", weights_only=True)
        except (OSError, MemoryError):
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
        self._where: dict[str, _Safetensors | _UnmappedSafetensors | _TorchZip] = {}
        for file in self.files:
            opened = _open_safetensors(file) if file.suffix == ".safetensors" else _TorchZip(file)
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
