"""Where a model's weights live for inference under a memory budget (``--dtype``, ``--max-memory``).

Everything but the experts (embeddings, attention, norms, routers, dense feed-forward layers) is
resident in the compute dtype; routers stay float32 (Switch paper, section 2.4: selective
precision). The experts are resident too when all of them fit, in the compute dtype or int8;
otherwise they stay in the memory-mapped store and an LRU cache of whole experts
(:class:`~switchformer.moe.offload.ExpertCache`) gets what the budget leaves. The budget is for the
whole process: :func:`reserve_bytes` of it is kept for PyTorch itself, activations and the
key/value caches.

:func:`plan_placement` needs only the model's shapes (a model on the meta device), so ``info``
tells what fits before anything loads; :func:`place_weights` then fills a meta model from lazily
read tensors, one expert at a time, so loading never holds a tensor twice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from switchformer.moe.layer import SwitchMoE
from switchformer.moe.offload import ExpertCache, ExpertSource, StoredExperts, expert_bytes, format_size
from switchformer.moe.quantize import Int8Matrix

DTYPES = ("float32", "bfloat16", "int8")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB)?\s*$")
_UNITS = {None: 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
RESERVE_MAX = 2**30


def parse_size(text: str, field: str = "--max-memory") -> int:
    """Bytes of a size such as ``20GiB``, ``512MiB``, ``100KiB`` or ``4096`` (binary units)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{field}: {text!r} is not a size; write it as 20GiB, 512MiB, 100KiB or a number of bytes")
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise ValueError(f"{field}: {text!r}; the size must be more than 0 bytes")
    return size


