import pytest

from pipeline.budget import search, shortfall

NODES = [f"n{i}" for i in range(20)]


def _model(loss_per_node: list[float]):  # type: ignore[no-untyped-def]
    """Mean cosine when the first k nodes stay float: 1 minus the loss of the others."""
    calls: list[int] = []

    def evaluate(k: int) -> dict[str, float]:
        calls.append(k)
        return {"mean_cosine": 1.0 - sum(loss_per_node[k:]), "agreement": 1.0}

    return evaluate, calls


def test_finds_the_smallest_k_with_few_evaluations() -> None:
    evaluate, calls = _model([0.001] * 20)  # every node costs 0.001 of cosine
    result = search(NODES, {"min_mean_cosine": 0.9935}, evaluate)
    # 1 - 0.001 * (20 - k) >= 0.9935  <=>  k >= 13.5
    assert result.met and result.kept_float == 14
    assert calls[:6] == [0, 1, 2, 4, 8, 16] and len(calls) <= 10
    assert [a.kept_float for a in result.attempts] == calls


def test_everything_quantized_may_already_pass() -> None:
    evaluate, calls = _model([1e-6] * 20)
    result = search(NODES, {"min_mean_cosine": 0.999}, evaluate)
    assert result.met and result.kept_float == 0 and calls == [0]


def test_an_unreachable_budget_returns_the_best_attempt() -> None:
    evaluate, _ = _model([0.001] * 20)
    result = search(NODES, {"min_mean_cosine": 0.999, "min_agreement": 1.5}, evaluate)
    assert not result.met
    assert result.kept_float == 20  # the closest: every node in float
    assert result.attempts[-1].kept_float == 20


def test_shortfall_sums_the_misses_and_treats_no_figure_as_infinite() -> None:
    assert shortfall({"min_mean_cosine": 0.99}, {"mean_cosine": 0.995}) == 0
    assert shortfall(
        {"min_mean_cosine": 0.99, "min_agreement": 0.9}, {"mean_cosine": 0.98, "agreement": 0.8}
    ) == pytest.approx(0.11)
    assert shortfall({"min_agreement": 0.9}, {"agreement": None}) == float("inf")
