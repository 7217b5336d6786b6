import pytest

from pipeline.backends.timing import LatencyStats, time_interleaved


def test_stats_from_known_samples() -> None:
    seconds = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    stats = LatencyStats.of(seconds, batch=4)
    assert stats.runs == 100
    assert stats.p50_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01)
    assert stats.min_ms == pytest.approx(1.0)
    assert stats.throughput == pytest.approx(4 / 0.0505, rel=1e-3)


def test_interleaving_calls_each_contender_once_per_round() -> None:
    order: list[str] = []
    rounds: list[int] = []
    times = time_interleaved(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")},
        warmup=2,
        runs=3,
        on_round=lambda: rounds.append(1),
    )
    assert order == ["a", "b"] * 5
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert len(rounds) == 3
    assert all(t >= 0 for v in times.values() for t in v)


def test_settle_pause_is_taken_but_not_timed() -> None:
    import time

    calls = {"torch": lambda: None, "ort": lambda: None}
    start = time.perf_counter()
    times = time_interleaved(calls, warmup=1, runs=4, settle_after={"torch": 0.02})
    elapsed = time.perf_counter() - start
    assert elapsed >= 5 * 0.02  # one pause after every torch call, warm-up included
    assert max(times["torch"]) < 0.01 and max(times["ort"]) < 0.01
