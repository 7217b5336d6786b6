"""Interleaved latency measurement, shared by the build's latency stage and the benchmarks.

Contenders are timed round-robin (one call each per round) after a warm-up, so a slow drift of
the machine (frequency, another process) hits all of them alike instead of whichever ran last.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    #: Samples per second at the median latency.
    throughput: float

    @classmethod
    def of(cls, seconds: list[float], batch: int) -> LatencyStats:
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(
            runs=len(ms),
            p50_ms=round(float(p50), 4),
            p90_ms=round(float(p90), 4),
            p99_ms=round(float(p99), 4),
            mean_ms=round(float(ms.mean()), 4),
            min_ms=round(float(ms.min()), 4),
            throughput=round(batch / (float(p50) / 1e3), 2),
        )

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


#: Idle time after each call of a PyTorch contender. PyTorch's OpenMP worker threads keep
#: spinning for a while after a call; whatever runs next loses a core to them (measured here:
#: the ONNX Runtime model timed right after PyTorch eager read 20.0 ms at b1s128 instead of 16.7;
#: a 5 ms pause left 0.9 ms of it, 10 ms none). ONNX Runtime's own spinning is switched off in
#: its session options instead.
SETTLE_AFTER_TORCH = 0.010


def time_interleaved(
    calls: Mapping[str, Callable[[], object]],
    *,
    warmup: int,
    runs: int,
    on_round: Callable[[], None] | None = None,
    settle_after: Mapping[str, float] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call for each contender: ``warmup`` untimed rounds, then ``runs`` timed ones.

    ``settle_after`` names contenders after whose calls the loop idles (untimed) for so many
    seconds, so their lingering threads do not slow the next contender.
    """
    settle = settle_after or {}
    for _ in range(warmup):
        for name, call in calls.items():
            call()
            if settle.get(name):
                time.sleep(settle[name])
    times: dict[str, list[float]] = {name: [] for name in calls}
    clock = time.perf_counter
    for _ in range(runs):
        for name, call in calls.items():
            start = clock()
            call()
            times[name].append(clock() - start)
            if settle.get(name):
                time.sleep(settle[name])
        if on_round is not None:
            on_round()
    return times
