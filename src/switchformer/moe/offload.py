"""Experts whose weights are not parameters: quantised in memory, or fetched on demand from a
memory-mapped store into a least-recently-used cache of whole experts under a byte budget.

Inference only. A Switch layer's tokens arrive sorted by expert (``DispatchPlan``), so each expert a
step needs is fetched once and serves every token routed to it, whatever the batch. The cache is
shared by all the layers of a model, so the budget goes to whichever experts are used most lately.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from switchformer.moe.dispatch import DispatchPlan
from switchformer.moe.experts import apply_activation
from switchformer.moe.quantize import Int8Matrix, int8_matmul, quantize_int8

# expert -> (w_in [d_model, d_ff (x2 gated)], w_out [d_ff, d_model]) in the store's dtype (views of
# memory-mapped files are fine: they are copied or quantised before use), or both as Int8Matrix
ExpertSource = Callable[[int], tuple]


def format_size(n: int) -> str:
    """``n`` bytes in binary units (``1.50 GiB``)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,} B"


def _nbytes(w: Tensor | Int8Matrix) -> int:
    return w.nbytes if isinstance(w, Int8Matrix) else w.numel() * w.element_size()


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's two matrices as computed with: float tensors, or :class:`Int8Matrix`."""

    w_in: Tensor | Int8Matrix
    w_out: Tensor | Int8Matrix

    @property
    def nbytes(self) -> int:
        return _nbytes(self.w_in) + _nbytes(self.w_out)

    def ffn(self, x: Tensor, activation: str) -> Tensor:
        """``act(x @ w_in) @ w_out`` for rows ``x [M, d_model]`` in the compute dtype."""
        h = int8_matmul(x, self.w_in) if isinstance(self.w_in, Int8Matrix) else x @ self.w_in
        h = apply_activation(h, activation)
        return int8_matmul(h, self.w_out) if isinstance(self.w_out, Int8Matrix) else h @ self.w_out


def prepare_expert(w_in, w_out, dtype: torch.dtype, quantize: bool, device=None) -> ExpertWeights:
    """The weights to compute with, in memory of their own (never a view of the store's file):
    ``dtype`` copies, or int8 with per-channel scales when ``quantize``. A store that holds int8
    already (:class:`Int8Matrix`, ``convert --dtype int8``) is copied as it is, or dequantised."""
    if isinstance(w_in, Int8Matrix):
        if quantize:
            own = [Int8Matrix(_own_copy(m.qweight, torch.int8, device), _own_copy(m.scale, torch.float32, device))
                   for m in (w_in, w_out)]  # fmt: skip
            return ExpertWeights(*own)
        return ExpertWeights(*(_own_copy(m.dequantize(dtype), dtype, device) for m in (w_in, w_out)))
    if quantize:
        q_in, q_out = quantize_int8(w_in), quantize_int8(w_out)
        if device is not None:
            q_in = Int8Matrix(q_in.qweight.to(device), q_in.scale.to(device))
            q_out = Int8Matrix(q_out.qweight.to(device), q_out.scale.to(device))
        return ExpertWeights(q_in, q_out)
    return ExpertWeights(*(_own_copy(w, dtype, device) for w in (w_in, w_out)))


def _own_copy(w: Tensor, dtype: torch.dtype, device) -> Tensor:
    """A contiguous copy in ``dtype`` (one copy, also from a transposed view)."""
    return torch.empty(w.shape, dtype=dtype, device=device if device is not None else w.device).copy_(w)


def expert_bytes(d_model: int, d_ff_in: int, d_ff: int, dtype: torch.dtype, quantize: bool) -> int:
    """Bytes one expert takes in memory: ``w_in [d_model, d_ff_in]`` and ``w_out [d_ff, d_model]``
    (``d_ff_in`` is twice ``d_ff`` for gated activations); int8 adds a float32 scale per output channel."""
    if quantize:
        return d_model * d_ff_in + 4 * d_ff_in + d_ff * d_model + 4 * d_model
    size = torch.empty((), dtype=dtype).element_size()
    return size * (d_model * d_ff_in + d_ff * d_model)


