"""Bounds of settings, one helper wherever a setting is taken (the Switch layer, the model configs,
the training configuration), so a bound is written once per setting and every refusal reads alike:
``capacity_factor: must be > 0 (or none: dropless), got 0``."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Bound:
    """``low <= value`` (``low < value`` when ``low_open``) and ``value <= high`` (``< high`` when
    ``high_open``); ``optional``: ``None`` is allowed too, and means ``none_means``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    none_means: str = ""

    def failed(self, value) -> str | None:
        """The condition ``value`` breaks, in words (None: it holds). An open interval is named
        whole (``in (0, 1)``), otherwise the side that failed (``>= 1``, ``< 1``)."""
        if value is None:
            return None if self.optional else "given"
        if isinstance(value, float) and math.isnan(value):
            return "a number"
        if self.low_open and self.high_open and self.low is not None and self.high is not None:
            return None if self.low < value < self.high else f"in ({self.low:g}, {self.high:g})"
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return f"{'>' if self.low_open else '>='} {self.low:g}" + self._none()
        if self.high is not None and not (value < self.high if self.high_open else value <= self.high):
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return None

    def _none(self) -> str:
        return f" (or none: {self.none_means})" if self.none_means else " (or none)" if self.optional else ""

    def describe(self) -> str:
        """The whole bound in words, for references: ``in [0, 1)``, ``>= 1``, ``> 0 (or none)``."""
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = "any"
        return text + self._none()


AT_LEAST_ONE = Bound(low=1)
AT_LEAST_ZERO = Bound(low=0)
POSITIVE = Bound(low=0, low_open=True)
FRACTION = Bound(low=0, high=1, high_open=True)  # a rate: dropout, jitter
OPEN_FRACTION = Bound(low=0, high=1, low_open=True, high_open=True)
CAPACITY_FACTOR = Bound(low=0, low_open=True, optional=True, none_means="dropless")
OPTIONAL_AT_LEAST_ONE = Bound(low=1, optional=True)


def check_bound(name: str, value, bound: Bound) -> None:
    """``ValueError`` starting with ``name`` when ``value`` is outside ``bound``."""
    problem = bound.failed(value)
    if problem is not None:
        raise ValueError(f"{name}: must be {problem}, got {value}")


def check_bounds(values: dict, bounds: dict[str, Bound]) -> None:
    """Every ``values[name]`` within ``bounds[name]`` (names not in ``values`` are skipped)."""
    for name, bound in bounds.items():
        if name in values:
            check_bound(name, values[name], bound)
