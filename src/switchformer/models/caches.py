"""Key/value caches of cached decoding, per family (:class:`LMCache`, :class:`DecoderCache`), and
the check that one fits the device before it is allocated."""

from __future__ import annotations

import os

import torch
from torch import Tensor


def device_memory_bytes(device: torch.device | str) -> int:
    """Memory an allocation on ``device`` can use at most: free GPU memory, or the host's RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX host: no check
        return 1 << 62


def check_cache_size(nbytes: int, positions: int, device) -> None:
    """Refuse a decoding cache larger than the device's memory before allocating it (a huge
    ``max_new_tokens`` would otherwise ask the allocator for terabytes)."""
    available = device_memory_bytes(device)
    if nbytes > available:
        raise ValueError(
            f"max_new_tokens: a decoding cache of {positions:,} positions needs {nbytes / 2**30:,.1f} GiB, "
            f"more than this device's memory ({available / 2**30:,.1f} GiB); ask for fewer new tokens"
        )


class LMCache:
    """Static key/value buffers per layer, the key-validity mask (left padding) and next positions."""

    def __init__(self, batch: int, config, max_length: int, device, dtype):
        head_dim = config.d_model // config.num_heads
        shape = (batch, config.num_heads, max_length, head_dim)
        size = torch.empty((), dtype=dtype).element_size()
        check_cache_size(2 * config.num_layers * batch * config.num_heads * max_length * head_dim * size, max_length,
                         device or "cpu")  # fmt: skip
        self.kv = [
            (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(config.num_layers)
        ]
        self.key_valid = torch.zeros(batch, max_length, dtype=torch.bool, device=device)
        self.length = 0
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)

    @classmethod
    def from_buffers(cls, kv: list[tuple[Tensor, Tensor]], key_valid: Tensor, length: int, next_position: Tensor):
        """A cache over buffers the caller owns (views of a server's per-slot storage): ``kv`` per
        layer ``[B, heads, capacity, head_dim]``, ``key_valid`` ``[B, capacity]``, ``length`` filled
        columns, ``next_position`` ``[B]``. Appends write into the buffers; ``next_position`` is
        replaced by a new tensor after a call (read it back)."""
        cache = cls.__new__(cls)
        cache.kv, cache.key_valid, cache.length, cache.next_position = kv, key_valid, length, next_position
        return cache

    @property
    def capacity(self) -> int:
        return self.key_valid.shape[1]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        keys, values = self.kv[layer]
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]


class DecoderCache:
    """Static key/value buffers for cached decoding: self-attention per layer (filled as tokens
    come) and cross-attention per layer (computed once from the encoder output)."""

    def __init__(
        self,
        self_kv: list[tuple[Tensor, Tensor]],
        cross_kv: list[tuple[Tensor, Tensor]],
        cross_bias: Tensor,
        self_bias: Tensor,
    ):
        self.self_kv = self_kv
        self.self_bias = self_bias
        self.cross_kv = cross_kv
        self.cross_bias = cross_bias
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.self_kv[0][0].shape[2] if self.self_kv else 0

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"cache: {end} decoder positions exceed the cache size {self.capacity}")
        keys, values = self.self_kv[layer]
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Keep the batch rows ``index`` (beam search)."""
        self.self_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.self_kv]
        self.cross_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv]
        self.cross_bias = self.cross_bias.index_select(0, index)


class StaticLMCache(LMCache):
    """An :class:`LMCache` that a static decoding step (``SwitchLM.decode_step``) also writes: the
    column the next token's keys go to is a one-element device tensor, ``column``, advanced on the
    device by each step, as are ``next_position`` and ``key_valid``, so a step reads nothing back
    to the host and its shapes never change. The prompt is prefilled by the ordinary cached
    forward into the same buffers; :meth:`sync_column` then sets ``column`` from ``length``."""

    def __init__(self, batch: int, config, max_length: int, device, dtype):
        super().__init__(batch, config, max_length, device, dtype)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        mark_static(self.kv, self.key_valid, self.next_position, self.column)

    @classmethod
    def over(cls, kv, key_valid: Tensor, next_position: Tensor, column: Tensor) -> StaticLMCache:
        """A static cache over buffers the caller owns (views of a server's slots), all written in
        place by each step: ``kv`` per layer ``[B, heads, L, head_dim]``, ``key_valid`` ``[B, L]``,
        ``next_position`` ``[B]``, ``column`` ``[1]``."""
        cache = cls.__new__(cls)
        cache.kv, cache.key_valid, cache.next_position, cache.column = kv, key_valid, next_position, column
        cache.length = 0  # unused by the static step: the column is ``column``
        mark_static(kv, key_valid, next_position, column)
        return cache

    def sync_column(self) -> None:
        self.column.fill_(self.length)
        self.next_position = _static_copy(self.next_position)


class StaticDecoderCache(DecoderCache):
    """The encoder-decoder's cache for a static decoding step (``SwitchT5.decode_step``): the
    self-attention buffers of :class:`DecoderCache`, the write ``column`` as a one-element device
    tensor (advanced on the device), and, for rows whose earlier columns are padding (a server's
    batch), ``key_valid`` ``[B, L]``. The position bias of a step's query column is computed in the
    step from ``column``, so no ``[L, L]`` table is held. :meth:`reorder` keeps the buffers in
    place (beam search), so a captured step stays valid."""

    def __init__(self, self_kv, cross_kv, cross_bias, key_valid: Tensor | None = None, column: Tensor | None = None):
        super().__init__(self_kv, cross_kv, cross_bias, None)
        device = cross_bias.device
        self.column = torch.zeros(1, dtype=torch.long, device=device) if column is None else column
        self.key_valid = key_valid
        mark_static(self.self_kv, self.cross_kv, self.cross_bias, self.column, key_valid)

    def reorder(self, index: Tensor) -> None:
        """Keep the batch rows ``index`` (beam search), copying into the same buffers."""
        for pair in (*self.self_kv, *self.cross_kv):
            for buf in pair:
                buf.copy_(buf.index_select(0, index))
        self.cross_bias.copy_(self.cross_bias.index_select(0, index))
        if self.key_valid is not None:  # the same for every beam in generate; a row's own elsewhere
            self.key_valid.copy_(self.key_valid.index_select(0, index))


def _static_copy(t: Tensor) -> Tensor:
    copy = t.clone()
    mark_static(copy)
    return copy


def mark_static(*tensors) -> None:
    """Tell ``torch.compile`` that these buffers keep their address across steps (what lets a
    captured CUDA graph write into them instead of skipping capture; Hugging Face's StaticCache
    does the same). Lists and tuples are walked; ``None`` is skipped."""
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, (list, tuple)):
            mark_static(*t)
            continue
        try:
            torch._dynamo.mark_static_address(t)
        except (AttributeError, RuntimeError):  # a build without dynamo: nothing to tell
            pass
