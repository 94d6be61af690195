"""Choosing the decoding cache (Hugging Face's ``cache_implementation``) and the static step a
generation loop calls: ``model.decode_step`` as it is, or compiled whole with
``torch.compile(fullgraph=True)`` (on CUDA with ``mode="reduce-overhead"``: one CUDA graph replayed
per step instead of hundreds of kernel launches from the host).

``"dynamic"`` (the default) is the cache that grows with each token, whose attention reads only
the filled columns and whose Switch layers sort a step's tokens by expert with host reads;
``"static"`` is the fixed-size cache of ``decode_step``, whose shapes never change and which reads
nothing back to the host within a step. Both give the same tokens (greedy, float32).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from switchformer.moe.layer import switch_layers
from switchformer.moe.static import check_static_layer

CACHE_IMPLEMENTATIONS = ("dynamic", "static")

_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_cache_options(cache_implementation: str, compile: bool, model=None) -> bool:
    """True for the static cache. ``ValueError`` naming ``cache_implementation`` for an unknown
    one, or ``compile`` for a compiled step without the static cache (only a static step compiles
    whole) or a ``compile`` that is not a bool; with ``model``, also for a model the static step
    cannot run (:func:`check_static_model`), before anything is decoded."""
    if cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"cache_implementation: unknown {cache_implementation!r}; choose one of {CACHE_IMPLEMENTATIONS}"
        )
    if not isinstance(compile, bool):
        raise ValueError(f"compile: expected True or False, got {compile!r}")
    if compile and cache_implementation != "static":
        raise ValueError("compile: only the static decoding step compiles whole; add cache_implementation='static'")
    static = cache_implementation == "static"
    if static and model is not None:
        check_static_model(model)
    return static


def check_static_model(model) -> None:
    """``ValueError`` before decoding starts for a model the static step cannot run: one without a
    ``decode_step``, expert-choice routing, or experts that are not resident (offloaded under a
    memory budget, int8-stored, expert-parallel)."""
    if not hasattr(model, "decode_step"):
        raise ValueError(f"cache_implementation: {type(model).__name__} has no static decoding step")
    for layer in switch_layers(model):
        check_static_layer(layer)


def compile_mode(device: torch.device) -> str | None:
    """``torch.compile``'s mode for the step: CUDA graphs on a GPU, the default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None


def decode_step_fn(model, compile: bool = False) -> Callable[..., tuple[Tensor, list[Tensor]]]:
    """``model.decode_step``, or its compiled form (``fullgraph=True``: a graph break is an error,
    not a silent fallback), compiled once per model. The compiled function is kept in a weak map
    keyed by the model and holds no reference to it (the model is an argument), so a model that is
    no longer used is freed with its compiled step. (Dynamo's own cache of guarded graphs lives on
    the shared ``decode_step`` code, so its recompile limit counts every model, batch and cache
    length together.) On CUDA each step is one CUDA graph replay; a new cache (each ``generate``
    call allocates one) is recorded anew, which costs a warm-up per call."""
    if not compile:
        return model.decode_step
    check_static_model(model)  # also probes grouped_mm eagerly, which the graph only reads
    device = next(model.parameters()).device
    mode = compile_mode(device)
    compiled = _compiled.get(model, {}).get(mode)
    if compiled is None:  # per mode: a model compiled on a CPU and moved to a GPU gets its CUDA graphs
        compiled = torch.compile(type(model).decode_step, fullgraph=True, mode=mode)
        _compiled.setdefault(model, {})[mode] = compiled
    cuda = device.type == "cuda"

    def step(*args, **kwargs):
        if cuda:  # a new step: the previous replay's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(model, *args, **kwargs)

    return step