class ExpertCache:
    """Whole experts, least recently used evicted first, never more than ``budget_bytes`` held
    (counted with :attr:`ExpertWeights.nbytes`). ``hits``, ``misses``, ``evictions`` and
    ``bytes_read`` (bytes read from the store: its dtype, before conversion) count every fetch."""

    def __init__(self, budget_bytes: int):
        if budget_bytes <= 0:
            raise ValueError(f"expert cache: budget must be > 0 bytes, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[object, ExpertWeights] = OrderedDict()
        self.used_bytes = self.peak_bytes = 0
        self.hits = self.misses = self.evictions = self.bytes_read = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key, load: Callable[[], tuple[ExpertWeights, int]]) -> ExpertWeights:
        """The entry of ``key``; on a miss ``load()`` gives ``(weights, bytes read)``, and the
        least recently used entries are evicted until it fits."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry
        self.misses += 1
        entry, read = load()
        if entry.nbytes > self.budget_bytes:
            raise ValueError(
                f"expert cache: one expert takes {entry.nbytes:,} bytes, more than the cache's budget of "
                f"{self.budget_bytes:,} bytes"
            )
        while self.used_bytes + entry.nbytes > self.budget_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.used_bytes -= evicted.nbytes
            self.evictions += 1
        self._entries[key] = entry
        self.used_bytes += entry.nbytes
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        self.bytes_read += read
        return entry

    @property
    def hit_rate(self) -> float:
        fetches = self.hits + self.misses
        return self.hits / fetches if fetches else 0.0

    def stats(self) -> dict:
        return {
            "hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate, "evictions": self.evictions,
            "bytes_read": self.bytes_read, "cached_experts": len(self), "used_bytes": self.used_bytes,
            "peak_bytes": self.peak_bytes, "budget_bytes": self.budget_bytes,
        }  # fmt: skip

    def summary(self) -> str:
        return (
            f"expert cache: {self.hits + self.misses:,} fetches, hit rate {self.hit_rate:.1%}, "
            f"{format_size(self.bytes_read)} read, {len(self)} experts held "
            f"({format_size(self.peak_bytes)} at most of a {format_size(self.budget_bytes)} budget)"
        )


class StoredExperts(nn.Module):
    """``num_experts`` feed-forward experts for inference, in place of :class:`Experts`: kept in
    memory (``cache`` None: all of them, int8 when ``quantize``), or fetched from ``source`` into
    ``cache`` on use. ``forward(x, plan)`` takes rows sorted by expert, as ``Experts`` does; the
    output is in ``dtype`` (float32 or bfloat16, the activations' dtype also under int8)."""

    all_local = True  # every expert is computed here (SwitchMoE's few-token path may call forward_one)

    def __init__(
        self, num_experts: int, d_model: int, d_ff: int, activation: str, source: ExpertSource, *,
        dtype: torch.dtype, quantize: bool = False, cache: ExpertCache | None = None, key: object = None,
        device=None,
    ):  # fmt: skip
        super().__init__()
        self.num_experts, self.d_model, self.d_ff, self.activation = num_experts, d_model, d_ff, activation
        self.dtype, self.quantize, self.device = dtype, quantize, device
        self._source, self._cache, self._key = source, cache, key
        w_in, w_out = source(0)  # shapes only (a view of the store: nothing is read)
        self.params_per_expert = w_in.numel() + w_out.numel()
        self._resident = None
        self.eval()  # inference only: model.train() makes forward refuse
        if cache is None:  # one expert at a time, so the store's copy is never held whole beside ours
            self._resident = [self._load(e)[0] for e in range(num_experts)]

    def _load(self, expert: int) -> tuple[ExpertWeights, int]:
        w_in, w_out = self._source(expert)
        read = _nbytes(w_in) + _nbytes(w_out)
        return prepare_expert(w_in, w_out, self.dtype, self.quantize, self.device), read

    def weights(self, expert: int) -> ExpertWeights:
        if self._resident is not None:
            return self._resident[expert]
        return self._cache.get((self._key, expert), lambda: self._load(expert))

    def forward(self, x: Tensor, plan: DispatchPlan) -> Tensor:
        if self.training:  # their weights are no parameters: an optimizer would silently leave them as they are
            raise RuntimeError(
                "experts loaded for inference (int8 or offloaded, --dtype int8 / --max-memory) cannot be trained; "
                "load the model without them to train it"
            )
        x = x.to(self.dtype)
        out = x.new_empty(x.shape[0], self.d_model)
        start = 0
        for expert, count in enumerate(plan.counts_list()):
            if count:
                out[start : start + count] = self.weights(expert).ffn(x[start : start + count], self.activation)
            start += count
        return out

    def forward_one(self, expert: int, x: Tensor) -> Tensor:
        return self.weights(expert).ffn(x.to(self.dtype), self.activation)

    def extra_repr(self) -> str:
        where = "resident" if self._cache is None else "offloaded"
        kind = "int8" if self.quantize else str(self.dtype).removeprefix("torch.")
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, {kind}, {where}"
