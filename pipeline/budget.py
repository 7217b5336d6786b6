"""The accuracy budget: the fewest float nodes that keep an INT8 model within its limits.

Nodes are kept in float in order of measured sensitivity (pipeline.sensitivity, lowest SQNR
first). Each candidate "the k most sensitive in float" is quantized and compared with the
PyTorch reference on the evaluation data, end to end. k grows 0, 1, 2, 4, 8... until the
limits hold, then a bisection between the last failing and the first passing k finds the
smallest k that passes. Accuracy is not strictly monotonic in k, so the result is the smallest
passing k the search saw, not a proven minimum; the trace of every attempt is recorded so the
report shows the trade-off.

When even every node in float misses the limits (the limits are above what FP32 ONNX itself
reaches), there is no passing k: the best attempt is returned and marked as missing the budget,
and the build's budget check fails (exit 3).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Budget field -> the verify figure it limits (all "at least").
FIGURES = {
    "min_mean_cosine": "mean_cosine",
    "min_worst_cosine": "worst_cosine",
    "min_agreement": "agreement",
}


@dataclass(frozen=True)
class Attempt:
    kept_float: int
    figures: dict[str, float | None]
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return {"kept_float": self.kept_float, "passed": self.passed, **self.figures}


@dataclass
class BudgetResult:
    kept_float: int
    met: bool
    attempts: list[Attempt] = field(default_factory=list)


def shortfall(limits: Mapping[str, float], figures: Mapping[str, Any]) -> float:
    """How far the figures are below the limits, summed (0 when every limit holds)."""
    total = 0.0
    for key, limit in limits.items():
        value = figures.get(FIGURES[key])
        if value is None:  # no figure (a NaN output): as far off as can be
            return float("inf")
        total += max(0.0, limit - value)
    return total


def _figure(value: Any) -> float | None:
    return None if value is None else float(value)


def search(
    nodes: Sequence[str],
    limits: Mapping[str, float],
    evaluate: Callable[[int], Mapping[str, Any]],
    on_attempt: Callable[[Attempt], None] | None = None,
) -> BudgetResult:
    """The smallest k (of ``nodes``, most sensitive first) whose model meets ``limits``.

    ``evaluate(k)`` quantizes with the first k nodes kept in float and returns the verify
    figures (mean_cosine, worst_cosine, agreement...).
    """
    result = BudgetResult(kept_float=0, met=False)
    seen: dict[int, Attempt] = {}

    def attempt(k: int) -> bool:
        if k not in seen:
            figures = evaluate(k)
            missing = [key for key in limits if FIGURES[key] not in figures]
            if missing:
                raise KeyError(missing)
            made = Attempt(
                k,
                {FIGURES[key]: _figure(figures[FIGURES[key]]) for key in limits},
                shortfall(limits, figures) == 0,
            )
            seen[k] = made
            result.attempts.append(made)
            if on_attempt is not None:
                on_attempt(made)
        return seen[k].passed

    low, high = -1, None  # largest failing k, smallest passing k
    k = 0
    while True:
        if attempt(k):
            high = k
            break
        low = k
        if k >= len(nodes):
            break
        k = min(len(nodes), max(1, 2 * k))
    if high is None:
        best = min(seen.values(), key=lambda a: (shortfall(limits, a.figures), a.kept_float))
        result.kept_float, result.met = best.kept_float, False
        return result
    while high - low > 1:
        middle = (low + high) // 2
        if attempt(middle):
            high = middle
        else:
            low = middle
    result.kept_float, result.met = high, True
    return result
