import numpy as np
import pytest

from pipeline import metrics


def test_mean_pool_ignores_padding() -> None:
    hidden = np.array([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    mask = np.array([[1, 1, 0]])
    assert metrics.pool(hidden, mask, "mean").tolist() == [[2.0, 1.0]]


def test_cls_pool_finds_first_real_token_under_left_padding() -> None:
    hidden = np.arange(12, dtype=float).reshape(2, 3, 2)
    mask = np.array([[1, 1, 1], [0, 1, 1]])
    assert metrics.pool(hidden, mask, "cls").tolist() == [[0.0, 1.0], [8.0, 9.0]]


def test_cosine_and_normalize() -> None:
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0]])
    assert metrics.cosine(a, b) == pytest.approx([1.0, -1.0])


def _circle(degrees: list[float]) -> np.ndarray:
    radians = np.deg2rad(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def test_neighbour_agreement_counts_changed_neighbours() -> None:
    ref = _circle([0, 10, 50, 60, 120, 130])  # pairs: 0-10, 50-60, 120-130
    assert metrics.neighbour_agreement(ref, ref) == 1.0
    # Move 60 to 124: 50, 60, 120 and 130 get new neighbours; 0 and 10 keep theirs.
    moved = _circle([0, 10, 50, 124, 120, 130])
    assert metrics.neighbour_agreement(ref, moved) == pytest.approx(2 / 6)


def test_token_errors_only_count_real_tokens() -> None:
    ref = np.zeros((1, 3, 2))
    out = np.array([[[0.1, 0.0], [0.0, -0.3], [50.0, 50.0]]])
    mask = np.array([[1, 1, 0]])
    worst, mean = metrics.token_errors(ref, out, mask)
    assert worst == pytest.approx(0.3)
    assert mean == pytest.approx(0.1)


def test_label_agreement_and_word_labels() -> None:
    ref = np.array([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    out = np.array([[[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])
    assert metrics.label_agreement(ref, out, np.array([[1, 1, 0]])) == (1, 2)
    assert metrics.word_labels(ref[0], [None, 0, 0]) == [0]
    assert metrics.accuracy([1, 2, 3], [1, 0, 3]) == (2, 3)


def test_neighbour_ties_are_not_disagreements() -> None:
    ref = _circle([0, 10, 20, 90])  # row 1 has two equally near neighbours (0 and 20)
    candidate = _circle([0, 10.0000001, 20, 90])  # round-off decides which one is picked
    assert metrics.neighbour_agreement(ref, candidate) == 1.0
    assert metrics.neighbour_agreement(ref, _circle([0, 10, 20, 9])) < 1.0


def test_padding_values_never_reach_the_pooled_vector() -> None:
    hidden = np.array([[[1.0, 2.0], [3.0, 4.0], [np.nan, np.inf]]])
    mask = np.array([[1, 1, 0]])
    for mode, expected in (
        ("mean", [2.0, 3.0]),
        ("max", [3.0, 4.0]),
        ("last", [3.0, 4.0]),
        ("cls", [1.0, 2.0]),
    ):
        assert metrics.pool(hidden, mask, mode).tolist() == [expected]


def test_non_finite_outputs_are_infinite_errors() -> None:
    ref = np.zeros((1, 2, 2))
    out = np.array([[[0.0, np.nan], [0.0, 0.0]]])
    mask = np.array([[1, 1]])
    assert metrics.token_errors(ref, out, mask) == (float("inf"), float("inf"))
    assert metrics.nonfinite(out, mask) == 1
    assert metrics.nonfinite(out, np.array([[0, 1]])) == 0