def reserve_bytes(max_memory: int) -> int:
    """What a budget keeps for the runtime (PyTorch's own ~0.4 GiB, activations, key/value caches):
    an eighth of it, at most 1 GiB."""
    return min(RESERVE_MAX, max_memory // 8)


def minimum_budget(dense_bytes: int, expert_bytes: int) -> int:
    """The smallest ``--max-memory`` that holds the resident part and one expert besides
    :func:`reserve_bytes` of itself."""
    need = dense_bytes + expert_bytes
    budget = need + min(RESERVE_MAX, -(-need // 7))
    while budget - 1 - reserve_bytes(budget - 1) >= need:  # the bound above is within a byte or two
        budget -= 1
    return budget


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The activations' dtype: ``dtype`` itself, or for int8 float32 on the CPU and bfloat16 on a GPU."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: unknown {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "int8":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def keeps_float32(name: str) -> bool:
    """Tensors that stay float32 whatever the compute dtype: the routers (and their bias buffers)."""
    return ".router." in name


def _experts_prefix(layer_name: str) -> str:
    return f"{layer_name}.experts."


@dataclass(frozen=True)
class Placement:
    """The plan: bytes of the resident part, of one expert and of all of them, and the cache."""

    dtype: str  # float32, bfloat16 or int8 (the experts' storage; see compute_dtype for activations)
    device: torch.device
    max_memory: int | None  # bytes; None: no budget, everything resident
    dense_bytes: int
    expert_bytes: int  # one expert as held in memory (0 for a dense model)
    num_experts: int  # over all Switch layers
    offload: bool
    cache_bytes: int  # the expert cache's budget (0 when nothing is offloaded)

    @property
    def all_experts_bytes(self) -> int:
        return self.expert_bytes * self.num_experts

    @property
    def cached_experts(self) -> int:
        return self.cache_bytes // self.expert_bytes if self.offload else self.num_experts

    def lines(self) -> list[str]:
        """What ``info`` prints about the plan."""
        reserve = format_size(reserve_bytes(self.max_memory)) if self.max_memory else ""
        out = [
            f"  weights for inference ({self.dtype} on {self.device.type}): {format_size(self.dense_bytes)} resident "
            f"besides the experts, {self.num_experts:,} experts of {format_size(self.expert_bytes)} "
            f"({format_size(self.all_experts_bytes)})"
        ]
        if self.max_memory is None:
            out.append(f"  all resident: {format_size(self.dense_bytes + self.all_experts_bytes)}")
        elif not self.offload:
            out.append(
                f"  fits {format_size(self.max_memory)}: everything resident "
                f"({format_size(self.dense_bytes + self.all_experts_bytes)}, {reserve} kept for the runtime)"
            )
        else:
            share = self.cached_experts / self.num_experts
            out.append(
                f"  within {format_size(self.max_memory)}: experts offloaded, a cache of "
                f"{format_size(self.cache_bytes)} holds {self.cached_experts:,} of {self.num_experts:,} experts "
                f"({share:.0%}); the rest are read from the checkpoint's files on use ({reserve} kept for the runtime)"
            )
        return out


def _tensor_bytes(name: str, t: Tensor, dtype: torch.dtype) -> int:
    if t.dtype.is_floating_point:
        return t.numel() * (4 if keeps_float32(name) else torch.empty((), dtype=dtype).element_size())
    return t.numel() * t.element_size()


def plan_placement(model: nn.Module, dtype: str = "float32", max_memory: int | None = None, device=None) -> Placement:
    """The plan for ``model`` (a meta model is enough). Raises ``ValueError`` naming ``--max-memory``
    when the budget cannot hold the resident part and one expert, with what would fit."""
    device = torch.device(device if device is not None else "cpu")
    activations = compute_dtype(dtype, device)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SwitchMoE)]
    prefixes = tuple(_experts_prefix(n) for n, _ in layers)
    dense = sum(
        _tensor_bytes(name, t, activations)
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if not name.startswith(prefixes)
    )
    one = 0
    if layers:
        e = layers[0][1]
        gated = e.experts.params_per_expert != 2 * e.d_model * e.d_ff
        one = expert_bytes(e.d_model, e.d_ff * (2 if gated else 1), e.d_ff, activations, dtype == "int8")
    count = sum(m.num_experts for _, m in layers)
    if max_memory is None:
        return Placement(dtype, device, None, dense, one, count, False, 0)
    room = max_memory - reserve_bytes(max_memory) - dense
    if room >= one * count:
        return Placement(dtype, device, max_memory, dense, one, count, False, 0)
    if room < one:
        least = minimum_budget(dense, one)
        everything = minimum_budget(dense + one * (count - 1), one)
        hint = "" if dtype == "int8" else ", or try --dtype int8"
        raise ValueError(
            f"--max-memory: {format_size(max_memory)} cannot hold this model: {format_size(dense)} stays resident "
            f"besides the experts (in {str(activations).removeprefix('torch.')}), and one expert takes "
            f"{format_size(one)}; at least {format_size(least)} is needed (everything resident: "
            f"{format_size(everything)}){hint}"
        )
    return Placement(dtype, device, max_memory, dense, one, count, True, room)


def place_weights(
    model: nn.Module, placement: Placement, resident: Mapping[str, Tensor], expert_sources: dict[str, ExpertSource]
) -> nn.Module:
    """Fill ``model`` (built on the meta device) as ``placement`` says: every tensor but the experts
    from ``resident`` (``name -> tensor``, read lazily; names as ``model.state_dict()``), the experts
    of each Switch layer from ``expert_sources[layer name]``, one expert at a time. The model's
    ``expert_cache`` is the shared cache (None when nothing is offloaded). Names are not checked
    here: the caller compares them with the model (the readers of runs and of Hugging Face do)."""
    device = placement.device
    activations = compute_dtype(placement.dtype, device)
    quantize = placement.dtype == "int8"
    cache = ExpertCache(placement.cache_bytes) if placement.offload else None
    state = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, SwitchMoE):
            continue
        source, e = expert_sources[name], layer.experts
        if placement.offload or quantize:
            layer.experts = StoredExperts(
                e.num_experts, e.d_model, e.d_ff, e.activation, source, dtype=activations, quantize=quantize,
                cache=cache, key=name, device=device,
            )  # fmt: skip
            continue
        stacks = [torch.empty(w.shape, dtype=activations, device=device) for w in (e.w_in, e.w_out)]
        for expert in range(e.num_experts):  # each expert read once
            for stacked, w in zip(stacks, source(expert)):
                stacked[expert].copy_(w.dequantize(activations) if isinstance(w, Int8Matrix) else w)
        state[f"{_experts_prefix(name)}w_in"], state[f"{_experts_prefix(name)}w_out"] = stacks
    expected = model.state_dict()
    for name, t in resident.items():
        dtype = expected[name].dtype if not t.dtype.is_floating_point or keeps_float32(name) else activations
        state[name] = torch.empty(t.shape, dtype=dtype, device=device).copy_(t)
    model.load_state_dict(state, strict=False, assign=True)
    for module in model.modules():  # buffers that are not saved are computed again
        if hasattr(module, "materialize_buffers"):
            module.materialize_buffers(device, activations)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"placement: no weights for {left[:5]}{' ...' if len(left) > 5 else ''}")
    model.expert_cache = cache
    return model
