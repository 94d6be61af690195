"""Derived weights (a transposed or fused copy of a weight) kept for one generation call: the
:class:`DecodingScope` inside which a :class:`DerivedWeight` may be reused, and outside which every
call recomputes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch
from torch import Tensor


class DecodingScope:
    """One generation call (or one stream), inside which :class:`DerivedWeight` copies may be kept.

    Why a scope: a derived copy can only be kept while nothing can change its source weights
    unseen. Optimizer steps, loads and in-place ops bump a tensor's version and ``.to()`` replaces
    its storage, but edits through ``param.data`` (EMA swaps, adapter merges, manual edits) change
    neither, and no cheap check sees them. So copies live for one scope: ``generate`` opens a fresh
    one per call (a stream: one for all its steps), and outside any scope every call recomputes.
    The active scope is per thread."""

    _active = threading.local()

    @contextlib.contextmanager
    def active(self):
        previous = getattr(DecodingScope._active, "scope", None)
        DecodingScope._active.scope = self
        try:
            yield self
        finally:
            DecodingScope._active.scope = previous

    @staticmethod
    def current() -> DecodingScope | None:
        return getattr(DecodingScope._active, "scope", None)


class DerivedWeight:
    """A copy of parameters in the layout a decoding step wants (fused, transposed). Inside a
    :class:`DecodingScope` it is built on first use and kept for the rest of the scope, rebuilt if a
    source's version, storage, dtype or device changes meanwhile; outside a scope, and in a new
    scope, it is rebuilt, so it always equals recomputation (``param.data`` edits between
    ``generate`` calls included). Not a parameter, not in the state dict; inference only."""

    def __init__(self, build: Callable[..., Tensor]):
        self.build = build  # a module-level function, so that models still pickle
        self._weights: tuple[Tensor, ...] = ()
        self._state: list | None = None
        self._scope: DecodingScope | None = None
        self._copy: Tensor | None = None

    def __call__(self, *weights: Tensor) -> Tensor:
        scope = DecodingScope.current()
        if scope is None:  # nothing bounds the copy's life: recompute
            self._copy = self._weights = self._state = None
            with torch.no_grad():
                return self.build(*weights)
        state = [(w._version, w.data_ptr(), w.dtype, w.device) for w in weights]
        same = self._weights is not None and len(weights) == len(self._weights)
        same = same and all(a is b for a, b in zip(weights, self._weights))
        if self._copy is None or self._scope is not scope or not same or state != self._state:
            with torch.no_grad():
                self._copy = self.build(*weights)
            self._weights, self._state, self._scope = weights, state, scope
        return self._copy

    def __getstate__(self) -> dict:  # the copy is a cache: never saved, pickled or deep-copied
        return {"build": self.build, "_weights": (), "_state": None, "_scope": None, "_copy": None}
