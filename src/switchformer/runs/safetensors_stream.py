"""A safetensors file written one piece at a time, so a model bigger than memory can be converted:
the header (names, dtypes, shapes, offsets) first, then each tensor's bytes as its pieces come.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, the
JSON header (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
padded with spaces to a multiple of 8), then the tensors' bytes, row-major, little-endian, in
offset order. The ``safetensors`` library reads what this writes (tested).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from switchformer.runs.files import write_all

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


@dataclass(frozen=True)
class StreamedTensor:
    """A tensor of the file: ``pieces()`` yields tensors of ``dtype`` whose elements, in order, are
    the tensor's in row-major order (the rows of one expert after another, for example)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def streamed_safetensors(
    tensors: list[StreamedTensor], metadata: dict[str, str] | None = None, path="model.safetensors"
):
    """The writer :func:`~switchformer.runs.files.write_file_atomic` calls with the open file: one
    piece at a time in memory. A piece of the wrong dtype, or pieces that do not add up to the
    tensor's size, raise ``ValueError`` naming the tensor (and the file is not kept)."""
    header, offset = {}, 0
    for t in tensors:
        end = offset + t.nbytes
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(fd: int) -> None:
        write_all(fd, struct.pack("<Q", len(text)) + text, path)
        for t in tensors:
            written = 0
            for piece in _pieces(t):
                data = memoryview(piece.contiguous().reshape(-1).view(torch.uint8).numpy()) if piece.numel() else b""
                write_all(fd, data, path)
                written += len(data)
            if written != t.nbytes:
                raise ValueError(f"{t.name}: {written} bytes written, its shape {list(t.shape)} needs {t.nbytes}")

    return write


def _pieces(t: StreamedTensor) -> Iterator[torch.Tensor]:
    for piece in t.pieces():
        if piece.dtype != t.dtype:
            raise ValueError(f"{t.name}: a piece of dtype {piece.dtype}, the tensor's is {t.dtype}")
        yield piece.cpu()
